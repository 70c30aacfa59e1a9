"""`python -m nin_jax.class_maps`: where a trained NiN found each class (nin_jax/tools/class_maps.py)."""

if __name__ == "__main__":
    from nin_jax.runtime import commands

    commands.begin()  # first, before the command's imports, which take seconds
    from nin_jax.tools import class_maps

    commands.run(class_maps.main)
