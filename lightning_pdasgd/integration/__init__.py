"""The Lightning-facing layer: loaded once per Lightning package (``lightning`` and ``pytorch_lightning``).

Every module here names Lightning classes, reads them from ``_lightning`` and imports its siblings relatively, so
that ``lightning_pdasgd.pl.integration.<module>`` is the same source bound to ``pytorch_lightning`` (``_flavor.py``).
They import the Lightning-free layers (``engine``, ``distributed``) absolutely: those exist once.
"""
