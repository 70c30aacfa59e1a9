"""Writes Fashion-MNIST, as tfds builds it, to one .npz that `train.py --data_arrays` reads
without TensorFlow, e.g. on an accelerator machine that has JAX but neither TensorFlow nor tfds:

    python -m nin_jax.export_arrays --manual_dir ../shared/data/fashion_mnist --out fashion_mnist.npz
"""

import argparse

from nin_jax import data_arrays, dataset, errors


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="the .npz to write")
    parser.add_argument("--data_dir", default=None, help="tensorflow-datasets data directory (default: tfds' own)")
    parser.add_argument("--manual_dir", default=None, help="folder holding the four Fashion-MNIST .gz files")
    args = parser.parse_args(argv)
    try:
        datasets = dataset.load_fashion_mnist(args.data_dir, args.manual_dir)
    except errors.DataError as error:
        parser.exit(1, f"{parser.prog}: error: {error}\n")
    data_arrays.save(datasets, args.out)
    print(f"wrote {args.out}: {len(datasets['train']):,} training and {len(datasets['test']):,} test examples")


if __name__ == "__main__":
    main()
