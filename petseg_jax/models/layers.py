"""Convolution layers formulated so that XLA compiles them well on CPU and GPU.

Two layers of the tutorial model fall into XLA performance traps when written the obvious way:

* ``DepthwiseConv2D`` via ``feature_group_count`` runs at <1 GFLOP/s on XLA:CPU. Written as nine shifted
  multiply-adds it is the same function and runs 10-40x faster (the adds fuse into one loop).
* ``Conv2DTranspose`` (3x3, stride 2, "same") has a kernel gradient that XLA:CPU computes ~25x slower than a
  plain convolution's. The same function is a stride-1 2x2 convolution to ``4 * features`` channels followed
  by depth-to-space (sub-pixel convolution), whose forward and backward are ordinary convolutions.

Both modules keep the parameter layout of their reference formulation (``impl="reference"``), so the two are
interchangeable on the same variables; tests check them against each other and against Keras.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

IMPLS = ("fast", "reference")


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


def keras_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """Padding (before, after) of TensorFlow/Keras ``padding="same"`` for one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


class DepthwiseConv3x3(nn.Module):
  """3x3 depthwise convolution without bias, as Keras ``DepthwiseConv2D(3, strides)``.

  Padding follows Keras MobileNetV2: stride 1 uses "same"; stride 2 expects the caller to have applied
  MobileNetV2's asymmetric ``correct_pad`` zero padding and uses "valid".

  Attributes:
    strides: 1 or 2.
    padding: "same" or "valid" (Keras semantics).
    impl: "fast" (nine shifted multiply-adds) or "reference" (``lax.conv`` with ``feature_group_count``).
  """

  strides: int = 1
  padding: str = "same"
  impl: str = "fast"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _check_impl(self.impl)
    channels = x.shape[-1]
    # Same layout as flax.linen.Conv(feature_group_count=channels): (kh, kw, 1, channels).
    kernel = self.param("kernel", self.kernel_init, (3, 3, 1, channels), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    s = self.strides
    if self.padding == "same":
      pads = [keras_same_padding(x.shape[1], 3, s), keras_same_padding(x.shape[2], 3, s)]
    elif self.padding == "valid":
      pads = [(0, 0), (0, 0)]
    else:
      raise ValueError(f"padding={self.padding!r}; expected 'same' or 'valid'")
    if self.impl == "reference":
      return jax.lax.conv_general_dilated(
          x, kernel, window_strides=(s, s), padding=pads,
          dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=channels)
    x = jnp.pad(x, [(0, 0), *pads, (0, 0)])
    out_h = (x.shape[1] - 3) // s + 1
    out_w = (x.shape[2] - 3) // s + 1
    out = None
    for dy in range(3):
      for dx in range(3):
        window = jax.lax.slice(
            x, (0, dy, dx, 0),
            (x.shape[0], dy + (out_h - 1) * s + 1, dx + (out_w - 1) * s + 1, channels),
            (1, s, s, 1))
        term = window * kernel[dy, dx, 0]
        out = term if out is None else out + term
    return out


def _subpixel_kernel(kernel: Array) -> Array:
  """Rearranges a 3x3 stride-2 transposed-conv kernel into a 2x2 stride-1 conv kernel with 4x outputs.

  With TF "same" padding at stride 2 and kernel 3, output row ``n = 2*m + k`` receives input row ``m``
  through kernel row ``k``. Output row ``2j`` gets ``in[j] K0 + in[j-1] K2``; row ``2j+1`` gets ``in[j] K1``.
  So on an input padded by one row at the top, the 2-tap window ``(in[j-1], in[j])`` uses taps
  ``(K2, K0)`` for even outputs and ``(0, K1)`` for odd ones; the same holds for columns.
  """
  zero = jnp.zeros_like(kernel[0, 0])
  # taps[parity] = (kernel index for window offset -1, for offset 0) along one axis; None = no tap.
  taps = {0: (2, 0), 1: (None, 1)}

  def window_kernel(parity_y: int, parity_x: int) -> Array:  # (2, 2, in, out)
    return jnp.stack([
        jnp.stack([zero if a is None or b is None else kernel[a, b] for b in taps[parity_x]])
        for a in taps[parity_y]])

  # Output channel index ordered (py, px, out), as depth_to_space expects.
  per_parity = [window_kernel(py, px) for py in (0, 1) for px in (0, 1)]
  return jnp.stack(per_parity, axis=3).reshape(2, 2, kernel.shape[2], 4 * kernel.shape[3])


def depth_to_space(x: Array, block: int = 2) -> Array:
  """(N, H, W, b*b*C) -> (N, b*H, b*W, C), channel index ordered (row offset, column offset, C)."""
  n, h, w, c = x.shape
  c_out = c // (block * block)
  x = x.reshape(n, h, w, block, block, c_out)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(n, h * block, w * block, c_out)


class ConvTranspose3x3s2(nn.Module):
  """Keras ``Conv2DTranspose(features, 3, strides=2, padding="same")``: doubles height and width.

  The kernel has shape (3, 3, in, out) and ``out[2m + k] += in[m] @ kernel[k]`` per axis (Keras' kernel
  is (3, 3, out, in) with the same spatial order).

  Attributes:
    features: output channels.
    use_bias: add a bias (the tutorial's last layer does; the pix2pix blocks don't).
    impl: "fast" (sub-pixel: 2x2 conv + depth-to-space) or "reference" (``lax.conv_transpose``).
  """

  features: int
  use_bias: bool = False
  impl: str = "fast"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array) -> Array:
    _check_impl(self.impl)
    kernel = self.param("kernel", self.kernel_init, (3, 3, x.shape[-1], self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    x, kernel, bias = nn.dtypes.promote_dtype(x, kernel, bias, dtype=self.dtype)
    dn = ("NHWC", "HWIO", "NHWC")
    if self.impl == "reference":
      # Transposed conv = input-dilated conv with the spatially flipped kernel; padding (2, 1) gives 2x size.
      y = jax.lax.conv_general_dilated(
          x, kernel[::-1, ::-1], window_strides=(1, 1), padding=[(2, 1), (2, 1)],
          lhs_dilation=(2, 2), dimension_numbers=dn)
    else:
      y = jax.lax.conv_general_dilated(
          x, _subpixel_kernel(kernel), window_strides=(1, 1), padding=[(1, 0), (1, 0)],
          dimension_numbers=dn)
      y = depth_to_space(y, 2)
    if bias is not None:
      y = y + bias
    return y
