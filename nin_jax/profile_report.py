"""`python -m nin_jax.profile_report`: where a profiled step's time went (nin_jax/run/profile_report.py)."""

if __name__ == "__main__":
    from nin_jax.runtime import commands

    commands.begin()  # first, before the command's imports, which take seconds
    from nin_jax.run import profile_report

    commands.run(profile_report.main)
