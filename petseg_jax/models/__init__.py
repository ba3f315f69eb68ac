"""Model definitions: the Keras-compatible MobileNetV2 encoder and the tutorial's U-Net."""

from __future__ import annotations

import jax.numpy as jnp
import ml_collections

from petseg_jax.models.layers import ConvTranspose3x3s2, DepthwiseConv3x3
from petseg_jax.models.mobilenet_v2 import TAP_NAMES, MobileNetV2Encoder, make_divisible
from petseg_jax.models.unet import Decoder, UNet, UpsampleBlock

DTYPES = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}


def create_model(model_config: ml_collections.ConfigDict, bn_axis_name: str | None = None) -> UNet:
  """Builds the ``UNet`` described by ``config.model``."""
  if model_config.dtype not in DTYPES:
    raise ValueError(f"config.model.dtype={model_config.dtype!r}; expected one of {sorted(DTYPES)}")
  return UNet(
      num_classes=model_config.num_classes,
      alpha=model_config.alpha,
      decoder_filters=tuple(model_config.decoder_filters),
      dropout=model_config.dropout,
      dtype=DTYPES[model_config.dtype],
      impl=model_config.conv_impl,
      bn_axis_name=bn_axis_name,
      decoder_bn_momentum=model_config.decoder_bn_momentum)


__all__ = [
    "ConvTranspose3x3s2", "Decoder", "DepthwiseConv3x3", "MobileNetV2Encoder", "TAP_NAMES", "UNet",
    "UpsampleBlock", "create_model", "make_divisible",
]
