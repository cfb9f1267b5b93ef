"""Example models that plug into the trainer through ``model.factory`` (not installed with the package)."""
