"""Model definitions: the Keras-compatible MobileNetV2 encoder and the tutorial's U-Net."""

from __future__ import annotations

import functools
import math
import numbers
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections

from petseg_jax import config_files
from petseg_jax.models.folding import fold_batch_norm
from petseg_jax.models.layers import IMPLS, ConvTranspose3x3s2, DepthwiseConv3x3, FoldedBatchNorm
from petseg_jax.models.mobilenet_v2 import TAP_NAMES, MobileNetV2Encoder, make_divisible
from petseg_jax.models.unet import Decoder, UNet, UpsampleBlock

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def check_model_config(model_config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first ``config.model`` field that cannot describe a U-Net.

  Without it, alpha <= 0 or a filter count <= 0 silently builds a degenerate network, num_classes=0 fails
  deep inside the initializer (ZeroDivisionError) and dropout >= 1 zeroes the decoder.
  """
  m = model_config
  if m.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={m.dtype!r}; expected one of {sorted(DTYPES)}")
  if m.conv_impl not in IMPLS:
    raise ValueError(f"config.model.conv_impl={m.conv_impl!r}; expected one of {IMPLS}")
  if (not isinstance(m.alpha, numbers.Real) or isinstance(m.alpha, bool) or not math.isfinite(m.alpha)
      or m.alpha <= 0):
    raise ValueError(f"config.model.alpha={m.alpha!r} must be a positive width multiplier (Keras publishes "
                     "ImageNet weights for 0.35, 0.5, 0.75, 1.0, 1.3, 1.4).")
  if not _is_int(m.num_classes) or m.num_classes < 1:
    raise ValueError(f"config.model.num_classes={m.num_classes!r} must be a positive integer.")
  filters = tuple(m.decoder_filters) if isinstance(m.decoder_filters, (list, tuple)) else (m.decoder_filters,)
  if len(filters) != len(TAP_NAMES) - 1 or not all(_is_int(f) and f > 0 for f in filters):
    raise ValueError(f"config.model.decoder_filters={filters!r} must be {len(TAP_NAMES) - 1} positive "
                     "integers, one per upsampling block (e.g. (512, 256, 128, 64)).")
  # A momentum of 1 describes a model (one whose statistics never moved); training refuses it.
  problem = (config_files.value_problem("model.dropout", m.dropout, "number", 0, 1, below=True)
             or config_files.value_problem("model.decoder_bn_momentum", m.decoder_bn_momentum, "number", 0, 1)
             or config_files.value_problem("model.freeze_encoder", m.freeze_encoder, "bool"))
  if problem:
    raise ValueError(problem)


def create_model(model_config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> UNet:
  """Builds the ``UNet`` described by ``config.model``.

  Raises:
    ValueError: a field that cannot describe a U-Net (``check_model_config``), named with its value.
  """
  check_model_config(model_config)
  return UNet(
      num_classes=model_config.num_classes,
      alpha=model_config.alpha,
      decoder_filters=tuple(model_config.decoder_filters),
      dropout=model_config.dropout,
      dtype=DTYPES[model_config.dtype],
      impl=model_config.conv_impl,
      bn_axis_name=bn_axis_name,
      decoder_bn_momentum=model_config.decoder_bn_momentum)


def variable_shapes(model: UNet, image_size: int) -> dict[str, Any]:
  """``{"params", "batch_stats"}`` of ``model`` as ``jax.ShapeDtypeStruct``s (nothing is computed)."""
  return jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                        jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))


__all__ = [
    "ConvTranspose3x3s2", "Decoder", "DepthwiseConv3x3", "FoldedBatchNorm", "MobileNetV2Encoder", "TAP_NAMES",
    "UNet", "UpsampleBlock", "check_model_config", "create_model", "fold_batch_norm", "make_divisible",
    "variable_shapes",
]
