"""Where XLA's CPU time goes in NiN's k x k convolutions, and what the levers tried for them did.

    python benchmarks/conv_levers.py --batch_size 32
    python benchmarks/conv_levers.py --batch_size 32 --layers conv5 --cpu_kernels default

For the stem (11x11/4 on 1 channel), the 5x5, the first 3x3 and a 1x1 convolution at 224 px, it times the
forward pass, the weight gradient (dW) and the input gradient (dx) of:
  * xla: `lax.conv_general_dilated`, what `nn.Conv` runs, compiled for `--cpu_kernels`
    (tuned: XLA's Eigen kernels; default: XLA's choice, YNNPACK in jaxlib 0.10);
  * im2col: the patches cut with slices (not a convolution) and one matrix product;
  * for the stem, also space-to-depth (a 3x3 convolution over 4x4 blocks, 16 channels) and the
    XLA forward with an im2col weight gradient (custom VJP);
and, with torch installed, the same layer in PyTorch (forward, and forward + both gradients).
Each figure is the median of several timings, in ms; every variant is checked against xla.
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from common import add_layer_timing_flags, median_ms, torch_module_ms, write_json

DIMENSIONS = ("NHWC", "HWIO", "NHWC")
# name: (input size, in channels, out channels, kernel, stride, padding) at 224 px.
LAYERS = {"stem": (224, 1, 96, 11, 4, 0), "conv5": (26, 96, 256, 5, 1, 2), "conv3": (12, 256, 384, 3, 1, 1),
          "conv1x1": (54, 96, 96, 1, 1, 0)}  # block 1's 1x1 convolutions: there im2col is a plain dot, i.e. nn.Dense


def xla_conv(x, w, stride, pad):
    return lax.conv_general_dilated(x, w, (stride, stride), ((pad, pad), (pad, pad)), dimension_numbers=DIMENSIONS)


def patches(x, kernel, stride, pad, out_size):
    """[B, H, W, C] -> [B, out, out, k*k*C], cut with strided slices."""
    x = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    end = stride * (out_size - 1) + 1
    return jnp.concatenate(
        [x[:, i : i + end : stride, j : j + end : stride, :] for i in range(kernel) for j in range(kernel)], axis=-1
    )


def im2col_conv(x, w, stride, pad):
    out_size = (x.shape[1] + 2 * pad - w.shape[0]) // stride + 1
    return patches(x, w.shape[0], stride, pad, out_size) @ w.reshape(-1, w.shape[-1])


def space_to_depth_stem(x, w, stride, pad):
    """The stride-4 stem as a stride-1 convolution over 4x4 blocks; the kernel is zero-padded to 12x12."""
    assert stride == 4 and pad == 0
    blocks = -(-w.shape[0] // 4)
    w = jnp.pad(w, ((0, 4 * blocks - w.shape[0]), (0, 4 * blocks - w.shape[1]), (0, 0), (0, 0)))
    w = w.reshape(blocks, 4, blocks, 4, -1, w.shape[-1]).transpose(0, 2, 1, 3, 4, 5)
    w = w.reshape(blocks, blocks, -1, w.shape[-1])
    size = 4 * ((x.shape[1] - 4 * blocks + 1) // 4 + blocks)
    b, c = x.shape[0], x.shape[-1]
    x = x[:, :size, :size].reshape(b, size // 4, 4, size // 4, 4, c).transpose(0, 1, 3, 2, 4, 5)
    return xla_conv(x.reshape(b, size // 4, size // 4, 16 * c), w, 1, 0)


def im2col_weight_grad(stride, pad):
    """XLA's convolution forward and input gradient, with the weight gradient as one matrix product."""

    @jax.custom_vjp
    def conv(x, w):
        return xla_conv(x, w, stride, pad)

    def forward(x, w):
        return conv(x, w), (x, w)

    def backward(residuals, g):
        x, w = residuals
        dw = jnp.einsum("bhwk,bhwd->kd", patches(x, w.shape[0], stride, pad, g.shape[1]), g).reshape(w.shape)
        return jax.vjp(lambda x: xla_conv(x, w, stride, pad), x)[1](g)[0], dw

    conv.defvjp(forward, backward)
    return lambda x, w, stride_, pad_: conv(x, w)


def time_variant(conv, x, w, g, stride, pad, repeats: int, cpu_kernels: str) -> dict[str, float]:
    f = lambda x, w: conv(x, w, stride, pad)  # noqa: E731
    result = {
        "fwd": median_ms(f, (x, w), repeats, cpu_kernels),
        "dW": median_ms(lambda x, w, g: jax.vjp(lambda w: f(x, w), w)[1](g)[0], (x, w, g), repeats, cpu_kernels),
    }
    if x.shape[-1] > 1:  # the stem's input is the image, whose gradient training never needs
        result["dx"] = median_ms(lambda x, w, g: jax.vjp(lambda x: f(x, w), x)[1](g)[0], (x, w, g), repeats, cpu_kernels)
    return result


def time_torch(layer, batch_size: int, threads: int, repeats: int) -> dict[str, float]:
    import torch

    torch.set_num_threads(threads)
    size, cin, cout, kernel, stride, pad = LAYERS[layer]
    conv = torch.nn.Conv2d(cin, cout, kernel, stride, pad)
    x = torch.randn(batch_size, cin, size, size, requires_grad=cin > 1)
    return torch_module_ms(conv, x, torch.randn_like(conv(x)), repeats, "fwd+dW+dx")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--layers", nargs="+", default=list(LAYERS), choices=tuple(LAYERS))
    add_layer_timing_flags(parser)
    args = parser.parse_args()
    results = {}
    key_x, key_w, key_g = jax.random.split(jax.random.key(0), 3)
    for layer in args.layers:
        size, cin, cout, kernel, stride, pad = LAYERS[layer]
        out_size = (size + 2 * pad - kernel) // stride + 1
        x = jax.random.uniform(key_x, (args.batch_size, size, size, cin))
        w = jax.random.normal(key_w, (kernel, kernel, cin, cout)) / np.sqrt(kernel * kernel * cin)
        g = jax.random.normal(key_g, (args.batch_size, out_size, out_size, cout))
        variants = {"xla": xla_conv, "im2col": im2col_conv}
        if layer == "stem":
            variants.update({"space_to_depth": space_to_depth_stem, "im2col_dW": im2col_weight_grad(stride, pad)})
        expected = xla_conv(x, w, stride, pad)
        expected_dw = jax.grad(lambda w: jnp.vdot(xla_conv(x, w, stride, pad), g))(w)
        for name, conv in variants.items():
            out = conv(x, w, stride, pad)
            dw = jax.grad(lambda w: jnp.vdot(conv(x, w, stride, pad), g))(w)
            np.testing.assert_allclose(out, expected, rtol=1e-4, atol=1e-4 * float(jnp.abs(expected).max()))
            np.testing.assert_allclose(dw, expected_dw, rtol=1e-3, atol=1e-4 * float(jnp.abs(expected_dw).max()))
            results[f"{layer}/{name}"] = time_variant(conv, x, w, g, stride, pad, args.repeats, args.cpu_kernels)
            print(f"{layer:<6} {name:<15} " + "  ".join(f"{k} {v:8.1f}" for k, v in results[f"{layer}/{name}"].items()),
                  flush=True)
        try:
            results[f"{layer}/torch"] = time_torch(layer, args.batch_size, args.threads, args.repeats)
            print(f"{layer:<6} {'torch':<15} " + "  ".join(f"{k} {v:8.1f}" for k, v in results[f"{layer}/torch"].items()))
        except ImportError:
            pass
    write_json(args.out, {"args": vars(args), "ms": results})


if __name__ == "__main__":
    main()
