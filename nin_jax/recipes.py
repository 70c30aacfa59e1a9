"""Named recipes: the defaults of `Config` that each one changes. Flags given explicitly win.

reference
    The book's `train_ch6` recipe: plain SGD at learning rate 0.1, batch 128, 10 epochs, no
    augmentation, dropout 0.5 before the last block. Every field keeps `Config`'s default.

        python train.py --workdir runs/reference                       # 224 px, on an accelerator
        python train.py --resize 96 --workdir runs/reference_96        # the CPU-sized twin

    Measured at 96 px, seed 0, on a 2-core CPU: test accuracy 0.904 after 10 epochs (0.582 after
    the first; over seeds 0-4 the first epoch gave 0.567 to 0.692). An epoch's training took 350 s
    on 2 cores alone (171.6 images/s); at 224 px it wants an accelerator.

strong
    The same network with standard training improvements: SGD with Nesterov momentum 0.9 and
    peak learning rate 0.02, a 1-epoch linear warm-up then cosine decay to 0, weight decay 5e-4 on
    the kernels, label smoothing 0.1, random 2-px shifts and left-right flips. Batch norm stays
    off (`--batch_norm` is a separate option). Still 10 epochs of batch 128.

        python train.py --recipe strong --resize 96 --workdir runs/strong_96

    Measured at 96 px, seed 0, on a 2-core CPU: test accuracy 0.907 after 10 epochs (0.721
    after the first), train accuracy 0.909: under-trained rather than over-fitted. The 10 epochs
    took 1 h 56 min on 2 cores shared with other runs (not timed alone). Its step is the
    reference's plus momentum and the crops and flips, all on the device.
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
