"""Example models and datamodules, importable by ``class_path`` (``examples.digits.DigitsClassifier``) when the
``lightning-pdasgd`` command runs from the repository root."""
