"""The tutorial's "modified U-Net": MobileNetV2 encoder + pix2pix upsampling decoder."""

from __future__ import annotations

from typing import Any, Collection, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from petseg_jax.models.layers import ConvTranspose3x3s2, batch_norm
from petseg_jax.models.mobilenet_v2 import TAP_NAMES, MobileNetV2Encoder

Array = jax.Array

# Keras' BatchNormalization defaults, used by the pix2pix upsample blocks (the momentum is configurable:
# at 0.99 the running statistics that evaluation uses lag the weights for the first few hundred steps).
DECODER_BN_MOMENTUM = 0.99
DECODER_BN_EPSILON = 1e-3


class UpsampleBlock(nn.Module):
  """pix2pix ``upsample``: ConvTranspose 3x3 stride 2 (no bias, N(0, 0.02)) → BatchNorm → Dropout → ReLU."""

  features: int
  dropout: float = 0.0
  dtype: Any = None
  impl: str = "fast"
  bn_axis_name: str | None = None
  bn_momentum: float = DECODER_BN_MOMENTUM
  batch_norm_folded: bool = False  # Inference only: a FoldedBatchNorm instead of the BatchNorm.

  @nn.compact
  def __call__(self, x: Array | Sequence[Array], train: bool = False, frozen_batch_norm: bool = False
               ) -> Array:
    """``x``: the input, or its channel blocks (see ``ConvTranspose3x3s2``). ``frozen_batch_norm``: the
    BatchNorm runs on its running statistics even when ``train`` (Keras' ``trainable=False``)."""
    x = ConvTranspose3x3s2(self.features, use_bias=False, impl=self.impl, dtype=self.dtype,
                           kernel_init=nn.initializers.normal(0.02), name="conv_transpose")(x)
    # BatchNorm, dropout and ReLU in float32, rounded once to the convolution's dtype (see
    # MobileNetV2Encoder._bn).
    y = batch_norm(x, "bn", folded=self.batch_norm_folded, train=train and not frozen_batch_norm,
                   momentum=self.bn_momentum,
                   epsilon=DECODER_BN_EPSILON, axis_name=self.bn_axis_name)
    if self.dropout > 0:
      y = nn.Dropout(self.dropout, deterministic=not train)(y)
    return nn.relu(y).astype(x.dtype)


class Decoder(nn.Module):
  """Upsamples the bottleneck, concatenating the skips in reverse order, to per-pixel logits."""

  num_classes: int = 3
  filters: Sequence[int] = (512, 256, 128, 64)
  dropout: float = 0.0
  dtype: Any = None
  impl: str = "fast"
  bn_axis_name: str | None = None
  bn_momentum: float = DECODER_BN_MOMENTUM
  batch_norm_folded: bool = False

  @nn.compact
  def __call__(self, taps: dict[str, Array], train: bool = False, frozen_batch_norms: Collection[str] = ()
               ) -> Array:
    """Logits from the encoder's ``taps``. ``frozen_batch_norms``: BatchNorm layers ("up_0/bn", ...) that run
    on their running statistics even when ``train``."""
    skips = [taps[name] for name in TAP_NAMES]
    if len(self.filters) != len(skips) - 1:
      raise ValueError(f"decoder_filters needs {len(skips) - 1} entries, got {tuple(self.filters)}")
    batch_norms = [f"up_{i}/bn" for i in range(len(self.filters))]
    unknown = set(frozen_batch_norms) - set(batch_norms)
    if unknown:
      raise ValueError(f"frozen_batch_norms: {sorted(unknown)} are not BatchNorm layers of the decoder (they are "
                       f"{batch_norms}).")
    # Each layer's input is the concatenation [upsampled, skip], passed as its two channel blocks: the
    # same function, and the gradient of a frozen encoder's skip is never computed.
    x = skips[-1]
    for i, (features, skip) in enumerate(zip(self.filters, reversed(skips[:-1]))):
      y = UpsampleBlock(features, self.dropout, self.dtype, self.impl, self.bn_axis_name,
                        self.bn_momentum, self.batch_norm_folded, name=f"up_{i}")(
                            x, train, frozen_batch_norm=batch_norms[i] in frozen_batch_norms)
      x = (y, skip.astype(y.dtype))
    # Keras Conv2DTranspose defaults for the last layer: glorot-uniform kernel, zero bias.
    return ConvTranspose3x3s2(self.num_classes, use_bias=True, impl=self.impl, dtype=self.dtype,
                              name="last")(x)


class UNet(nn.Module):
  """MobileNetV2 U-Net returning logits (N, H, W, num_classes); softmax lives in the loss.

  Variables: ``params``/``batch_stats`` with subtrees ``encoder`` (Keras MobileNetV2 layer names) and
  ``decoder`` (``up_0``..``up_3``, ``last``), so that training can freeze the encoder by path.

  Call with ``train=True`` for training-mode BatchNorm and dropout. ``frozen_encoder=True`` runs the encoder
  as Keras does for ``trainable=False`` (BatchNorm on running statistics) and stops gradients at its
  outputs, so no encoder backward pass is computed. ``frozen_batch_norms`` are the paths of other BatchNorm
  layers that run so (e.g. "encoder/block_1_expand_BN", "decoder/up_0/bn"): those of layers frozen by path.

  ``batch_norm_folded=True`` is the same function for inference with each BatchNorm folded into the
  convolution before it (variables from ``petseg_jax.models.fold_batch_norm``): fewer operations per call
  (on an H200, 142 GPU kernels instead of 190 and ~10% less time for a batch-64 inference call).
  """

  num_classes: int = 3
  alpha: float = 1.0
  decoder_filters: Sequence[int] = (512, 256, 128, 64)
  dropout: float = 0.0
  dtype: Any = None
  impl: str = "fast"
  bn_axis_name: str | None = None
  decoder_bn_momentum: float = DECODER_BN_MOMENTUM
  batch_norm_folded: bool = False

  @nn.compact
  def __call__(self, x: Array, train: bool = False, frozen_encoder: bool = False,
               frozen_batch_norms: Collection[str] = ()) -> Array:
    if train and self.batch_norm_folded:
      raise ValueError("A UNet with batch_norm_folded=True is for inference only (its BatchNorms have no "
                       "statistics to train); call it with train=False, or train the unfolded model.")
    frozen = {"encoder": [], "decoder": []}
    for path in frozen_batch_norms:
      part, _, name = path.partition("/")
      if part not in frozen:
        raise ValueError(f"frozen_batch_norms: {path!r} is not an 'encoder/...' or 'decoder/...' layer path.")
      frozen[part].append(name)
    taps = MobileNetV2Encoder(self.alpha, self.dtype, self.impl, self.bn_axis_name, self.batch_norm_folded,
                              name="encoder")(x, train=train and not frozen_encoder,
                                              frozen_batch_norms=frozen["encoder"])
    if frozen_encoder:
      taps = jax.tree.map(jax.lax.stop_gradient, taps)
    logits = Decoder(self.num_classes, tuple(self.decoder_filters), self.dropout, self.dtype, self.impl,
                     self.bn_axis_name, self.decoder_bn_momentum, self.batch_norm_folded,
                     name="decoder")(taps, train=train, frozen_batch_norms=frozen["decoder"])
    return logits.astype(jnp.float32)
