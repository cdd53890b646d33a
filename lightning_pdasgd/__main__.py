"""``python -m lightning_pdasgd``: the ``lightning-pdasgd`` command without the console script."""

import sys

from lightning_pdasgd.cli.main import main

if __name__ == "__main__":
    sys.exit(main())
