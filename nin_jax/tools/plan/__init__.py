"""Plans a run on a GPU or a TPU slice from a machine that has neither: compiles the real train and
eval steps of `train.py`'s config for the target's devices and says whether they fit, the largest
batch that does, the kernels and collectives of a step, and the fastest step its peaks allow.

    python -m nin_jax.plan --list
    python -m nin_jax.plan --target h100 --recipe reference
    python -m nin_jax.plan --target tpu-v5e-16 --recipe strong --dtype bfloat16 --json plan.json

It needs no dataset, no TensorFlow and no accelerator: `pip install -e '.[plan]'` adds the
compilers (jax's CUDA plugin and libtpu). The recipe flags are `train.py`'s (`--help` lists them).
"""

