"""MobileNetV2 feature encoder with Keras-compatible layer names.

The architecture, channel rounding, BatchNorm hyper-parameters and padding follow
``keras.applications.MobileNetV2(include_top=False)`` exactly, so Keras ImageNet weights load by layer name
(see ``petseg_jax.weights``) and the encoder computes the same function. Only the layers the U-Net taps
are built: the network stops at ``block_16_project`` (as the tutorial's ``down_stack`` model does), so
``block_16_project_BN`` and ``Conv_1`` are not part of it.
"""

from __future__ import annotations

from typing import Any, Collection

import flax.linen as nn
import jax
import jax.numpy as jnp

from petseg_jax.models.layers import Conv, DepthwiseConv3x3, batch_norm

Array = jax.Array

# The U-Net skip connections and bottleneck, in order of decreasing resolution (stride 2, 4, 8, 16, 32).
TAP_NAMES = (
    "block_1_expand_relu",
    "block_3_expand_relu",
    "block_6_expand_relu",
    "block_13_expand_relu",
    "block_16_project",
)

# (filters, stride, expansion) of inverted residual blocks 0..16, as in Keras' MobileNetV2.
BLOCKS = (
    (16, 1, 1),
    (24, 2, 6), (24, 1, 6),
    (32, 2, 6), (32, 1, 6), (32, 1, 6),
    (64, 2, 6), (64, 1, 6), (64, 1, 6), (64, 1, 6),
    (96, 1, 6), (96, 1, 6), (96, 1, 6),
    (160, 2, 6), (160, 1, 6), (160, 1, 6),
    (320, 1, 6),
)

BN_EPSILON = 1e-3
BN_MOMENTUM = 0.999


def make_divisible(value: float, divisor: int = 8) -> int:
  """Keras' channel rounding: nearest multiple of ``divisor``, never below 90% of ``value``."""
  rounded = max(divisor, int(value + divisor / 2) // divisor * divisor)
  if rounded < 0.9 * value:
    rounded += divisor
  return rounded


def block_channels(alpha: float) -> list[tuple[int, int, int, int]]:
  """(block_id, expanded channels, output channels, stride) for every inverted residual block."""
  in_channels = make_divisible(32 * alpha)
  out = []
  for block_id, (filters, stride, expansion) in enumerate(BLOCKS):
    out_channels = make_divisible(int(filters * alpha))
    out.append((block_id, expansion * in_channels, out_channels, stride))
    in_channels = out_channels
  return out


class MobileNetV2Encoder(nn.Module):
  """MobileNetV2 up to ``block_16_project``, returning the five U-Net taps.

  Attributes:
    alpha: width multiplier (Keras ``alpha``); channels are rounded as Keras does.
    dtype: computation dtype (e.g. ``jnp.bfloat16``); parameters stay float32.
    impl: convolution formulation, "fast", "reference" or "explicit" (see ``petseg_jax.models.layers``).
    bn_axis_name: pmap axis over which training-mode BatchNorm statistics are averaged.
    batch_norm_folded: inference only: each BatchNorm is a ``FoldedBatchNorm`` (variables from
      ``petseg_jax.models.fold_batch_norm``).

  Input: images (N, H, W, 3) scaled to [-1, 1], H and W divisible by 32.
  Output: dict ``{tap_name: activation}`` for the names in ``TAP_NAMES`` (finest to coarsest); index it by
  ``TAP_NAMES`` for that order: a dict returned through ``jax.jit`` comes back with its keys sorted.
  """

  alpha: float = 1.0
  dtype: Any = None
  impl: str = "fast"
  bn_axis_name: str | None = None
  batch_norm_folded: bool = False

  def _bn(self, name: str, x: Array, train: bool, relu6: bool = False) -> Array:
    """BatchNorm (and ReLU6) in float32, rounded once to ``x``'s dtype.

    With bfloat16 activations this is more accurate than rounding after every operation, and faster on CPU,
    where each bfloat16 operation is a float32 one plus a rounding step.
    """
    y = batch_norm(x, name, folded=self.batch_norm_folded, train=train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                   axis_name=self.bn_axis_name)
    return (jnp.clip(y, 0, 6) if relu6 else y).astype(x.dtype)

  def _conv1x1(self, features: int, name: str) -> Conv:
    # Same variables as nn.Conv(features, (1, 1), use_bias=False); computed as a matmul on CPU.
    return Conv(features, 1, impl=self.impl, dtype=self.dtype, name=name)

  @nn.compact
  def __call__(self, x: Array, train: bool = False, frozen_batch_norms: Collection[str] = ()
               ) -> dict[str, Array]:
    """The taps of ``x``. ``train=True``: training-mode BatchNorm, except in the layers named in
    ``frozen_batch_norms`` (e.g. "block_1_expand_BN"), which run on their running statistics and leave them
    unchanged, as Keras' BatchNormalization with ``trainable=False`` does."""
    height, width = x.shape[1:3]
    if height % 32 or width % 32 or height <= 0 or width <= 0:
      raise ValueError(
          f"MobileNetV2Encoder needs positive height and width divisible by 32; got {height}x{width}. "
          "Resize the input (config.data.image_size).")
    batch_norms = []

    def bn(name: str, x: Array, relu6: bool = False) -> Array:
      batch_norms.append(name)
      return self._bn(name, x, train and name not in frozen_batch_norms, relu6)

    taps = {}
    x = Conv(make_divisible(32 * self.alpha), 3, strides=2, padding="same", impl=self.impl, dtype=self.dtype,
             name="Conv1")(x)
    x = bn("bn_Conv1", x, relu6=True)

    for block_id, expanded, out_channels, stride in block_channels(self.alpha):
      inputs = x
      prefix = f"block_{block_id}_" if block_id else "expanded_conv_"
      if block_id:
        x = self._conv1x1(expanded, prefix + "expand")(x)
        x = bn(prefix + "expand_BN", x, relu6=True)
        taps[prefix + "expand_relu"] = x
      # At stride 2, "same" is Keras' correct_pad + "valid" (see DepthwiseConv3x3).
      x = DepthwiseConv3x3(strides=stride, padding="same", impl=self.impl, dtype=self.dtype,
                           name=prefix + "depthwise")(x)
      x = bn(prefix + "depthwise_BN", x, relu6=True)
      x = self._conv1x1(out_channels, prefix + "project")(x)
      taps[prefix + "project"] = x
      if block_id == 16:
        break  # The tap is the projection before its BatchNorm, as in the tutorial.
      x = bn(prefix + "project_BN", x)
      if inputs.shape[-1] == out_channels and stride == 1:
        x = x + inputs
    unknown = set(frozen_batch_norms) - set(batch_norms)
    if unknown:  # A typo would otherwise silently train the layer it meant to freeze.
      raise ValueError(f"frozen_batch_norms: {sorted(unknown)} are not BatchNorm layers of the encoder "
                       f"(they are {batch_norms[0]!r}, {batch_norms[1]!r}, ..., {batch_norms[-1]!r}).")
    return {name: taps[name] for name in TAP_NAMES}
