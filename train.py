"""Train the book's Network in Network on Fashion-MNIST with JAX.

    python train.py --workdir runs/reference                  # the book's recipe (224 px, 10 epochs)
    python train.py --resize 96 --num_epochs 2 --workdir runs/quick   # a quick run on a CPU
    python train.py --recipe strong --resize 96 --workdir runs/strong_96   # the stronger recipe
    python train.py --summary --resize 96                     # the layers' output shapes, no training

Offline, point --manual_dir at the four Fashion-MNIST .gz files. `python train.py --help` lists
every flag with its default.
"""

import argparse
import dataclasses
import sys
import typing

from nin_jax import recipes
from nin_jax.checkpoints import WorkdirError
from nin_jax.config import Config, ConfigError
from nin_jax.divergence import Diverged
from nin_jax.input_pipeline import DataError
from nin_jax.interrupts import Interrupted

# Errors whose message is all the user needs: printed as one line, without a traceback.
USER_ERRORS = (DataError, WorkdirError, Diverged)


def _flag_type(field: dataclasses.Field):
    hint = typing.get_type_hints(Config)[field.name]
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        """A wrong flag ends with one line, not the usage block."""
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def build_parser() -> argparse.ArgumentParser:
    """One flag per Config field, with the field's default and help text."""
    parser = _Parser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    for field in dataclasses.fields(Config):
        flag_type = _flag_type(field)
        kwargs = dict(default=field.default, help=field.metadata["help"])
        if flag_type is bool:
            parser.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            parser.add_argument(f"--{field.name}", type=flag_type, choices=field.metadata.get("choices"), **kwargs)
    parser.add_argument("--summary", action="store_true",
                        help="print each layer's output shape (NHWC) and parameter count at --resize, then exit "
                             "without loading data or training")
    return parser


def print_summary(config: Config) -> None:
    """The book's layer-by-layer shape printout, traced abstractly: it takes a second, not a training run."""
    from nin_jax import models, steps

    print(f"NiN on a batch of one {config.resize}x{config.resize} grayscale image (NHWC):")
    print(models.format_summary(models.layer_summary(steps.create_model(config), config.resize)))


def _apply_recipe(parser: argparse.ArgumentParser, argv) -> None:
    """Makes the --recipe's values the defaults, so that flags given explicitly still win."""
    first_pass = _Parser(add_help=False)  # so that --help shows the recipe's defaults
    first_pass.add_argument("--recipe", choices=tuple(recipes.RECIPES), default="reference")
    recipe = first_pass.parse_known_args(argv)[0].recipe
    parser.set_defaults(**recipes.RECIPES[recipe])


def parse_config(parser: argparse.ArgumentParser, argv=None) -> tuple[Config, bool]:
    """The Config that the flags ask for (the recipe's values, then the flags given), and whether
    --summary was given."""
    _apply_recipe(parser, argv)
    flags = vars(parser.parse_args(argv))
    summary = flags.pop("summary")
    return Config(**flags), summary


def main(argv=None) -> int:
    parser = build_parser()
    config, summary = parse_config(parser, argv)
    try:
        config.validate()
    except ConfigError as error:
        parser.error(str(error))
    if summary:
        print_summary(config)
        return 0
    from nin_jax import compile_cache, trainer

    try:
        compile_cache.enable(config.compile_cache)  # before JAX compiles anything
        trainer.train_and_evaluate(config, config.workdir)
    except ConfigError as error:  # found once the devices are known, e.g. a batch that does not split over them
        parser.error(str(error))
    except USER_ERRORS as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    except Interrupted as stop:
        parser.exit(stop.exit_code, f"{parser.prog}: {stop}\n")
    except KeyboardInterrupt:  # before training started, or a second Ctrl-C
        parser.exit(130, f"{parser.prog}: interrupted; the same command resumes from the latest checkpoint, if any\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
