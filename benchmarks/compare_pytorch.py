"""The book's PyTorch NiN training step against nin_jax's, side by side in one process.

    pip install torch==2.13.0            # optional; only this script needs it
    python benchmarks/compare_pytorch.py --resize 224 --batch_size 128 --threads 2
    python benchmarks/compare_pytorch.py --device gpu --dtype bfloat16   # on a machine with an NVIDIA GPU
    python benchmarks/compare_pytorch.py --device gpu --dtype bfloat16 --pytorch book tuned compiled

Both train with SGD (lr 0.1) and cross-entropy on the same batch size, image size, device and
dtype: float32 against float32, or nin_jax's bfloat16 against torch's bfloat16 autocast. On the
CPU, XLA uses every core; torch is given as many threads (`--threads`, default: all cores). The
timing windows alternate A B C ... so that all see the same machine noise (`common.alternate`);
the result is the ratio of the median images/s, each with its slowest and fastest window.
`--pytorch` names the PyTorch steps: `book`, the book's code as written; `tuned`, the same net in
channels_last with cudnn.benchmark (what a PyTorch user tunes first); `compiled`, the tuned one
under `torch.compile`. Each waits for its device once per window, not per step.
"""

import argparse
import os
import sys

from nin_jax.config import CPU_KERNELS, DTYPES


def book_net(num_classes: int = 10):
    """The book's PyTorch NiN (d2l chapter 'Network in Network'), with its Xavier init."""
    from torch import nn

    def nin_block(in_channels, out_channels, kernel_size, strides, padding):
        return nn.Sequential(
            nn.Conv2d(in_channels, out_channels, kernel_size, strides, padding), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU(),
            nn.Conv2d(out_channels, out_channels, kernel_size=1), nn.ReLU())

    net = nn.Sequential(
        nin_block(1, 96, kernel_size=11, strides=4, padding=0),
        nn.MaxPool2d(3, stride=2),
        nin_block(96, 256, kernel_size=5, strides=1, padding=2),
        nn.MaxPool2d(3, stride=2),
        nin_block(256, 384, kernel_size=3, strides=1, padding=1),
        nn.MaxPool2d(3, stride=2),
        nn.Dropout(0.5),
        nin_block(384, num_classes, kernel_size=3, strides=1, padding=1),
        nn.AdaptiveAvgPool2d((1, 1)),
        nn.Flatten())

    def init_weights(m):
        if type(m) in (nn.Linear, nn.Conv2d):
            nn.init.xavier_uniform_(m.weight)

    net.apply(init_weights)
    return net


TORCH_DEVICES = {"cpu": "cpu", "gpu": "cuda"}


def torch_step_fn(resize: int, batch_size: int, learning_rate: float, dtype: str = "float32", device: str = "cpu",
                  variant: str = "book"):
    """One training step of the book's `train_ch6` on a fixed batch of already-resized images, on
    `device`, as `variant` says (see the module's docstring); with dtype bfloat16 under torch's
    autocast (bf16 compute, float32 parameters). The step returns its loss, without waiting."""
    import torch

    device = TORCH_DEVICES[device]
    tuned = variant in ("tuned", "compiled")
    memory_format = torch.channels_last if tuned else torch.contiguous_format
    net = book_net().to(device, memory_format=memory_format)
    net.train()
    forward = torch.compile(net) if variant == "compiled" else net
    optimizer = torch.optim.SGD(net.parameters(), lr=learning_rate)
    loss_fn = torch.nn.CrossEntropyLoss()
    generator = torch.Generator().manual_seed(0)
    images = torch.rand(batch_size, 1, resize, resize, generator=generator).to(device, memory_format=memory_format)
    labels = torch.randint(0, 10, (batch_size,), generator=generator).to(device)

    def step():
        torch.backends.cudnn.benchmark = tuned  # a global setting: each variant's own, whatever ran before it
        optimizer.zero_grad()
        with torch.autocast(device, torch.bfloat16, enabled=dtype == "bfloat16"):
            loss = loss_fn(forward(images), labels)
        loss.backward()
        optimizer.step()
        return loss

    return step


def torch_wait(device: str):
    """A function of a step's result that waits for everything queued on torch's `device` (the
    CPU runs torch's steps as they are called)."""
    import torch

    return (lambda result: torch.cuda.synchronize()) if device == "gpu" else (lambda result: None)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resize", type=int, default=224)
    parser.add_argument("--batch_size", type=int, default=128)
    parser.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    parser.add_argument("--dtype", default="float32", choices=DTYPES,
                        help="compute dtype of both: nin_jax's --dtype, torch's bfloat16 autocast")
    parser.add_argument("--device", default="cpu", choices=tuple(TORCH_DEVICES),
                        help="where both run: the CPU, or the first NVIDIA GPU (JAX's gpu, torch's cuda)")
    parser.add_argument("--cpu_kernels", default="tuned", choices=CPU_KERNELS,
                        help="nin_jax's --cpu_kernels (nin_jax/ops/choices.py)")
    parser.add_argument("--pytorch", nargs="+", default=["book"], choices=("book", "tuned", "compiled"),
                        help="one or more PyTorch steps to time beside nin_jax's (see above)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps of each (torch needs several)")
    parser.add_argument("--rounds", type=int, default=5, help="A B rounds of timing windows; medians are reported")
    parser.add_argument("--steps", type=int, default=2, help="steps per timing window")
    parser.add_argument("--out", default="", help="write the results as JSON here")
    args = parser.parse_args()
    try:
        import torch
    except ImportError:
        sys.exit("compare_pytorch.py needs PyTorch: pip install torch==2.13.0")
    torch.set_num_threads(args.threads)
    if args.device == "cpu":
        os.environ["JAX_PLATFORMS"] = "cpu"  # before JAX starts: on a machine with a GPU, JAX would pick it
    import jax

    if args.device == "gpu" and jax.default_backend() != "gpu":
        sys.exit(f"compare_pytorch.py --device gpu: JAX finds no GPU here (it computes on {jax.default_backend()})")
    if args.device == "gpu" and not torch.cuda.is_available():
        sys.exit("compare_pytorch.py --device gpu: this torch has no CUDA; install a CUDA build of torch")

    from common import Contender, alternate, images_per_sec, write_json
    from nin_jax.config import Config
    from step_throughput import nin_jax_steps

    wait_for_torch = torch_wait(args.device)
    contenders = [Contender(f"pytorch {variant}", torch_step_fn(args.resize, args.batch_size, 0.1, args.dtype, args.device,
                                                                 variant), wait_for_torch) for variant in args.pytorch]
    config = Config(resize=args.resize, batch_size=args.batch_size, learning_rate=0.1, dtype=args.dtype, parallel="jit",
                    cpu_kernels=args.cpu_kernels)
    contenders.append(nin_jax_steps(config).train)
    times = alternate(contenders, args.steps, args.rounds, args.warmup)
    rates = {name: images_per_sec(args.batch_size, seconds) for name, seconds in times.items()}
    images = {name: rate["median"] for name, rate in rates.items()}
    ratios = {name: images["nin_jax"] / rate for name, rate in images.items() if name != "nin_jax"}
    print(f"resize {args.resize}, batch {args.batch_size}, {args.device}, {args.threads} threads, dtype {args.dtype}, "
          f"cpu kernels {args.cpu_kernels}")
    for name, rate in rates.items():
        print(f"  {name:<17} {rate['median']:10.1f} images/s (median of {args.rounds}; {rate['min']:.1f} to "
              f"{rate['max']:.1f})")
    for name, ratio in ratios.items():
        print(f"  nin_jax / {name} = {ratio:.2f}x")
    write_json(args.out, {"args": vars(args), "step_seconds": times, "images_per_sec": images,
                          "images_per_sec_range": {name: [rate["min"], rate["max"]] for name, rate in rates.items()},
                          "ratios": ratios, "torch_version": torch.__version__, "jax_version": jax.__version__,
                          "jax_device": str(jax.devices()[0])})


if __name__ == "__main__":
    main()
