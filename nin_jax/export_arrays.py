"""`python -m nin_jax.export_arrays`: Fashion-MNIST as one .npz for machines without TensorFlow (nin_jax/tools/export_arrays.py)."""

if __name__ == "__main__":
    from nin_jax.runtime import commands

    commands.begin()  # first, before the command's imports, which take seconds
    from nin_jax.tools import export_arrays

    commands.run(export_arrays.main)
