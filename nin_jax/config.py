"""Run configuration: the reference recipe of the book's NiN chapter, and its checks.

The defaults are the book's recipe: SGD with learning rate 0.1, batch 128, 10 epochs,
Fashion-MNIST resized to 224x224. Run it with `python train.py --workdir runs/reference`.
Every field is also a flag of `train.py`, documented by the `help` text below, with its bounds
beside it; named recipes (`RECIPES`) change some defaults: `Config.from_recipe('strong', resize=96)`,
or `python train.py --recipe strong --resize 96`.
"""

import argparse
import dataclasses
import math
import numbers
import os
import reprlib
import sys
import typing
from typing import Optional

from nin_jax.models import HEADS, MIN_INPUT_SIZE, Variant
from nin_jax.ops import choices


class ConfigError(ValueError):
    """A configuration that cannot run; its message is meant for the user."""


PARALLEL_MODES = ("auto", "jit", "pmap", "sharding")
LR_SCHEDULES = ("constant", "cosine", "onecycle")
DTYPES = ("float32", "bfloat16")
WEIGHT_INITS = ("kaiming", "xavier")
CPU_KERNELS = ("tuned", "default")  # see nin_jax/ops/choices.py


# Named recipes: the defaults of `Config` that each one changes. Flags given explicitly win.
#
# reference
#     The book's `train_ch6` recipe: plain SGD at learning rate 0.1, batch 128, 10 epochs, no
#     augmentation, dropout 0.5 before the last block. Every field keeps `Config`'s default.
#
#         python train.py --workdir runs/reference                       # 224 px, on an accelerator
#         python train.py --resize 96 --workdir runs/reference_96        # the CPU-sized twin
#
#     Reaches test accuracy 0.901 at 96 px after 10 epochs, mean of 2 seeds (the README's results table).
#
# strong
#     The same network with batch normalisation after every convolution (`--batch_norm`), SGD with
#     Nesterov momentum 0.9, a one-cycle schedule that rises to a peak learning rate of 0.2 over
#     0.9 epochs and then decays, weight decay 5e-4 on the kernels and label smoothing 0.1; no
#     augmentation, dropout 0.5 before the last block. Still 10 epochs of batch 128. The probes that
#     chose it are in docs/results.md.
#
#         python train.py --recipe strong --resize 96 --workdir runs/strong_96
#
#     Reaches test accuracy 0.932 at 96 px after 10 epochs, mean of 2 seeds (the README's results table).

RECIPES: dict[str, dict] = {
    "reference": {},
    "strong": dict(
        batch_norm=True,
        learning_rate=0.2,
        momentum=0.9,
        nesterov=True,
        lr_schedule="onecycle",
        warmup_epochs=0.9,
        weight_decay=5e-4,
        label_smoothing=0.1,
    ),
}



@dataclasses.dataclass(frozen=True)
class Bounds:
    """The values a number may take: from `low` to `high`, each end included unless it is `open`.
    `zero` says what 0 means where 0 is allowed and means something ('off', 'all'); `why`, why."""

    low: float
    high: float = math.inf
    low_open: bool = False
    high_open: bool = False
    zero: str = ""
    why: str = ""

    def holds(self, value) -> bool:
        above = value > self.low if self.low_open else value >= self.low
        below = value < self.high if self.high_open else value <= self.high
        return above and below

    def words(self) -> str:
        """'positive', '0 (off) or positive', 'from 1 to 65,536', 'in [0, 1)', as a message says it."""
        if self.high == math.inf:
            if self.zero:
                return f"0 ({self.zero}) or positive"
            return "positive and finite" if self.high_open else "positive"
        if self.low_open or self.high_open:
            return f"in {'(' if self.low_open else '['}{self.low:g}, {self.high:g}{')' if self.high_open else ']'}"
        return f"from {self.low:,} to {self.high:,}{self.why}"


# Bounds on the counts that size memory or time, checked before anything is allocated: a typo of
# a few digits must end in one line, not in the kernel's out-of-memory killer.
MAX_BATCH_SIZE = 2**16  # above the 60,000 training images: a larger batch is all padding
MAX_RESIZE = 1024  # 28-pixel images; 224 is the book's, and activations grow with the square
MAX_PROCESSES = 100_000  # the runtime's coordinator holds about 200 bytes per process before any arrives
MAX_PEER_TIMEOUT_SECONDS = 24 * 3600
POSITIVE = Bounds(1)
FRACTION = Bounds(0, 1, high_open=True)


# The groups of `python train.py --help`, in its order: each field says which one it is in. The
# last four are shown by --helpfull only: what a reader of the book needs comes first.
TRAINING = "the recipe"
DATA = "data"
OUTPUTS = "workdir, logging and checkpoints"
RECIPE_PARTS = "the strong recipe's parts"
EXERCISES = "the chapter's exercises: variants of the network"
DEVICES = "several devices and hosts"
ADVANCED = "kernel choices, profiling and other advanced settings"
GROUPS = (TRAINING, DATA, OUTPUTS, RECIPE_PARTS, EXERCISES, DEVICES, ADVANCED)
SHORT_HELP_GROUPS = (TRAINING, DATA, OUTPUTS)


def _field(group: str, default, help_text: str, resume: bool = False, bounds: Optional[Bounds] = None, **extra):
    """A field with its flag's group, help text and bounds; `resume=True` for the fields that fix the
    shapes, the data order or what a step does, which a resumed run must share with its checkpoint."""
    return dataclasses.field(default=default, metadata={"group": group, "help": help_text, "resume": resume,
                                                        "bounds": bounds, **extra})


@dataclasses.dataclass(frozen=True)
class Config:
    recipe: str = _field(
        TRAINING, "reference", "a named set of defaults for the flags, which override it: reference (the book's) or "
        "strong (see RECIPES in nin_jax/config.py)", choices=tuple(RECIPES),
    )
    num_epochs: int = _field(TRAINING, 10, "passes over the training set", bounds=POSITIVE)
    batch_size: int = _field(TRAINING, 128, "global batch size, split evenly over all devices; at most 65,536",
                             resume=True, bounds=Bounds(1, MAX_BATCH_SIZE))
    learning_rate: float = _field(
        TRAINING, 0.1, "SGD learning rate; with --lr_schedule cosine or onecycle, the peak", resume=True,
        bounds=Bounds(0, math.inf, low_open=True, high_open=True),
    )
    resize: int = _field(TRAINING, 224, "images are resized (bilinear) to resize x resize; 67 to 1,024", resume=True,
                         bounds=Bounds(MIN_INPUT_SIZE, MAX_RESIZE, why=" (NiN's pools need at least 67)"))
    dtype: str = _field(
        TRAINING, "float32", "compute dtype; parameters, optimizer and loss stay float32", choices=DTYPES, resume=True,
    )
    seed: int = _field(TRAINING, 0, "seed of the initial parameters, the data order and dropout", resume=True,
                       bounds=Bounds(0, 2**32 - 1))

    data_dir: Optional[str] = _field(
        DATA, None, "tensorflow-datasets data directory; none: tfds' own, ~/tensorflow_datasets",
    )
    manual_dir: Optional[str] = _field(
        DATA, None, "folder holding the four Fashion-MNIST .gz files, for offline use; none: <data_dir>/downloads/manual",
    )
    download: bool = _field(DATA, False, "let tfds download the four files when they are not on disk (needs internet)")
    data_arrays: Optional[str] = _field(
        DATA, None, "read the data from this .npz, written by `python -m nin_jax.export_arrays` from tfds, instead of "
        "from tfds: for machines without TensorFlow",
    )
    train_examples: int = _field(DATA, 0, "train on the first N training examples only (0 = all 60,000)", resume=True,
                                 bounds=Bounds(0, zero="all"))
    eval_examples: int = _field(DATA, 0, "evaluate on the first N test examples only (0 = all 10,000)",
                                bounds=Bounds(0, zero="all"))

    workdir: Optional[str] = _field(OUTPUTS, None, "where metrics, plots and checkpoints go; none: write nothing")
    log_every_steps: int = _field(
        OUTPUTS, 0, "every N training steps, log a line with the running loss, accuracy and images/s over the "
        "epoch so far, checkpoints included (0 = off)", bounds=Bounds(0, zero="off"),
    )
    checkpoint_every_steps: int = _field(
        OUTPUTS, 0, "also checkpoint every N steps within an epoch (0 = at the end of each epoch only); needs --workdir",
        bounds=Bounds(0, zero="epoch ends only"),
    )
    keep_checkpoints: int = _field(OUTPUTS, 3, "how many of the latest checkpoints to keep in <workdir>/checkpoints",
                                   bounds=POSITIVE)

    dropout_rate: float = _field(RECIPE_PARTS, 0.5, "dropout before the last NiN block", resume=True, bounds=FRACTION)
    weight_init: str = _field(
        RECIPE_PARTS, "kaiming", "initial weights: kaiming (He fan-out, every class score starting alive) or xavier "
        "(the book's, which can stall)", choices=WEIGHT_INITS, resume=True,
    )
    batch_norm: bool = _field(
        RECIPE_PARTS, False, "batch normalisation after every convolution: a NiN variant, not the book's", resume=True,
    )
    momentum: float = _field(RECIPE_PARTS, 0.0, "SGD momentum (0 = plain SGD, the book's)", resume=True,
                             bounds=FRACTION)
    nesterov: bool = _field(RECIPE_PARTS, False, "Nesterov momentum; needs --momentum", resume=True)
    lr_schedule: str = _field(
        RECIPE_PARTS, "constant", "constant; cosine: linear warm-up from 0 over --warmup_epochs, then cosine decay to "
        "0; or onecycle: cosine rise from peak/25 over --warmup_epochs, then cosine decay to peak/250,000 (optax's "
        "one-cycle)", choices=LR_SCHEDULES, resume=True,
    )
    warmup_epochs: float = _field(
        RECIPE_PARTS, 0.0, "with --lr_schedule cosine or onecycle: epochs of rising learning rate, at most "
        "--num_epochs", resume=True,
    )
    weight_decay: float = _field(
        RECIPE_PARTS, 0.0, "L2 weight decay on the kernels, added to the gradient (0 = off)", resume=True,
        bounds=Bounds(0, math.inf, high_open=True, zero="off"),
    )
    label_smoothing: float = _field(
        RECIPE_PARTS, 0.0, "training targets put this much probability evenly on all classes (0 = off)", resume=True,
        bounds=FRACTION,
    )

    inner_convs: int = _field(
        EXERCISES, 2, "convolutions after the first of each NiN block, each with its ReLU (the book's 2); at most 8",
        resume=True, bounds=Bounds(1, 8),
    )
    inner_kernel_size: int = _field(
        EXERCISES, 1, "kernel size of the convolutions after the first of each NiN block (the book's 1x1), padded to "
        "keep the map's size: 1, 3 or 5", resume=True,
        choices=(1, 3, 5),
    )
    class_width: int = _field(
        EXERCISES, 0, "channels of the last block's first two convolutions, whose last one emits the class maps (0 = "
        "one per class, the book's: 384 channels become 10 in one step); at most 4,096", resume=True,
        bounds=Bounds(0, 4096),
    )
    head: str = _field(
        EXERCISES, "avg", "what turns each class map into a score: avg (the book's global average pool), max (a global "
        "max pool) or dense (flatten and a fully connected layer, which fixes the input size to --resize)",
        choices=tuple(HEADS), resume=True,
    )

    parallel: str = _field(
        DEVICES, "auto",
        "auto, jit, pmap or sharding (jit over a device mesh); auto is sharding when there is more than one device",
        choices=PARALLEL_MODES,
    )
    distributed: bool = _field(
        DEVICES, False, "start jax.distributed from the environment (TPU pod slices, SLURM, ...), one process per host",
    )
    coordinator_address: Optional[str] = _field(
        DEVICES, None, "host:port of process 0, to start jax.distributed by hand with --num_processes and --process_id",
    )
    num_processes: int = _field(DEVICES, 1, "with --coordinator_address: how many processes take part, at most 100,000",
                                bounds=Bounds(1, MAX_PROCESSES))
    process_id: int = _field(DEVICES, 0, "with --coordinator_address: this process's rank, 0 .. num_processes-1")
    peer_timeout_seconds: int = _field(
        DEVICES, 60, "with several processes: a process not heard from for this long, at the start too, is taken for "
        "dead, and the others stop with one line; at most 86,400 (a day)",
        bounds=Bounds(1, MAX_PEER_TIMEOUT_SECONDS, why=" (a day)"),
    )

    cpu_kernels: str = _field(
        ADVANCED, "tuned", "on a CPU: tuned (XLA's own convolutions and dots, YNNPACK's reductions: measured fastest for "
        "NiN, see nin_jax/ops/choices.py) or default (XLA's choice); no effect on GPU, TPU or with --parallel pmap",
        choices=CPU_KERNELS,
    )
    deterministic: bool = _field(
        ADVANCED, False, "on a GPU: XLA's deterministic kernels (--xla_gpu_deterministic_ops=true in XLA_FLAGS, set "
        "before JAX starts), so that a run, and a resumed run, repeat bit for bit; slower (docs/accelerators.md). "
        "CPUs and TPUs repeat without it",
    )
    max_pool: str = _field(
        ADVANCED, "auto", "how the max-pools are computed: slices (strided slices with their own gradient, measured "
        "faster on a CPU), indexed (the slices, keeping each window's maximum position for the gradient) or "
        "reduce_window (flax's nn.max_pool); auto: slices on a CPU, indexed on a GPU, reduce_window on a TPU. "
        "The same function either way (see nin_jax/ops/choices.py)", choices=choices.CHOICES["max_pool"],
    )
    conv1x1: str = _field(
        ADVANCED, "auto", "how the 1x1 convolutions are computed: dot (over channels, measured faster on a CPU) or "
        "conv; auto: dot on a CPU, conv elsewhere. The same function and parameters either way (see "
        "nin_jax/ops/choices.py)", choices=choices.CHOICES["conv1x1"],
    )
    pool_order: str = _field(
        ADVANCED, "auto", "where the last ReLU of blocks 1 to 3 runs: relu_then_pool (the book's order, measured "
        "faster on a CPU) or pool_then_relu (after the max-pool, on a quarter of the elements: fewer bytes on a GPU); "
        "auto: relu_then_pool on a CPU and a TPU, pool_then_relu on a GPU. The same function either way (they "
        "commute)", choices=choices.CHOICES["pool_order"],
    )
    compile_cache: Optional[str] = _field(
        ADVANCED, None, "folder of the persistent compilation cache, which spares later runs the compiling; none: "
        "$JAX_COMPILATION_CACHE_DIR, else ~/.cache/nin_jax/jax; off: no cache",
    )
    profile_steps: int = _field(
        ADVANCED, 0, "trace N training steps after the first with jax.profiler into <workdir>/profile, for "
        "TensorBoard's profile plugin or Perfetto (0 = off); needs --workdir", bounds=Bounds(0, zero="off"),
    )

    @classmethod
    def from_recipe(cls, name: str, **overrides) -> "Config":
        """The named recipe's config, with `overrides` on top."""
        _check_choice("recipe", name)
        return cls(**{**RECIPES[name], "recipe": name, **overrides})

    @property
    def variant(self) -> Variant:
        """The network's variant (`--inner_convs`, `--inner_kernel_size`, `--class_width`, `--head`)."""
        return Variant(self.inner_convs, self.inner_kernel_size, self.class_width, self.head)

    @property
    def kernels(self) -> choices.Kernels:
        """Which kernels compute the model's layers (`--max_pool`, `--conv1x1`, `--pool_order`)."""
        return choices.Kernels(self.max_pool, self.conv1x1, self.pool_order)

    def validate(self) -> "Config":
        """Raises ConfigError for values that cannot work, each against the bounds or choices of its
        field, then those that depend on each other; returns self."""
        _check_types(self)
        for field in dataclasses.fields(Config):
            value, bounds = getattr(self, field.name), field.metadata["bounds"]
            if "choices" in field.metadata:
                _check_choice(field.name, value)
            if bounds and not bounds.holds(value):
                raise ConfigError(f"--{field.name} must be {bounds.words()}, got {value}")
        for name in PATH_FIELDS:
            check_path(name, getattr(self, name))
        if self.coordinator_address is not None:
            check_address("coordinator_address", self.coordinator_address)
        if self.coordinator_address and not 0 <= self.process_id < self.num_processes:
            raise ConfigError(f"--process_id must be in [0, {self.num_processes}), got {self.process_id}")
        if not 0 <= self.warmup_epochs <= self.num_epochs:
            raise ConfigError(f"--warmup_epochs must be in [0, --num_epochs={self.num_epochs}], got {self.warmup_epochs}")
        if self.nesterov and not self.momentum:
            raise ConfigError("--nesterov needs a --momentum above 0")
        return self

    def preflight(self, workdir: Optional[str]) -> "Config":
        """`validate`, and the flags that need a workdir, for a run that writes into `workdir`: every
        check of the config before a run starts (the devices' and the workdir's follow in the trainer)."""
        self.validate()
        for name, what in (("checkpoint_every_steps", "its checkpoints"), ("profile_steps", "the trace")):
            if getattr(self, name) and not workdir:
                raise ConfigError(f"--{name} needs a --workdir to write {what} into")
        if self.deterministic and not choices.is_deterministic():
            raise ConfigError(f"--deterministic needs {choices.DETERMINISTIC_XLA_FLAG} in XLA_FLAGS before JAX starts: "
                              f"call nin_jax.ops.choices.make_deterministic() first, as train.py does")
        return self


PATH_FIELDS = ("workdir", "data_dir", "manual_dir", "data_arrays", "compile_cache")


def check_address(flag: str, address: str) -> None:
    """Refuses an address that is not host:port, which JAX's runtime would take apart with an
    IndexError, or try to bind and reach for minutes."""
    host, colon, port = address.rpartition(":")
    host = host[1:-1] if host.startswith("[") and host.endswith("]") else host  # [fe80::1]:1234
    if not colon or not host or not port.isdigit() or any(character.isspace() for character in address):
        raise ConfigError(f"--{flag} {address} is not host:port (such as 10.0.0.1:1234 or [fe80::1]:1234)")
    if not 1 <= int(port) <= 65535:
        raise ConfigError(f"--{flag} {address}: the port must be from 1 to 65535")


def check_path(flag: str, path: Optional[str], required: bool = False) -> None:
    """Refuses a path flag that is empty (what an unset shell variable gives), or that is not UTF-8
    text: under a C locale without Python's UTF-8 mode a non-ASCII path arrives as undecodable
    bytes, which Python's own file functions take but orbax, tensorstore and TensorFlow do not, so
    the run would train and then fail to save, or call a good checkpoint damaged."""
    if path is None:
        return
    if not path.strip():
        raise ConfigError(f"--{flag} is empty (an unset shell variable?); give a path"
                          f"{'' if required else ', or leave the flag out'}")
    absolute = os.path.abspath(path)
    try:
        absolute.encode("utf-8")
    except UnicodeEncodeError:
        shown = os.fsencode(absolute).decode("utf-8", "backslashreplace")
        raise ConfigError(f"--{flag} {shown} is not UTF-8 text to this process (its file names are "
                          f"{sys.getfilesystemencoding()}, from the locale), so orbax cannot save there; run under a "
                          f"UTF-8 locale (LC_ALL=C.UTF-8) or with PYTHONUTF8=1, or use an ASCII path") from None


# Options that earlier versions had and this one has not, with their off values: a run that had
# them off is a run of this version (its config.json and checkpoints still name them).
REMOVED_OPTIONS = {"augment": False, "random_erasing": 0.0, "ema_decay": 0.0, "test_time_flips": False}
RESUME_FIELDS = tuple(field.name for field in dataclasses.fields(Config) if field.metadata["resume"])
# Options that this version added, with their defaults, the book's NiN that earlier versions ran: a
# checkpoint's record holds one only where it differs, so one that lacks it is a run at its default.
ADDED_OPTIONS = {name: Config.__dataclass_fields__[name].default
                 for name in ("inner_convs", "inner_kernel_size", "class_width", "head")}


def _check_types(config: Config) -> None:
    """Refuses a field whose value is not of the field's type: a Config made from a file
    (config.json, which anyone can edit) or by a Python caller, not from the flags."""
    for field in dataclasses.fields(Config):
        value, kind = getattr(config, field.name), _flag_type(field)
        if value is None and typing.get_origin(typing.get_type_hints(Config)[field.name]) is typing.Union:
            continue
        wanted = {bool: (bool, "true or false"), int: (numbers.Integral, "an integer"), float: (numbers.Real, "a number"),
                  str: (str, "a string")}[kind]
        if not isinstance(value, wanted[0]) or (kind is not bool and isinstance(value, bool)):
            raise ConfigError(f"--{field.name} must be {wanted[1]}, got {reprlib.repr(value)}")


def _check_choice(name: str, value: str) -> None:
    """Refuses a value outside the field's `choices` (argparse does so for flags; this is for Python callers)."""
    choices = Config.__dataclass_fields__[name].metadata["choices"]
    if value not in choices:
        raise ConfigError(f"--{name} must be one of {', '.join(map(str, choices))}, got {value!r}")


class FlagParser(argparse.ArgumentParser):
    """An argparse parser whose --help gives each flag's default, and whose wrong flags end with one
    line, not the usage block. A required flag has no default to give: `required`."""

    def __init__(self, **kwargs):
        super().__init__(formatter_class=argparse.ArgumentDefaultsHelpFormatter, **kwargs)

    def required(self, flag: str, help_text: str, **kwargs) -> None:
        self.add_argument(flag, required=True, default=argparse.SUPPRESS, help=help_text, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")

    def check_paths(self, values: typing.Mapping[str, Optional[str]], *flags: str) -> None:
        """Ends with one line when one of the path `flags` has an empty or non-UTF-8 value
        (`check_path`); `values` are the parsed flags, by name."""
        required = {action.dest for action in self._actions if action.required}
        for flag in flags:
            try:
                check_path(flag, values[flag], required=flag in required)
            except ConfigError as error:
                self.error(str(error))


def _flag_type(field: dataclasses.Field):
    hint = typing.get_type_hints(Config)[field.name]
    return typing.get_args(hint)[0] if typing.get_origin(hint) is typing.Union else hint


class _FullHelp(argparse.Action):
    """--helpfull: --help with the flags that --help leaves out."""

    def __init__(self, option_strings, dest, hidden: dict, **kwargs):
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, **kwargs)
        self.hidden = hidden

    def __call__(self, parser, namespace, values, option_string=None):
        for action, text in self.hidden.items():
            action.help = text
        parser.print_help()
        parser.exit()


def add_config_flags(parser: argparse.ArgumentParser, names: Optional[typing.Collection[str]] = None) -> dict:
    """One flag per Config field, with the field's default and help text, in the field's group: the
    flags of `train.py`, whose --help shows the groups a reader of the book needs and --helpfull all
    of them. With `names`, the flags of those fields only, all shown by --help: `python -m
    nin_jax.plan` takes those that shape the steps it compiles. Returns the groups by title."""
    groups = {title: parser.add_argument_group(title) for title in GROUPS}
    hidden = {}
    for field in dataclasses.fields(Config):
        if names is not None and field.name not in names:
            continue
        flag_type = _flag_type(field)
        group = groups[field.metadata["group"]]
        kwargs = dict(default=field.default, help=field.metadata["help"])
        if flag_type is bool:
            action = group.add_argument(f"--{field.name}", action=argparse.BooleanOptionalAction, **kwargs)
        else:
            action = group.add_argument(f"--{field.name}", type=flag_type, choices=field.metadata.get("choices"),
                                        **kwargs)
        if names is None and field.metadata["group"] not in SHORT_HELP_GROUPS:
            hidden[action], action.help = action.help, argparse.SUPPRESS
    if hidden:
        parser.add_argument("--helpfull", action=_FullHelp, hidden=hidden,
                            help="show the help of every flag, and exit: also " + "; ".join(GROUPS[len(SHORT_HELP_GROUPS):]))
    return groups


def parse_flags(parser: argparse.ArgumentParser, argv=None) -> tuple[Config, dict]:
    """The Config that the flags ask for (the --recipe's values as defaults, then the flags given,
    which win) and the parser's other flags; a config that cannot run ends with the parser's error."""
    first_pass = FlagParser(prog=parser.prog, add_help=False)  # so that --help shows the recipe's defaults
    first_pass.add_argument("--recipe", choices=tuple(RECIPES), default="reference")
    parser.set_defaults(**RECIPES[first_pass.parse_known_args(argv)[0].recipe])
    flags = vars(parser.parse_args(argv))
    config = Config(**{field.name: flags.pop(field.name) for field in dataclasses.fields(Config) if field.name in flags})
    try:
        config.validate()
    except ConfigError as error:
        parser.error(str(error))
    return config, flags
