"""The 0.1 import path of ``ShortErrorParser`` (``LightningCLI(..., parser_class=ShortErrorParser)``).

It lives in ``cli/errors.py``; this module keeps ``from lightning_pdasgd.cli_errors import ShortErrorParser``
working.
"""

from __future__ import annotations

from lightning_pdasgd.cli.errors import ShortErrorParser
from lightning_pdasgd.errors import ConfigurationError

__all__ = ["ConfigurationError", "ShortErrorParser"]
