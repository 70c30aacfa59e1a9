"""Writes Fashion-MNIST, as tfds builds it, to one .npz that `train.py --data_arrays` reads
without TensorFlow, e.g. on an accelerator machine that has JAX but neither TensorFlow nor tfds:

    python -m nin_jax.export_arrays --manual_dir ../shared/data/fashion_mnist --out fashion_mnist.npz
"""

from nin_jax.runtime import commands, errors, files
from nin_jax.data import data_arrays, dataset
from nin_jax.config import FlagParser


def main(argv=None) -> int:
    parser = FlagParser(prog="python -m nin_jax.export_arrays", description=__doc__.split("\n\n")[0])
    parser.required("--out", "the .npz to write")
    parser.add_argument("--data_dir", default=None, help="tensorflow-datasets data directory (default: tfds' own)")
    parser.add_argument("--manual_dir", default=None, help="folder holding the four Fashion-MNIST .gz files")
    args = parser.parse_args(argv)
    parser.check_paths(vars(args), "out", "data_dir", "manual_dir")
    if not args.out.endswith(".npz"):
        parser.error(f"--out {args.out} must end in .npz (the file that --data_arrays then reads)")
    errors.quiet_library_logs()
    with commands.stops_in_one_line(parser.prog, f"{args.out} is as it was"):
        try:
            files.check_writable(args.out)  # before the dataset is built or read
            datasets = dataset.load_fashion_mnist(args.data_dir, args.manual_dir)
            data_arrays.save(datasets, args.out)
        except (errors.DataError, errors.OutputError) as error:
            parser.exit(1, f"{parser.prog}: error: {error}\n")
    print(f"wrote {args.out}: {len(datasets['train']):,} training and {len(datasets['test']):,} test examples")
    return 0

