"""`python -m nin_jax.plan`: compiles the real steps for a GPU or TPU slice that is not here (nin_jax/tools/plan/)."""

if __name__ == "__main__":
    from nin_jax.runtime import commands

    commands.begin()  # first, before the command's imports, which take seconds
    from nin_jax.tools.plan import command as plan

    commands.run(plan.main)
