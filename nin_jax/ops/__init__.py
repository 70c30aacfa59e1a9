"""How NiN's layers are computed fast and exactly: the layers `models.py` names, and the forms that
each device runs fastest (choices.py), behind the same names and parameters."""

from nin_jax.ops.choices import Kernels
from nin_jax.ops.layers import relu
from nin_jax.ops.sequential import Conv, Dropout, Flatten, GlobalAvgPool, Layers, MaxPool

__all__ = ["Conv", "Dropout", "Flatten", "GlobalAvgPool", "Kernels", "Layers", "MaxPool", "relu"]
