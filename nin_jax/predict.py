"""`python -m nin_jax.predict`: what a trained NiN predicts (nin_jax/tools/predict.py)."""

if __name__ == "__main__":
    from nin_jax.runtime import commands

    commands.begin()  # first, before the command's imports, which take seconds
    from nin_jax.tools import predict

    commands.run(predict.main)
