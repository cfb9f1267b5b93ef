"""A ResNet-BK language model, plugged in unchanged with ``model.factory`` and ``model.blocks_attr``."""
