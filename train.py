"""Train the book's Network in Network on Fashion-MNIST with JAX.

    python train.py --workdir runs/reference                  # the book's recipe (224 px, 10 epochs)
    python train.py --resize 96 --num_epochs 2 --workdir runs/quick   # a quick run on a CPU
    python train.py --recipe strong --resize 96 --workdir runs/strong_96   # the stronger recipe
    python train.py --summary --resize 96                     # the layers' output shapes, no training

Offline, point --manual_dir at the four Fashion-MNIST .gz files. `python train.py --help` lists
every flag with its default.
"""

if __name__ == "__main__":  # first, before the imports below (seconds): see nin_jax/runtime/commands.py
    from nin_jax.runtime import commands

    commands.begin()

import argparse
import signal

from nin_jax.config import TRAINING, ConfigError, FlagParser, add_config_flags, parse_flags
from nin_jax.run.stopping import Diverged, Interrupted, signals_raise
from nin_jax.runtime import commands
from nin_jax.runtime.errors import DataError, OutOfMemory, OutputError, WorkdirError, quiet_library_logs

# Errors whose message is all the user needs: printed as one line, without a traceback.
USER_ERRORS = (DataError, WorkdirError, OutputError, OutOfMemory, Diverged)


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field, with the field's default and help text, in the field's group."""
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    groups = add_config_flags(parser)
    groups[TRAINING].add_argument(
        "--summary", action="store_true", help="print each layer's output shape (NHWC) and parameter count at "
        "--resize, then exit without loading data or training")
    return parser


def print_summary(config) -> None:
    """The book's layer-by-layer shape printout, traced abstractly: it takes a second, not a training run."""
    from nin_jax import models, steps

    print(f"NiN on a batch of one {config.resize}x{config.resize} grayscale image (NHWC):")
    print(models.format_summary(models.layer_summary(steps.create_model(config), config.resize)))


def main(argv=None) -> int:
    parser = build_parser()
    config, flags = parse_flags(parser, argv)
    if flags["summary"]:
        print_summary(config)
        return 0
    quiet_library_logs()
    try:
        with signals_raise():  # from here on a SIGTERM or SIGHUP ends the run with a line, not in silence
            from nin_jax import trainer
            from nin_jax.ops import choices
            from nin_jax.runtime import compile_cache

            if config.deterministic:
                choices.make_deterministic()  # before JAX's backend starts and reads XLA_FLAGS
            compile_cache.enable(config.compile_cache)  # before JAX compiles anything
            trainer.train_and_evaluate(config, config.workdir)
    except ConfigError as error:  # found once the devices are known, e.g. a batch that does not split over them
        parser.error(str(error))
    except USER_ERRORS as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    except Interrupted as stop:
        parser.exit(stop.exit_code, f"{parser.prog}: {stop}\n")
    except (KeyboardInterrupt, commands.Terminated) as stop:  # before training started, or a second signal
        signum = stop.signum if isinstance(stop, commands.Terminated) else signal.SIGINT
        parser.exit(128 + signum, commands.interrupted_line(
            parser.prog, signum, "the same command resumes from the latest checkpoint, if any"))
    return 0


if __name__ == "__main__":
    commands.run(main)
