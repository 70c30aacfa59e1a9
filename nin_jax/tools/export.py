"""Writes a trained NiN as one file that runs with JAX alone: no flax, optax, orbax or nin_jax,
with only `jax`, `numpy` and `flatbuffers` installed (`pip install jax numpy flatbuffers`).

    python -m nin_jax.export --workdir runs/quick --out nin.jax_exported

The file is `jax.export`'s serialized StableHLO of the evaluation forward pass with the trained
parameters (and batch-norm statistics) inside it: uint8 Fashion-MNIST images [B, 28, 28, 1] in,
for any B, float32 logits [B, 10] out, resized inside as training did. It is lowered for CPUs,
CUDA GPUs and TPUs; a JAX at least as new as the one that wrote it loads it. To use it:

    import numpy as np
    from jax import export

    with open("nin.jax_exported", "rb") as f:
        classify = export.deserialize(bytearray(f.read()))
    logits = classify.call(images)  # images: np.uint8 [B, 28, 28, 1]; np.argmax(logits, -1) is the class
"""

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import export as jax_export  # a submodule that older JAX does not import with `jax`

from nin_jax.runtime import commands, errors, files
from nin_jax import input_pipeline
from nin_jax.tools import predict
from nin_jax.config import Config, FlagParser

PLATFORMS = ("cpu", "cuda", "tpu")
# What loading the file needs, and all it needs (the README names them): `export.deserialize` reads
# the file with flatbuffers, which jax itself does not install.
LOADING_NEEDS = ("jax", "numpy", "flatbuffers")


def export_classifier(config: Config, variables: predict.Variables,
                      platforms: tuple[str, ...] = PLATFORMS) -> jax_export.Exported:
    """The forward pass with `variables` as constants, for a symbolic batch size, lowered for
    `platforms`. The max-pools and 1x1 convolutions are XLA's plain ops, which every platform runs
    well (the CPU's tuned levers compute the same function)."""
    config = dataclasses.replace(config, max_pool="reduce_window", conv1x1="conv")
    classify = jax.jit(functools.partial(predict.forward(config), variables))
    (batch,) = jax_export.symbolic_shape("batch")
    images = jax.ShapeDtypeStruct((batch, *input_pipeline.IMAGE_SHAPE), jnp.uint8)
    return jax_export.export(classify, platforms=platforms)(images)


def export_workdir(workdir: str, out: str) -> jax_export.Exported:
    """Writes the classifier of the latest checkpoint in `workdir` to `out`, whole or not at all."""
    config, variables = predict.restore_variables(workdir)
    exported = export_classifier(config, variables)
    with files.replace(out, "wb") as f:
        f.write(exported.serialize())
    return exported


def main(argv=None) -> int:
    parser = FlagParser(prog="python -m nin_jax.export", description=__doc__.split("\n\n")[0])
    parser.required("--workdir", "the workdir of a training run (train.py --workdir)")
    parser.required("--out", "the file to write")
    args = parser.parse_args(argv)
    parser.check_paths(vars(args), "workdir", "out")
    errors.quiet_library_logs()
    with commands.stops_in_one_line(parser.prog, f"{args.out} is as it was"):
        try:
            files.check_writable(args.out)  # before the checkpoint is read
            exported = export_workdir(args.workdir, args.out)
        except (errors.WorkdirError, errors.OutputError) as error:
            parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"wrote {args.out}: uint8 images [B, {', '.join(map(str, input_pipeline.IMAGE_SHAPE))}] in, "
          f"float32 logits [B, {input_pipeline.NUM_CLASSES}] out, for {', '.join(exported.platforms)}; classes "
          f"0 to 9: {', '.join(input_pipeline.CLASS_NAMES)}")
    return 0

