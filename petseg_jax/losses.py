"""Per-pixel segmentation losses: softmax cross-entropy (the tutorial's), CE + soft Dice, softmax focal.

All losses are computed in float32, whatever the dtype of the logits (bfloat16 logits from a mixed-precision
model included), and are pure functions usable inside ``jax.jit`` / ``jax.pmap``.

Reduction (Keras semantics). The tutorial trains with ``SparseCategoricalCrossentropy(from_logits=True)``
whose default reduction, ``"sum_over_batch_size"``, divides the summed (sample-weighted) loss by the number
of loss elements (pixels), not by the sum of the sample weights; its class-weight variant passes per-pixel
sample weights ``class_weights[label]``. So here::

  loss = sum_pixels(valid * class_weights[label] * pixel_loss) / sum_pixels(valid)

where ``valid`` comes from ``weights`` (1 everywhere when ``weights`` is None, 0 for padding examples):
with all-valid pixels this is exactly Keras' value with ``sample_weight=class_weights[label]``; padding
pixels are left out of both sums, so a padded eval batch gives the mean over its real pixels. Class weights
therefore scale the loss, they are not renormalized: the tutorial's example divides its ``(2, 2, 1)`` by
their sum before use, so its weights are ``(0.4, 0.4, 0.2)``; ``(2, 2, 1)`` here weighs the classes alike
with a 5x larger loss (Adam's steps are the same up to its epsilon; reported losses are 5x).
"""

from __future__ import annotations

from typing import Any, Sequence

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np
import optax

from petseg_jax import metrics

LOSSES = ("cross_entropy", "cross_entropy+dice", "focal")

# Additive smoothing of the soft Dice ratio: keeps it defined (= 1) for a class absent from both the truth
# and the prediction of a batch, and is negligible next to the pixel counts of a batch.
DICE_SMOOTH = 1.0


def _check_shapes(logits: jax.Array, labels: jax.Array) -> None:
  if logits.ndim != labels.ndim + 1 or logits.shape[:-1] != labels.shape:
    raise ValueError(
        f"logits of shape {logits.shape} do not match labels of shape {labels.shape}; expected logits of "
        f"shape {labels.shape + ('num_classes',)}.")
  if not jnp.issubdtype(labels.dtype, jnp.integer):
    raise ValueError(f"labels must be integer class ids, got dtype {labels.dtype}.")


def class_weight_array(class_weights: Sequence[float] | None, num_classes: int) -> np.ndarray | None:
  """``class_weights`` as a float32 array, or None for () / None.

  Raises:
    ValueError: not ``num_classes`` finite non-negative numbers (the message names config train.class_weights).
  """
  if class_weights is None or (not isinstance(class_weights, str) and len(class_weights) == 0):
    return None
  try:
    # A string (e.g. "(nan,1,1)", which --config cannot parse as a tuple) is not a number per class either.
    cw = np.asarray(class_weights, np.float32) if not isinstance(class_weights, str) else None
  except (TypeError, ValueError):
    cw = None
  if cw is None or cw.shape != (num_classes,) or not np.all(np.isfinite(cw)) or np.any(cw < 0) or not cw.any():
    shown = tuple(class_weights) if isinstance(class_weights, (list, tuple)) else class_weights
    raise ValueError(
        f"class_weights={shown!r} must be {num_classes} finite non-negative numbers, one per class, not all zero "
        "(a zero loss trains nothing) (config train.class_weights), or () for none.")
  return cw


def _safe_divide(numerator: jax.Array, denominator: jax.Array) -> jax.Array:
  # 0 (not NaN, and with finite gradients) when every pixel has weight 0: the numerator is 0 then too.
  return numerator / jnp.where(denominator > 0, denominator, 1.0)


def softmax_focal_loss(logits: jax.Array, labels: jax.Array, gamma: float = 2.0) -> jax.Array:
  """Per-pixel softmax focal loss ``-(1 - p_t)**gamma * log(p_t)`` (Lin et al. 2017), in float32.

  ``optax.sigmoid_focal_loss`` is the binary/multi-label form; this is the multi-class softmax form, with
  ``p_t`` the softmax probability of the true class. ``gamma=0`` is exactly the cross-entropy.

  Args:
    logits: ``(..., C)`` logits, any float dtype.
    labels: ``(...)`` integer class ids in ``[0, C)``.
    gamma: focusing parameter >= 0.

  Returns:
    float32 array with the shape of ``labels``.
  """
  if gamma < 0:
    raise ValueError(f"focal gamma must be >= 0, got {gamma}.")
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  _check_shapes(logits, labels)
  log_pt = jnp.sum(jax.nn.log_softmax(logits) * jax.nn.one_hot(labels, logits.shape[-1]), axis=-1)
  if gamma == 0:
    return -log_pt
  # -expm1(log p_t) = 1 - p_t without cancellation when p_t is close to 1.
  one_minus_pt = -jnp.expm1(log_pt)
  if float(gamma).is_integer():
    modulator = jax.lax.integer_pow(one_minus_pt, int(gamma))
  else:
    # Fractional powers have an infinite derivative at 0 (a perfectly classified pixel); a tiny floor
    # keeps gradients finite and changes the loss by < 1e-12**gamma * |log p_t| ~ 0.
    modulator = jnp.power(jnp.maximum(one_minus_pt, 1e-12), gamma)
  return -modulator * log_pt


def soft_dice_sums(logits: jax.Array, labels: jax.Array, weights: Any = None
                   ) -> tuple[jax.Array, jax.Array]:
  """Per-class ``(sum(w p_c y_c), sum(w p_c) + sum(w y_c))`` over every pixel, in float32 (``soft_dice_loss``).

  Sums, so that those of several batches or devices add up to the sums of all of them at once.
  """
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  _check_shapes(logits, labels)
  valid = metrics.pixel_weights(weights, labels)[..., None]
  probs = jax.nn.softmax(logits) * valid
  onehot = jax.nn.one_hot(labels, logits.shape[-1], dtype=jnp.float32) * valid
  axes = tuple(range(labels.ndim))
  return jnp.sum(probs * onehot, axis=axes), jnp.sum(probs, axis=axes) + jnp.sum(onehot, axis=axes)


def dice_loss_from_sums(intersection: jax.Array, total: jax.Array, smooth: float = DICE_SMOOTH) -> jax.Array:
  """``1 - mean_c (2 * intersection_c + smooth) / (total_c + smooth)`` of ``soft_dice_sums``' sums."""
  return 1.0 - jnp.mean((2.0 * jnp.asarray(intersection) + smooth) / (jnp.asarray(total) + smooth))


def soft_dice_loss(logits: jax.Array, labels: jax.Array, weights: Any = None,
                   smooth: float = DICE_SMOOTH) -> jax.Array:
  """``1 - mean_c soft Dice_c`` over the whole batch, from softmax probabilities, in float32.

  ``Dice_c = (2 * sum(w p_c y_c) + smooth) / (sum(w p_c) + sum(w y_c) + smooth)``, sums over every pixel of
  the batch (batch-level Dice), ``p`` the softmax probabilities, ``y`` the one-hot labels, ``w`` the
  validity weights. Class weights do not enter the Dice term.

  Args:
    logits: ``(B, ..., C)`` logits, any float dtype.
    labels: ``(B, ...)`` integer class ids in ``[0, C)``.
    weights: optional per-example ``(B,)`` or per-pixel validity weights (0 = padding).
    smooth: additive smoothing (see ``DICE_SMOOTH``).

  Returns:
    float32 scalar in ``[0, 1]``; ~0 for a confident perfect prediction.
  """
  return dice_loss_from_sums(*soft_dice_sums(logits, labels, weights), smooth)


def loss_sums(logits: jax.Array, labels: jax.Array, *, loss: str = "cross_entropy",
              class_weights: Sequence[float] | None = (), weights: Any = None, focal_gamma: float = 2.0
              ) -> dict[str, jax.Array]:
  """``segmentation_loss`` as sums that add up over batches and devices; ``loss_from_sums`` turns them into it.

  The sums of every batch of a split give the split's loss as if it were one batch, whatever the batch size,
  padding or number of devices: "loss_sum" (``sum(valid * class_weight[label] * pixel_loss)``) and
  "num_pixels" (``sum(valid)``), and for "cross_entropy+dice" the Dice term's per-class
  "dice_intersection" and "dice_total" (``soft_dice_sums``). Arguments as ``segmentation_loss``'s.
  """
  if loss not in LOSSES:
    raise ValueError(f"Unknown loss {loss!r} (config train.loss); choose one of {LOSSES}.")
  logits = jnp.asarray(logits, jnp.float32)
  labels = jnp.asarray(labels)
  _check_shapes(logits, labels)
  cw = class_weight_array(class_weights, logits.shape[-1])
  valid = metrics.pixel_weights(weights, labels)

  if loss == "focal":
    pixel_loss = softmax_focal_loss(logits, labels, gamma=focal_gamma)
  else:
    # optax's dense form on one-hot labels: the same value as the integer-label form, whose gradient is a
    # scatter-add that XLA:CPU constant-folds slowly at compile time (seconds) and runs slowly per step;
    # with a handful of classes the one-hot product is cheaper.
    pixel_loss = optax.softmax_cross_entropy(logits, jax.nn.one_hot(labels, logits.shape[-1]))
  pixel_weight = valid if cw is None else valid * jnp.asarray(cw)[labels]
  sums = {"loss_sum": jnp.sum(pixel_weight * pixel_loss), "num_pixels": jnp.sum(valid)}
  if loss == "cross_entropy+dice":
    sums["dice_intersection"], sums["dice_total"] = soft_dice_sums(logits, labels, weights)
  return sums


def loss_from_sums(sums: dict[str, Any], smooth: float = DICE_SMOOTH) -> jax.Array:
  """The float32 loss of ``loss_sums``' sums (of one batch, or added up over many)."""
  value = _safe_divide(jnp.asarray(sums["loss_sum"], jnp.float32), jnp.asarray(sums["num_pixels"], jnp.float32))
  if "dice_intersection" in sums:
    value = value + dice_loss_from_sums(sums["dice_intersection"], sums["dice_total"], smooth)
  return value


def segmentation_loss(
    logits: jax.Array,
    labels: jax.Array,
    *,
    loss: str = "cross_entropy",
    class_weights: Sequence[float] | None = (),
    weights: Any = None,
    focal_gamma: float = 2.0,
    axis_name: str | None = None,
) -> jax.Array:
  """Scalar float32 training/eval loss.

  Args:
    logits: ``(B, H, W, C)`` logits, any float dtype (cast to float32 first).
    labels: ``(B, H, W)`` integer class ids in ``[0, C)``. Not validated here (they may be traced under
      jit); the input pipeline rejects trimaps outside 1/2/3, so training never sees others. An id outside
      ``[0, C)`` (3, 255, -1...) gives no NaN and no error: its one-hot row is all zeros, so its
      cross-entropy and focal terms are 0 with zero gradient, but the pixel still counts in ``sum(valid)``
      (diluting the mean as a perfectly predicted pixel would), and the Dice term counts its predicted
      probabilities as false positives. To ignore pixels, give them weight 0 in ``weights``.
    loss: one of ``LOSSES``:
      "cross_entropy": sparse softmax cross-entropy (``optax.softmax_cross_entropy`` on one-hot labels).
      "cross_entropy+dice": the cross-entropy above + ``soft_dice_loss`` (weight 1 each).
      "focal": ``softmax_focal_loss`` with ``focal_gamma``.
    class_weights: ``()``/None, or C non-negative numbers: each pixel's loss is multiplied by the weight of
      its true class, not renormalized (the tutorial's sample-weight variant is ``(0.4, 0.4, 0.2)``, its
      ``(2, 2, 1)`` divided by their sum; see the module docstring). Applies to the
      cross-entropy and focal terms, not to the Dice term.
    weights: optional per-example ``(B,)`` or per-pixel ``(B, H, W)`` validity weights; 0 excludes a
      padding example/pixel from the loss and from the pixel count.
    focal_gamma: focusing parameter of "focal".
    axis_name: under ``pmap``, the axis whose devices hold the batch's equal shards: the Dice term's sums are
      ``psum``-ed, so that it is the global batch's Dice (the mean of the shards' Dice values is not), and
      so is the ``pmean`` of the devices' gradients; the per-pixel term stays each shard's mean (with equal
      shards, the ``pmean`` of the devices' gradients is the global mean's).

  Returns:
    float32 scalar: ``sum(valid * class_weight[label] * pixel_loss) / sum(valid)`` (see the module
    docstring for why this matches Keras), plus the Dice term for "cross_entropy+dice"; 0 if no pixel
    is valid.

  Raises:
    ValueError: for an unknown ``loss``, bad ``class_weights`` or mismatched shapes.
  """
  sums = loss_sums(logits, labels, loss=loss, class_weights=class_weights, weights=weights,
                   focal_gamma=focal_gamma)
  if axis_name is not None and "dice_intersection" in sums:
    sums["dice_intersection"], sums["dice_total"] = lax.psum(
        (sums["dice_intersection"], sums["dice_total"]), axis_name)
  return loss_from_sums(sums)
