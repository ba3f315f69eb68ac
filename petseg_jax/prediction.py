"""Prediction on one device: ``Predictor`` compiles ``model.apply(train=False)`` once, BatchNorm folded.

Used by ``inference`` (the scripts) and the benchmark. The evaluation of a whole split runs ``pmap``-ed in
``train`` on the same folded function, and the training figures show its class maps.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from petseg_jax import models
from petseg_jax import packed


def packed_logits(model: models.UNet, layout: packed.Layout, packed_variables: tuple[jax.Array, ...],
                  images: jax.Array) -> jax.Array:
  """``model.apply(variables, images, train=False)`` on variables packed by ``packed.pack`` (the function
  ``Predictor`` compiles)."""
  return model.apply(packed.unpack(packed_variables, layout), images, train=False)


_logits = jax.jit(packed_logits, static_argnums=(0, 1))


@functools.partial(jax.jit, static_argnums=(0, 1))
def _class_maps(model: models.UNet, layout: packed.Layout, packed_variables: tuple[jax.Array, ...],
                images: jax.Array) -> jax.Array:
  return jnp.argmax(packed_logits(model, layout, packed_variables, images), axis=-1)


class Predictor:
  """``model.apply(variables, images, train=False)`` compiled for one device, BatchNorm folded into the
  convolutions and the variables packed on accelerators.

  The BatchNorms are folded once, here (``models.fold_batch_norm``): each call then runs one operation per
  BatchNorm instead of four, the same function up to rounding (on an H200 a batch-64 call ran 142 GPU kernels
  instead of 190, ~10% faster; BENCHMARKS.md). The variables go to the device once, on accelerators packed
  into one buffer per dtype (``packed``): a call then passes one or two arrays instead of ~270, whose
  per-buffer host work is a large part of a small batch's call on a GPU. Compiled once per model, variable
  layout and image shape (shared by Predictors of equal layouts, e.g. one per checkpoint predicted).

  Args:
    model: the U-Net (unfolded).
    variables: its ``{"params", "batch_stats"}``.
    concatenate: pack into one buffer per dtype (None: on accelerators only; see ``packed.pack``).
    fold_batch_norm: fold the BatchNorms (False: run ``model`` on ``variables`` as they are).
  """

  def __init__(self, model: models.UNet, variables: dict[str, Any], concatenate: bool | None = None,
               fold_batch_norm: bool = True):
    if fold_batch_norm:
      model, variables = model.clone(batch_norm_folded=True), models.fold_batch_norm(variables)
    self.model = model
    self.packed_variables, self.layout = packed.pack(variables, concatenate)

  def logits(self, images: jax.Array | np.ndarray) -> jax.Array:
    """Per-pixel class logits (N, H, W, C) of preprocessed images, on the device."""
    return _logits(self.model, self.layout, self.packed_variables, images)

  def __call__(self, images: jax.Array | np.ndarray) -> np.ndarray:
    """Class maps (N, H, W) of preprocessed images, as host NumPy."""
    return np.asarray(_class_maps(self.model, self.layout, self.packed_variables, images))


def predict(model: models.UNet, variables: dict[str, Any], images: np.ndarray) -> np.ndarray:
  """Class maps (N, H, W) of preprocessed images, on one device: ``Predictor(model, variables)(images)``.

  Puts (and on accelerators packs) the variables at each call; to predict many batches, make one
  ``Predictor`` and call it.
  """
  return Predictor(model, variables)(images)
