"""How NiN's layers are computed fast and exactly: the layers `models.py` names, and the forms that
each device runs fastest (choices.py), behind the same names and parameters."""

from nin_jax.ops.choices import Kernels
from nin_jax.ops.layers import relu
from nin_jax.ops.sequential import Conv, Dense, Dropout, Flatten, GlobalAvgPool, GlobalMaxPool, Layers, MaxPool

__all__ = ["Conv", "Dense", "Dropout", "Flatten", "GlobalAvgPool", "GlobalMaxPool", "Kernels", "Layers", "MaxPool",
           "relu"]
