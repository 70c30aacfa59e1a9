"""The book's two pictures, the training curves of its Animator and the prediction grid of
`predict_ch3`, and the class maps of a trained NiN, saved as PNG files.

Figures are built with `matplotlib.figure.Figure`, never pyplot, so no window or interactive
backend is involved: they render with Agg on a headless machine.
"""

from typing import Any, Sequence

import numpy as np
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

from nin_jax.runtime import files

# (record key, legend label, line style), the book's Animator legend.
CURVES = (("train_loss", "train loss", "-"), ("train_accuracy", "train acc", "--"), ("test_accuracy", "test acc", "-."))


def _save(figure: Figure, path: str) -> None:
    """Writes through a temporary file, so a viewer never opens a half-written picture."""
    with files.replace(path, "wb") as file:
        figure.savefig(file, format="png", dpi=100, bbox_inches="tight")


def plot_curves(records: Sequence[dict[str, Any]], num_epochs: int, path: str) -> None:
    """Writes `curves_figure` to `path`."""
    _save(curves_figure(records, num_epochs), path)


def curves_figure(records: Sequence[dict[str, Any]], num_epochs: int) -> Figure:
    """Train loss, train accuracy and test accuracy against epoch, on axes spanning every epoch."""
    figure = Figure(figsize=(4.5, 3.2))
    axes = figure.add_subplot()
    epochs = [record["epoch"] for record in records]
    for key, label, style in CURVES:
        axes.plot(epochs, [record[key] for record in records], style, marker=".", label=label)
    axes.set_xlabel("epoch")
    axes.set_xlim(*((1, num_epochs) if num_epochs > 1 else (0.5, 1.5)))  # one epoch: its point in the middle
    axes.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
    axes.set_ylim(bottom=0)
    axes.grid(True, alpha=0.4)
    axes.legend()
    return figure


def plot_predictions(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                     class_names: Sequence[str], path: str, per_row: int = 6) -> None:
    """A grid of images titled with the true class over the predicted one; mistakes in red."""
    num_rows = -(-len(images) // per_row)
    figure = Figure(figsize=(1.5 * per_row, 1.8 * num_rows))
    for index, (image, label, prediction) in enumerate(zip(images, labels, predictions)):
        axes = figure.add_subplot(num_rows, per_row, index + 1)
        axes.imshow(image.squeeze(-1), cmap="gray")
        axes.set_title(f"{class_names[label]}\n{class_names[prediction]}", fontsize=9,
                       color="black" if label == prediction else "red")
        axes.axis("off")
    _save(figure, path)


def plot_class_maps(images: np.ndarray, labels: np.ndarray, predictions: np.ndarray,
                    panels: Sequence[Sequence[tuple[int, np.ndarray]]], class_names: Sequence[str], path: str,
                    panels_per_row: int = 8) -> None:
    """Each image with its maps (class, map [H, W] of the image's size) laid over it, one panel a map,
    on one colour scale per image from 0 (ReLU's floor) to its brightest map's maximum. The first
    panel, the predicted class's, is titled true over predicted class, mistakes in red; the others
    name their class."""
    per_image = len(panels[0])
    images_per_row = max(1, panels_per_row // per_image)
    num_rows = -(-len(images) // images_per_row)
    figure = Figure(figsize=(1.5 * per_image * images_per_row, 1.8 * num_rows))
    for index, (image, label, prediction, maps) in enumerate(zip(images, labels, predictions, panels)):
        brightest = max(float(class_map.max()) for _, class_map in maps) or 1.0
        for position, (shown_class, class_map) in enumerate(maps):
            axes = figure.add_subplot(num_rows, per_image * images_per_row, index * per_image + position + 1)
            axes.imshow(image.squeeze(-1), cmap="gray")
            axes.imshow(class_map, cmap="jet", alpha=0.5, vmin=0.0, vmax=brightest)
            if position == 0:
                axes.set_title(f"{class_names[label]}\n{class_names[prediction]}", fontsize=9,
                               color="black" if label == prediction else "red")
            else:
                axes.set_title(f"map of\n{class_names[shown_class]}", fontsize=9, color="dimgray")
            axes.axis("off")
    _save(figure, path)
