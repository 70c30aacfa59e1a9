"""What NiN's three 3x3/2 max-pools cost in a training step, as `nn.max_pool` and as `pooling.max_pool_slices`.

    python benchmarks/pool_levers.py --batch_size 32

At the pool shapes of a 224 px image it times the forward pass and the forward + input gradient
of `nn.max_pool` (XLA's reduce_window, whose gradient is select_and_scatter) and of
`nin_jax.ops.pooling.max_pool_slices` (strided slices, a first-maximum gradient), and, with torch
installed, PyTorch's `MaxPool2d`. Each figure is the median of several timings, in ms; the
outputs and gradients of the two JAX versions are checked against each other first.
"""

import argparse

import flax.linen as nn
import jax
import numpy as np

from common import add_layer_timing_flags, median_ms, torch_module_ms, write_json
from nin_jax.ops import pooling

# name: (input size, channels) of the pools' inputs at 224 px.
POOLS = {"pool1": (54, 96), "pool2": (26, 256), "pool3": (12, 384)}
VARIANTS = {
    "nn.max_pool": lambda x: nn.max_pool(x, (3, 3), (2, 2), "VALID"),
    "pooling": lambda x: pooling.max_pool_slices(x, 3, 2),
}


def time_jax(pool, x, g, repeats: int, cpu_kernels: str) -> dict[str, float]:
    return {
        "fwd": median_ms(pool, (x,), repeats, cpu_kernels),
        "fwd+dx": median_ms(lambda x, g: jax.vjp(pool, x)[1](g)[0], (x, g), repeats, cpu_kernels),
    }


def time_torch(x: np.ndarray, threads: int, repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    x = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    pool = torch.nn.MaxPool2d(3, stride=2)
    return torch_module_ms(pool, x, torch.randn_like(pool(x)), repeats, "fwd+dx")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pools", nargs="+", default=list(POOLS), choices=tuple(POOLS))
    add_layer_timing_flags(parser)
    args = parser.parse_args()
    results = {}
    key_x, key_g = jax.random.split(jax.random.key(0))
    for name in args.pools:
        size, channels = POOLS[name]
        out_size = (size - 3) // 2 + 1
        # The pools follow ReLUs: about half the inputs are zeros, and windows hold ties.
        x = jax.nn.relu(jax.random.normal(key_x, (args.batch_size, size, size, channels)))
        g = jax.random.normal(key_g, (args.batch_size, out_size, out_size, channels))
        outputs = {variant: jax.vjp(pool, x) for variant, pool in VARIANTS.items()}
        (expected, expected_vjp), (pooled, pooled_vjp) = outputs.values()
        np.testing.assert_array_equal(pooled, expected)
        np.testing.assert_allclose(pooled_vjp(g)[0], expected_vjp(g)[0], rtol=1e-5, atol=1e-5)
        for variant, pool in VARIANTS.items():
            results[f"{name}/{variant}"] = time_jax(pool, x, g, args.repeats, args.cpu_kernels)
        try:
            results[f"{name}/torch"] = time_torch(np.asarray(x), args.threads, args.repeats)
        except ImportError:
            pass
        for variant in ("nn.max_pool", "pooling", "torch"):
            if f"{name}/{variant}" in results:
                print(f"{name:<6} {variant:<12} " + "  ".join(f"{k} {v:8.1f}" for k, v in results[f"{name}/{variant}"].items()),
                      flush=True)
    write_json(args.out, {"args": vars(args), "ms": results})


if __name__ == "__main__":
    main()
