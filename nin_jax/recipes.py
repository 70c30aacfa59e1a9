"""Named recipes: the defaults of `Config` that each one changes. Flags given explicitly win.

reference
    The book's `train_ch6` recipe: plain SGD at learning rate 0.1, batch 128, 10 epochs, no
    augmentation, dropout 0.5 before the last block. Every field keeps `Config`'s default.

        python train.py --workdir runs/reference                       # 224 px, on an accelerator
        python train.py --resize 96 --workdir runs/reference_96        # the CPU-sized twin

    Reaches test accuracy 0.901 at 96 px after 10 epochs, mean of 2 seeds (the README's results table).

strong
    The same network with batch normalisation after every convolution (`--batch_norm`), SGD with
    Nesterov momentum 0.9, a one-cycle schedule that rises to a peak learning rate of 0.2 over
    0.9 epochs and then decays, weight decay 5e-4 on the kernels and label smoothing 0.1; no
    augmentation, dropout 0.5 before the last block. Still 10 epochs of batch 128. The probes that
    chose it are in docs/results.md.

        python train.py --recipe strong --resize 96 --workdir runs/strong_96

    Reaches test accuracy 0.932 at 96 px after 10 epochs, mean of 2 seeds (the README's results table).
"""

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
