"""Segmentation metrics computed from a confusion matrix (scenic style).

Every metric is derived from one confusion matrix summed over the whole split, so pixel accuracy, IoU and
Dice are exact over the split, independent of batch size and of the padding of the last batch (averaging
per-batch IoUs would not be).

Typical evaluation loop::

  total = np.zeros((num_classes, num_classes), np.int64)  # Host-side, 64-bit: no overflow.
  for batch in eval_input:
    total += np.asarray(step(variables, batch))  # step returns confusion_matrix(...) (int32).
  metrics = compute_metrics(total)

``confusion_matrix`` counts in int32 on the device: a single call is exact for up to 2**31 - 1 pixels
(131k images of 128x128), far above any batch. The sum over a split can exceed that (the 3669 test
images at 128x128 are 60M pixels, the same at 512x512 are 962M, and with float32 counts anything above
2**24 = 16.8M per cell would already lose counts), so accumulate per-batch matrices on the host in
``np.int64`` as above rather than on the device (JAX has 64-bit types disabled by default). Under
``pmap``, either ``jax.lax.psum`` the matrix over the device axis inside the step or sum the returned
``(num_devices, C, C)`` array over its first axis on the host; both give the matrix of the whole batch.
"""

from __future__ import annotations

import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

CLASS_NAMES = ("pet", "background", "border")

# int32 counts are exact up to this many pixels per confusion_matrix call.
_MAX_PIXELS_PER_CALL = 2**31 - 1


def pixel_weights(weights: Any, labels: jax.Array) -> jax.Array:
  """float32 per-pixel weights (the shape of ``labels``) from per-example ``(B,)`` or per-pixel weights, or
  None (all 1).

  Raises:
    ValueError: ``weights``' shape is not a prefix of ``labels``' shape.
  """
  if weights is None:
    return jnp.ones(labels.shape, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  if weights.shape != labels.shape[:weights.ndim]:
    raise ValueError(
        f"weights of shape {weights.shape} must be per example {labels.shape[:1]} or a prefix of the "
        f"labels' shape {labels.shape}.")
  weights = weights.reshape(weights.shape + (1,) * (labels.ndim - weights.ndim))
  return jnp.broadcast_to(weights, labels.shape)


def confusion_matrix(
    predictions_or_logits: Any,
    labels: Any,
    weights: Any = None,
    num_classes: int = 3,
) -> jax.Array:
  """Confusion matrix of one batch; rows are the true class, columns the predicted class.

  Pure and shape-static, so it can be used inside ``jax.jit`` / ``jax.pmap``.

  Args:
    predictions_or_logits: logits ``(..., num_classes)`` (any float dtype; the argmax is taken) or
      integer class predictions with the same shape as ``labels``.
    labels: integer true classes ``(...)``, e.g. ``(B, H, W)``. Labels (and predictions) outside
      ``[0, num_classes)`` match no row (column), i.e. such pixels are not counted: this is the usual
      "ignore label" behaviour, and ``compute_metrics(...)["num_pixels"]`` shows how many were counted.
    weights: optional validity weights whose shape is a prefix of ``labels.shape``: per example ``(B,)``
      (0 for the padding examples of the last eval batch) or per pixel ``(B, H, W)``. A pixel is counted
      once if its weight is > 0 and not at all otherwise (a mask, as in scenic; fractional weights do not
      give fractional counts).
    num_classes: number of classes C.

  Returns:
    int32 array ``(num_classes, num_classes)``; entry ``[t, p]`` = number of counted pixels of true class
    ``t`` predicted as ``p``.

  Raises:
    ValueError: if the shapes or dtypes of the inputs do not fit together.
  """
  preds = jnp.asarray(predictions_or_logits)
  labels = jnp.asarray(labels)
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"confusion_matrix: labels must be integer class ids, got dtype {labels.dtype}.")
  if preds.ndim == labels.ndim + 1:
    if preds.shape[:-1] != labels.shape or preds.shape[-1] != num_classes:
      raise ValueError(
          f"confusion_matrix: logits of shape {preds.shape} do not match labels of shape {labels.shape} "
          f"with num_classes={num_classes}; expected logits of shape {labels.shape + (num_classes,)}.")
    preds = jnp.argmax(preds, axis=-1)
  elif preds.shape == labels.shape:
    if not jnp.issubdtype(preds.dtype, jnp.integer):
      raise ValueError(
          f"confusion_matrix: predictions with the shape of the labels {labels.shape} must be integer "
          f"class ids, got dtype {preds.dtype}; pass logits with a trailing class axis to take the argmax.")
  else:
    raise ValueError(
        f"confusion_matrix: predictions/logits of shape {preds.shape} do not match labels of shape "
        f"{labels.shape}; expected integer predictions {labels.shape} or logits "
        f"{labels.shape + (num_classes,)}.")
  if labels.size > _MAX_PIXELS_PER_CALL:
    raise ValueError(
        f"confusion_matrix: {labels.size} pixels in one call would overflow int32 counts; call it on "
        "smaller batches and sum the results on the host in np.int64.")

  valid = jnp.ones(labels.shape, dtype=bool) if weights is None else pixel_weights(weights, labels) > 0

  classes = jnp.arange(num_classes)
  true_onehot = ((labels[..., None] == classes) & valid[..., None]).reshape(-1, num_classes)
  pred_onehot = (preds[..., None] == classes).reshape(-1, num_classes)
  # Outer product summed over pixels: only int32 elementwise ops and one reduction, avoiding an integer
  # matmul (no cuBLAS kernel for int32) and a scatter-add into C*C bins (atomic contention on GPU).
  # XLA:CPU materializes an int32 (N, C, C) temporary (36 MB for 64x128x128 pixels) and took ~16 ms
  # for such a batch on 2 cores here (a float32 one-hot matmul: ~13 ms); not measured on GPU.
  return jnp.sum(
      true_onehot[:, :, None] & pred_onehot[:, None, :], axis=0, dtype=jnp.int32)


def compute_metrics(confusion: Any, class_names: Sequence[str] = CLASS_NAMES) -> dict[str, Any]:
  """Pixel accuracy, per-class and mean IoU and Dice from a (summed) confusion matrix.

  Convention for absent classes: a class with no pixel in the truth and none in the prediction (union 0)
  has an undefined IoU/Dice. It is reported as ``None`` in ``"iou"`` / ``"dice_per_class"`` and left out
  of the means: ``"miou"`` and ``"dice"`` average over the classes present in the truth or in the
  prediction. (A class present in only one of them has IoU = Dice = 0 and does count.) No value is NaN.

  Args:
    confusion: ``(C, C)`` counts, rows = true class, columns = predicted class (NumPy or JAX; integer or
      float).
    class_names: the C class names, used as keys of the per-class dicts.

  Returns:
    A JSON-serializable dict of plain Python numbers::

      {"pixel_accuracy": float, "miou": float, "iou": {name: float | None},
       "dice": float, "dice_per_class": {name: float | None}, "num_pixels": int}

  Raises:
    ValueError: if the matrix is not ``(C, C)`` for the C class names, has negative or non-finite
      entries, or counts no pixel.
  """
  cm = np.asarray(confusion, dtype=np.float64)
  num_classes = len(class_names)
  if cm.shape != (num_classes, num_classes):
    raise ValueError(
        f"compute_metrics: confusion matrix of shape {cm.shape} does not match the {num_classes} class "
        f"names {tuple(class_names)}; expected ({num_classes}, {num_classes}).")
  if not np.all(np.isfinite(cm)) or np.any(cm < 0):
    raise ValueError(f"compute_metrics: confusion matrix has negative or non-finite entries:\n{cm}")
  total = cm.sum()
  if total == 0:
    raise ValueError("compute_metrics: the confusion matrix counts no pixel (empty split or all weights 0).")

  true_positives = np.diag(cm)
  true_counts = cm.sum(axis=1)
  pred_counts = cm.sum(axis=0)
  union = true_counts + pred_counts - true_positives
  present = union > 0
  # Divide only where defined; absent classes stay None (see docstring).
  iou = [float(tp / u) if p else None for tp, u, p in zip(true_positives, union, present)]
  dice = [
      float(2 * tp / (t + q)) if p else None
      for tp, t, q, p in zip(true_positives, true_counts, pred_counts, present)
  ]
  return {
      "pixel_accuracy": float(true_positives.sum() / total),
      "miou": float(np.mean([v for v in iou if v is not None])),
      "iou": dict(zip(class_names, iou)),
      "dice": float(np.mean([v for v in dice if v is not None])),
      "dice_per_class": dict(zip(class_names, dice)),
      "num_pixels": int(round(total)),
  }


def _fmt(value: float | None) -> str:
  if value is None:
    return "absent"
  if isinstance(value, float) and math.isnan(value):
    return "nan"
  return f"{value:.4f}"


def format_metrics_table(metrics: Mapping[str, Any], num_images: int | None = None) -> str:
  """A readable table of the dict returned by ``compute_metrics``.

  Example, for the confusion matrix ``[[2, 1, 0], [1, 2, 0], [0, 0, 0]]`` of one 2x3 image::

    Segmentation metrics: 1 images, 6 pixels
    class               IoU     Dice
    pet              0.5000   0.6667
    background       0.5000   0.6667
    border           absent   absent
    mean             0.5000   0.6667
    pixel accuracy   0.6667

  Args:
    metrics: a ``compute_metrics`` result (extra keys are ignored).
    num_images: optional number of evaluated images, shown in the header.

  Returns:
    The table as a multi-line string (no trailing newline). Absent classes (see ``compute_metrics``)
    show "absent".
  """
  for key in ("pixel_accuracy", "miou", "iou", "dice", "dice_per_class"):
    if key not in metrics:
      raise ValueError(
          f"format_metrics_table: metrics lack key {key!r}; pass the dict returned by compute_metrics "
          f"(got keys {sorted(metrics)}).")
  names = list(metrics["iou"])
  width = max([len(n) for n in names] + [len("pixel accuracy")])
  parts = []
  if num_images is not None:
    parts.append(f"{num_images} images")
  if "num_pixels" in metrics:
    parts.append(f"{metrics['num_pixels']} pixels")
  lines = ["Segmentation metrics" + (": " + ", ".join(parts) if parts else "")]
  lines.append(f"{'class':<{width}} {'IoU':>8} {'Dice':>8}")
  for name in names:
    lines.append(
        f"{name:<{width}} {_fmt(metrics['iou'][name]):>8} "
        f"{_fmt(metrics['dice_per_class'].get(name)):>8}")
  lines.append(f"{'mean':<{width}} {_fmt(metrics['miou']):>8} {_fmt(metrics['dice']):>8}")
  lines.append(f"{'pixel accuracy':<{width}} {_fmt(metrics['pixel_accuracy']):>8}")
  return "\n".join(lines)
