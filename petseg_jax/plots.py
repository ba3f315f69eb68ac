"""Figures: sample predictions (the tutorial's display), training curves, confusion matrix, mask overlays.

Figures are drawn on ``matplotlib.figure.Figure`` objects with the Agg canvas directly, never through
``pyplot``: nothing needs a display, no global backend is switched for the importing process, and no
figure is registered with pyplot's figure manager (so none stays open; the cycle collector frees each once
it is saved). Every ``save_*`` function writes one PNG of ``figsize * dpi`` pixels (no tight bounding box, so sizes are
predictable) and returns its path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.patches import Patch
import numpy as np

from petseg_jax.data.settings import INPUT_RANGES
from petseg_jax.metrics import CLASS_NAMES

# One RGB colour per class: pet = orange, background = blue, border = yellow.
PALETTE = np.array([[255, 127, 14], [31, 119, 180], [255, 221, 0]], np.uint8)


PathLike = str | os.PathLike


def new_figure(width: float, height: float, dpi: int) -> Figure:
  """A ``width`` x ``height`` inch Figure with constrained layout on an Agg canvas (not known to pyplot)."""
  fig = Figure(figsize=(width, height), dpi=dpi, layout="constrained")
  FigureCanvasAgg(fig)
  return fig


def save_figure(fig: Figure, path: PathLike) -> Path:
  """Writes ``fig`` as a PNG at its own dpi to ``path`` (parent folders created); returns the path."""
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)
  # Not cleared after: the Figure is unknown to pyplot, so nothing keeps it open, and Python's cycle collector
  # frees it within a few figures (peak memory bounded: +21 MB over 300 triplets). fig.clear() rebuilt every
  # axes' state first, ~20% of a 500x375 triplet's time (0.25 -> 0.21 s), which predict.py draws per image.
  fig.savefig(path, dpi=fig.dpi, format="png")
  return path


def _as_masks(masks: Any, name: str) -> np.ndarray:
  """Integer class masks ``(N, H, W)`` from ``(N, H, W)``, ``(N, H, W, 1)`` or logits ``(N, H, W, C)``."""
  masks = np.asarray(masks)
  if masks.ndim == 4 and masks.shape[-1] == 1:
    masks = masks[..., 0]
  elif masks.ndim == 4:
    masks = masks.argmax(-1)  # Logits or probabilities.
  if masks.ndim != 3:
    raise ValueError(
        f"{name} of shape {masks.shape}: expected class masks (N, H, W) or (N, H, W, 1), or logits (N, H, W, C).")
  return masks


def colorize_mask(mask: Any) -> np.ndarray:
  """RGB image ``(..., 3)`` uint8 of a class mask, one ``PALETTE`` colour per class.

  Args:
    mask: integer class ids of any shape, each in ``[0, len(PALETTE))``.

  Raises:
    ValueError: for non-integer masks or class ids outside the palette.
  """
  mask = np.asarray(mask)
  if not np.issubdtype(mask.dtype, np.integer):
    raise ValueError(f"colorize_mask: mask must hold integer class ids, got dtype {mask.dtype}.")
  if mask.size and (mask.min() < 0 or mask.max() >= len(PALETTE)):
    raise ValueError(
        f"colorize_mask: class ids must be in [0, {len(PALETTE)}), got values in [{mask.min()}, {mask.max()}] "
        "(trimap values 1..3 must be shifted to 0..2 first).")
  return PALETTE[mask]


def overlay(image_uint8: Any, mask: Any, alpha: float = 0.5) -> np.ndarray:
  """Class colours blended over an image: ``(1 - alpha) * image + alpha * colorize_mask(mask)``.

  Args:
    image_uint8: uint8 RGB image ``(H, W, 3)`` (or a batch ``(..., H, W, 3)``).
    mask: integer class ids of shape ``image.shape[:-1]``.
    alpha: opacity of the class colours, in ``[0, 1]``.

  Returns:
    uint8 array with the image's shape.
  """
  image = np.asarray(image_uint8)
  mask = np.asarray(mask)
  if image.dtype != np.uint8 or image.ndim < 3 or image.shape[-1] != 3:
    raise ValueError(
        f"overlay: expected a uint8 RGB image (H, W, 3), got dtype {image.dtype} shape {image.shape}.")
  if mask.shape != image.shape[:-1]:
    raise ValueError(f"overlay: mask of shape {mask.shape} does not match image of shape {image.shape}.")
  if not 0.0 <= alpha <= 1.0:
    raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}.")
  blended = (1.0 - alpha) * image.astype(np.float32) + alpha * colorize_mask(mask).astype(np.float32)
  return np.clip(np.round(blended), 0, 255).astype(np.uint8)


def _images_to_uint8(images: np.ndarray, input_range: str) -> np.ndarray:
  """Model inputs back to displayable uint8 RGB."""
  if input_range not in INPUT_RANGES:
    raise ValueError(f"input_range={input_range!r} is not one of {INPUT_RANGES} (config data.input_range).")
  if images.dtype == np.uint8:
    return images
  images = images.astype(np.float32)
  if input_range == "[-1,1]":
    images = (images + 1.0) / 2.0
  return np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8)


def _class_legend(fig: Figure, class_names: Sequence[str]) -> None:
  handles = [Patch(color=PALETTE[i] / 255.0, label=name) for i, name in enumerate(class_names)]
  fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), frameon=False)


def save_prediction_triplets(
    images: Any,
    true_masks: Any,
    pred_masks: Any,
    path: PathLike,
    input_range: str = "[-1,1]",
    titles: Sequence[str] = ("Input Image", "True Mask", "Predicted Mask"),
    class_names: Sequence[str] = CLASS_NAMES,
    panel_inches: float = 3.0,
    dpi: int = 100,
) -> Path:
  """The tutorial's ``display``: one row per example, panels input image | true mask | predicted mask.

  Args:
    images: model inputs ``(N, H, W, 3)``, float in ``input_range`` or uint8.
    true_masks: ``(N, H, W)`` / ``(N, H, W, 1)`` class ids, or None to leave that panel out (e.g. for
      images without ground truth).
    pred_masks: class ids as above or logits ``(N, H, W, C)``, or None to leave that panel out (e.g. to
      show the data only).
    path: output PNG path (parent folders are created).
    input_range: ``"[-1,1]"`` or ``"[0,1]"``: how float images were normalized (config data.input_range).
    titles: titles of the three panels (a left-out panel's title is skipped).
    class_names: legend labels of the mask colours.
    panel_inches: width and height of one panel; the PNG is ``(panels * panel_inches * dpi) x
      (N * panel_inches * dpi)`` pixels (plus 0.4 inch of height for the legend).
    dpi: resolution.

  Returns:
    The PNG's path.
  """
  images = np.asarray(images)
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"save_prediction_triplets: images of shape {images.shape}; expected (N, H, W, 3).")
  if len(titles) != 3:
    raise ValueError(f"save_prediction_triplets: expected 3 titles (input, true, predicted), got {titles}.")
  columns = [(titles[0], _images_to_uint8(images, input_range))]
  for title, masks, name in ((titles[1], true_masks, "true_masks"), (titles[2], pred_masks, "pred_masks")):
    if masks is not None:
      masks = _as_masks(masks, name)
      if masks.shape != images.shape[:3]:
        raise ValueError(
            f"save_prediction_triplets: {name} of shape {masks.shape} do not match images {images.shape}.")
      columns.append((title, colorize_mask(masks)))

  num_rows, num_cols = images.shape[0], len(columns)
  legend_inches = 0.4
  fig = new_figure(num_cols * panel_inches, num_rows * panel_inches + legend_inches, dpi)
  axes = fig.subplots(num_rows, num_cols, squeeze=False)
  for row in range(num_rows):
    for col, (title, panel) in enumerate(columns):
      ax = axes[row, col]
      ax.imshow(panel[row], interpolation="nearest")
      ax.set_title(title)
      # Hidden axes still make their ticks when the layout places the titles: none to make is the same
      # picture (pixel for pixel) a quarter sooner, which counts for predict.py's figure per image.
      ax.set_xticks([])
      ax.set_yticks([])
      ax.axis("off")
  if num_cols > 1:
    _class_legend(fig, class_names)
  return save_figure(fig, path)


def save_training_curves(history: Sequence[Mapping[str, Any]], path: PathLike, dpi: int = 100,
                         eval_split: str | None = None) -> Path:
  """Training vs evaluation loss (the tutorial's plot) and evaluation mIoU / pixel accuracy / Dice per epoch.

  Args:
    history: rows such as ``{"epoch": 1, "step": 57, "train_loss": 0.52, "eval_loss": 0.41,
      "eval_miou": 0.61, "eval_pixel_accuracy": 0.85}``. A row may lack any of the value keys (or hold
      None), e.g. when evaluation runs every other epoch. The x axis is "epoch" if every row has it,
      otherwise "step". "eval_dice" is plotted too when present.
    path: output PNG path; the image is 1200 x 450 pixels at the default dpi.
    dpi: resolution.
    eval_split: the split the eval_* values come from, named in the labels instead of "Validation" (the
      tutorial evaluates on its test split, and so do the configs that reproduce it).

  Returns:
    The PNG's path.
  """
  if not history:
    raise ValueError("save_training_curves: history is empty; nothing to plot.")
  if all("epoch" in row for row in history):
    x_key = "epoch"
  elif all("step" in row for row in history):
    x_key = "step"
  else:
    raise ValueError("save_training_curves: every history row needs an 'epoch' (or a 'step') entry.")

  def series(key: str) -> tuple[list[float], list[float]]:
    rows = [row for row in history if row.get(key) is not None]
    return [float(row[x_key]) for row in rows], [float(row[key]) for row in rows]

  evaluation = "Validation" if eval_split is None else f"Eval ({eval_split})"
  loss_series = {"Training Loss": (series("train_loss"), "r-"),
                 f"{evaluation} Loss": (series("eval_loss"), "bo-")}
  metric_series = {
      f"{evaluation} mIoU": (series("eval_miou"), "o-"),
      f"{evaluation} pixel accuracy": (series("eval_pixel_accuracy"), "s-"),
      f"{evaluation} Dice": (series("eval_dice"), "^-"),
  }
  all_series = list(loss_series.values()) + list(metric_series.values())
  if not any(xs for (xs, _ys), _style in all_series):
    raise ValueError(
        "save_training_curves: no row has any of train_loss, eval_loss, eval_miou, eval_pixel_accuracy, "
        "eval_dice.")

  fig = new_figure(12.0, 4.5, dpi)
  loss_ax, metric_ax = fig.subplots(1, 2)
  for ax, panel, title, ylabel in (
      (loss_ax, loss_series, f"Training and {evaluation} Loss", "Loss"),
      (metric_ax, metric_series, f"{evaluation} metrics", "Score")):
    for label, ((xs, ys), style) in panel.items():
      if xs:
        ax.plot(xs, ys, style, label=label)
    ax.set_title(title)
    ax.set_xlabel(x_key.capitalize())
    ax.set_ylabel(ylabel)
    ax.grid(True, alpha=0.3)
    if ax.lines:
      ax.legend()
  return save_figure(fig, path)


def save_confusion_matrix(
    confusion: Any,
    path: PathLike,
    class_names: Sequence[str] = CLASS_NAMES,
    normalize: bool = True,
    dpi: int = 100,
) -> Path:
  """Heat map of a confusion matrix (rows = true class, columns = predicted), cells annotated.

  Args:
    confusion: ``(C, C)`` counts, e.g. the split total from ``metrics.confusion_matrix``.
    path: output PNG path; the image is 550 x 500 pixels at the default dpi.
    class_names: the C class names.
    normalize: colour and annotate each row's fractions (per-class recall; a row with no pixels shows
      0), with the counts below; False: the counts only.
    dpi: resolution.

  Returns:
    The PNG's path.
  """
  cm = np.asarray(confusion, np.float64)
  num_classes = len(class_names)
  if cm.shape != (num_classes, num_classes):
    raise ValueError(
        f"save_confusion_matrix: shape {cm.shape} does not match the {num_classes} class names "
        f"{tuple(class_names)}.")
  row_sums = cm.sum(axis=1, keepdims=True)
  fractions = np.divide(cm, row_sums, out=np.zeros_like(cm), where=row_sums > 0)
  values = fractions if normalize else cm

  fig = new_figure(5.5, 5.0, dpi)
  ax = fig.subplots()
  vmax = 1.0 if normalize else max(float(cm.max()), 1.0)
  image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
  fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04)
  for t in range(num_classes):
    for p in range(num_classes):
      text = f"{fractions[t, p]:.3f}\n({int(cm[t, p])})" if normalize else f"{int(cm[t, p])}"
      color = "white" if values[t, p] > 0.6 * vmax else "black"
      ax.text(p, t, text, ha="center", va="center", color=color, fontsize=9)
  ax.set_xticks(range(num_classes), labels=class_names)
  ax.set_yticks(range(num_classes), labels=class_names)
  ax.set_xlabel("Predicted class")
  ax.set_ylabel("True class")
  ax.set_title("Confusion matrix" + (" (row-normalized)" if normalize else " (pixels)"))
  return save_figure(fig, path)
