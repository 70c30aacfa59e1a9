"""`python -m nin_jax.export`: a trained NiN as one file that runs with JAX alone (nin_jax/tools/export.py)."""

if __name__ == "__main__":
    from nin_jax.runtime import commands

    commands.begin()  # first, before the command's imports, which take seconds
    from nin_jax.tools import export

    commands.run(export.main)
