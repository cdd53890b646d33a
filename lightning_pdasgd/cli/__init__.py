"""The ``lightning-pdasgd`` command (``main.py``): its LightningCLI, short configuration errors (``errors.py``) and
the ``report`` plots of a run's logs (``report.py``, ``report_logs.py``). Imports nothing until a module is used."""
