"""Named recipes: the defaults of `Config` that each one changes. Flags given explicitly win.

reference
    The book's `train_ch6` recipe: plain SGD at learning rate 0.1, batch 128, 10 epochs, no
    augmentation, dropout 0.5 before the last block. Every field keeps `Config`'s default.

        python train.py --workdir runs/reference                       # 224 px, on an accelerator
        python train.py --resize 96 --workdir runs/reference_96        # the CPU-sized twin

    Reaches test accuracy 0.904 at 96 px after 10 epochs (the README's results table).

strong
    The same network with standard training improvements: SGD with Nesterov momentum 0.9 and
    peak learning rate 0.02, a 1-epoch linear warm-up then cosine decay to 0, weight decay 5e-4 on
    the kernels, label smoothing 0.1, random 2-px shifts and left-right flips. Batch norm stays
    off (`--batch_norm` is a separate option). Still 10 epochs of batch 128.

        python train.py --recipe strong --resize 96 --workdir runs/strong_96

    Reaches test accuracy 0.907 at 96 px after 10 epochs (the README's results table).
"""

RECIPES: dict[str, dict] = {
    "reference": {},
    "strong": dict(
        learning_rate=0.02,
        momentum=0.9,
        nesterov=True,
        lr_schedule="cosine",
        warmup_epochs=1.0,
        weight_decay=5e-4,
        label_smoothing=0.1,
        augment=True,
    ),
}
