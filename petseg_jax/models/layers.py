"""Convolution layers formulated so that XLA compiles them well on CPU (and GPU).

The tutorial model's convolutions fall into XLA:CPU performance traps when written the obvious way
(per-layer measurements, ``scripts/benchmark.py --mode layers``, in BENCHMARKS.md):

* ``DepthwiseConv2D`` via ``feature_group_count`` is slow. Written as nine shifted multiply-adds it is the
  same function and runs 3.7-40x faster forward + backward (the adds fuse into one loop).
* ``Conv2DTranspose`` (3x3, stride 2, "same") as an input-dilated convolution multiplies 3/4 zeros, and its
  kernel gradient is very slow. Here it is one matmul of the input with all nine kernel taps (exactly the
  transposed convolution's FLOPs) followed by an overlap-add, with a hand-written backward pass of two
  matmuls: 6.7-118x faster forward + backward.
* 1x1 convolutions (``Conv``) are matmuls; written as ``dot_general`` their forward and gradients are 1.4-4.1x
  faster.
* The RGB stem (a 3x3 ``Conv``, MobileNetV2's ``Conv1``): XLA:CPU's convolution of 3 input channels runs at a
  few percent of the matmul rate; gathering the nine windows (27 channels) and doing one matmul is faster.

All matmuls accumulate in float32 (``preferred_element_type``): with bfloat16 inputs that is both the more
accurate and, on XLA:CPU, the fast path (bfloat16 x bfloat16 -> bfloat16 matmuls are not faster than
float32 ones; bfloat16 -> float32 ones use the bfloat16 matrix units where the CPU has them). The depthwise
sums accumulate in float32 too. With bfloat16 activations the model is bound by memory traffic on CPU, so
bfloat16 pads and concatenations move bit patterns (``_as_bits``: XLA:CPU would write them in float32).

Every module keeps the parameters of its reference formulation (``impl="reference"``: the plain ``lax``
convolution), so the two are interchangeable on the same variables; tests check them against each other,
forward and gradients, and against Keras. ``impl="fast"`` picks the formulation per backend at trace time:
the ones above on CPU and GPU, the ``lax`` convolutions elsewhere (TPU: not measured). On an H200 the
formulations above trained 2.5x faster in bfloat16 than the ``lax`` convolutions XLA hands to cuDNN (whose
kernel gradient of the last transposed convolution alone took 4.2 of a 12.2 ms step); numbers in
BENCHMARKS.md. ``impl="explicit"`` uses the formulations above on every backend (to time them against
``"reference"`` on a new accelerator: ``scripts/benchmark.py --impl explicit``).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from typing import Any, Callable, Iterator, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array
Dtype = Any
Initializer = Callable[..., Array]

IMPLS = ("fast", "reference", "explicit")
_NHWC = ("NHWC", "HWIO", "NHWC")


def _check_impl(impl: str) -> None:
  if impl not in IMPLS:
    raise ValueError(f"impl={impl!r} is not one of {IMPLS}")


# Backends on which "fast" means the explicit formulations: measured faster there (BENCHMARKS.md). Elsewhere
# (TPU: not measured) "fast" keeps the lax convolutions.
EXPLICIT_BACKENDS = ("cpu", "gpu")


def _use_explicit_formulation(impl: str) -> bool:
  """``impl="explicit"``, or ``"fast"`` on a backend of ``EXPLICIT_BACKENDS`` (where the traced computation
  will run)."""
  _check_impl(impl)
  return impl == "explicit" or (impl == "fast" and jax.default_backend() in EXPLICIT_BACKENDS)


def keras_same_padding(size: int, kernel: int, stride: int) -> tuple[int, int]:
  """Padding (before, after) of TensorFlow/Keras ``padding="same"`` for one spatial axis."""
  out = -(-size // stride)
  total = max((out - 1) * stride + kernel - size, 0)
  return total // 2, total - total // 2


# --- matmul with float32 accumulation --------------------------------------------------------------------


def _dot(a: Array, b: Array, contract: tuple[tuple[int, ...], tuple[int, ...]], dtype: Dtype) -> Array:
  out = jax.lax.dot_general(a, b, (contract, ((), ())), preferred_element_type=jnp.float32)
  return out.astype(dtype)


@jax.custom_vjp
def matmul(x: Array, w: Array) -> Array:
  """``x @ w`` over the last axis of ``x`` (any leading axes), accumulated in float32, in ``x.dtype``.

  The backward pass is written out so that its two matmuls also take the inputs' dtype and accumulate in
  float32; autodiff would feed them the float32 cotangent of the accumulation and run them in float32.
  """
  return _dot(x, w, ((x.ndim - 1,), (0,)), x.dtype)


def _matmul_fwd(x: Array, w: Array) -> tuple[Array, tuple[Array, Array]]:
  return matmul(x, w), (x, w)


def _matmul_bwd(residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, w = residuals
  g = g.astype(x.dtype)
  dx = _dot(g, w, ((g.ndim - 1,), (1,)), x.dtype)
  batch_axes = tuple(range(x.ndim - 1))
  dw = _dot(x, g, (batch_axes, batch_axes), w.dtype)
  return dx, dw


matmul.defvjp(_matmul_fwd, _matmul_bwd)


# --- padding, shifted windows, concatenation ---------------------------------------------------------


def _conv_padding(padding: str | Sequence[tuple[int, int]], spatial: Sequence[int], stride: int
                  ) -> list[tuple[int, int]]:
  """(before, after) per spatial axis for a 3x3 window: Keras "same"/"valid", or explicit pairs."""
  if padding == "same":
    return [keras_same_padding(size, 3, stride) for size in spatial]
  if padding == "valid":
    return [(0, 0)] * len(spatial)
  if not isinstance(padding, str) and len(padding) == len(spatial):
    return [(int(before), int(after)) for before, after in padding]
  raise ValueError(f"padding={padding!r}; expected 'same', 'valid' or ((top, bottom), (left, right))")


def _as_bits(f: Callable[..., Array], *arrays: Array) -> Array:
  """On CPU, ``f`` (data movement only: a pad, a concatenation) applied to bfloat16 arrays as 16-bit patterns.

  XLA:CPU computes bfloat16 pads and concatenations in float32: it writes a float32 copy, twice the bytes
  of the bfloat16 result, and this model is bound by memory traffic on CPU. On the bit patterns it moves
  16-bit words (bfloat16 zero is the all-zero pattern, so zero padding is unchanged). Integers carry no
  gradient: callers that are differentiated define their backward pass (``_zero_pad``, ``_channel_concat``).
  """
  if arrays[0].dtype != jnp.bfloat16 or jax.default_backend() != "cpu":
    return f(*arrays)
  bits = f(*(jax.lax.bitcast_convert_type(a, jnp.uint16) for a in arrays))
  return jax.lax.bitcast_convert_type(bits, jnp.bfloat16)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _zero_pad(x: Array, pads: tuple[tuple[int, int], ...]) -> Array:
  """``jnp.pad(x, pads)`` with zeros, moved as bits in bfloat16 (``_as_bits``)."""
  return _as_bits(lambda x: jnp.pad(x, pads), x)


def _zero_pad_fwd(x: Array, pads: tuple[tuple[int, int], ...]) -> tuple[Array, None]:
  return _zero_pad(x, pads), None


def _zero_pad_bwd(pads: tuple[tuple[int, int], ...], _: None, g: Array) -> tuple[Array]:
  return (jax.lax.slice(g, [before for before, _ in pads],
                        [size - after for size, (_, after) in zip(g.shape, pads)]),)


_zero_pad.defvjp(_zero_pad_fwd, _zero_pad_bwd)


def _channel_concat(parts: tuple[Array, ...]) -> Array:
  """Concatenation along the last axis (moved as bits in bfloat16, ``_as_bits``)."""
  return parts[0] if len(parts) == 1 else _concat_bits(tuple(p.shape[-1] for p in parts), *parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0,))
def _concat_bits(widths: tuple[int, ...], *parts: Array) -> Array:
  del widths  # Used by the backward pass.
  return _as_bits(lambda *p: jnp.concatenate(p, axis=-1), *parts)


def _concat_bits_fwd(widths: tuple[int, ...], *parts: Array) -> tuple[Array, None]:
  return _concat_bits(widths, *parts), None


def _concat_bits_bwd(widths: tuple[int, ...], _: None, g: Array) -> tuple[Array, ...]:
  return tuple(jnp.split(g, np.cumsum(widths)[:-1].tolist(), axis=-1))


_concat_bits.defvjp(_concat_bits_fwd, _concat_bits_bwd)


def _shifted_windows(x: Array, pads: Sequence[tuple[int, int]], stride: int
                     ) -> Iterator[tuple[int, int, Array]]:
  """Yields ``(dy, dx, window)``: what each 3x3 tap multiplies, ``x_padded[s*i + dy, s*j + dx]`` at ``[i, j]``.

  Strided slices of one zero-padded copy. (Per-tap pads of ``x`` instead, which XLA fuses into the
  consumer, avoid that copy but made the depthwise fusions 10-17x slower on XLA:CPU, measured.)
  """
  x = _zero_pad(x, ((0, 0), *map(tuple, pads), (0, 0)))
  out_h = (x.shape[1] - 3) // stride + 1
  out_w = (x.shape[2] - 3) // stride + 1
  for dy in range(3):
    for dx in range(3):
      yield dy, dx, jax.lax.slice(
          x, (0, dy, dx, 0), (x.shape[0], dy + (out_h - 1) * stride + 1, dx + (out_w - 1) * stride + 1,
                              x.shape[3]), (1, stride, stride, 1))


# --- convolutions: 3x3 depthwise, 1x1 and 3x3 ------------------------------------------------------------


class DepthwiseConv3x3(nn.Module):
  """3x3 depthwise convolution without bias, as Keras ``DepthwiseConv2D(3, strides)``.

  Keras MobileNetV2 pads stride-2 layers with its asymmetric ``correct_pad`` and convolves "valid"; for a
  3x3 window at stride 2 those are exactly TensorFlow's "same" pads, so "same" serves both strides.

  Attributes:
    strides: 1 or 2.
    padding: "same", "valid" (Keras semantics) or explicit ``((top, bottom), (left, right))``.
    impl: "fast" (nine shifted multiply-adds on CPU and GPU), "explicit" (those on every backend) or "reference"
      (``lax.conv`` with ``feature_group_count``).
  """

  strides: int = 1
  padding: str | Sequence[tuple[int, int]] = "same"
  impl: str = "fast"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.glorot_uniform()

  @nn.compact
  def __call__(self, x: Array) -> Array:
    channels = x.shape[-1]
    # Same layout as flax.linen.Conv(feature_group_count=channels): (kh, kw, 1, channels).
    kernel = self.param("kernel", self.kernel_init, (3, 3, 1, channels), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    s = self.strides
    pads = _conv_padding(self.padding, x.shape[1:3], s)
    if not _use_explicit_formulation(self.impl):
      return jax.lax.conv_general_dilated(
          x, kernel, window_strides=(s, s), padding=pads, dimension_numbers=_NHWC,
          feature_group_count=channels)
    return depthwise_conv3x3(x, kernel, pads, s)


def depthwise_conv3x3(x: Array, kernel: Array, pads: Sequence[tuple[int, int]], stride: int) -> Array:
  """3x3 depthwise convolution of ``x`` (N, H, W, C) with ``kernel`` (3, 3, 1, C) as nine shifted multiply-adds.

  ``pads``: ((top, bottom), (left, right)) zeros around ``x``. The sums accumulate in float32 and are rounded
  once to ``x``'s dtype (as the matmuls are): with bfloat16 inputs that is both more accurate and faster on
  CPU, where each bfloat16 operation is a float32 one plus a rounding step. So is the input gradient
  (``_rounded_once_depthwise``).
  """
  pads = tuple((int(before), int(after)) for before, after in pads)  # Hashable: the backward pass's static.
  if jnp.promote_types(x.dtype, jnp.float32) == x.dtype:
    # float32: autodiff's transpose already runs in float32. (The custom backward pass below, used here
    # too, made float32 fine-tuning steps 2% slower in five of six alternating pairs.)
    return _depthwise_sums(x, kernel, pads, stride)
  return _rounded_once_depthwise(x, kernel, pads, stride)


def _depthwise_sums(x: Array, kernel: Array, pads: tuple[tuple[int, int], ...], stride: int) -> Array:
  """The nine taps' products summed in float32 (or x's dtype if wider), not rounded."""
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  out = None
  for dy, dx, window in _shifted_windows(x, pads, stride):
    term = window.astype(accumulate) * kernel[dy, dx, 0].astype(accumulate)
    out = term if out is None else out + term
  return out


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _rounded_once_depthwise(x: Array, kernel: Array, pads: tuple[tuple[int, int], ...], stride: int) -> Array:
  """``depthwise_conv3x3`` of an input narrower than float32, its input gradient also rounded once.

  Autodiff of the forward pass takes the input gradient in x's dtype: in bfloat16, the nine taps' padded
  gradients are added and rounded one after another (on XLA:CPU a float32 pass plus a rounding step each,
  over the whole padded input). The backward pass here runs that transpose in float32 and rounds once:
  bfloat16 fine-tuning steps 29-35% faster (medians of three interleaved runs; BENCHMARKS.md).
  """
  return _depthwise_sums(x, kernel, pads, stride).astype(x.dtype)


def _rounded_once_depthwise_fwd(x: Array, kernel: Array, pads: tuple[tuple[int, int], ...], stride: int
                                ) -> tuple[Array, tuple[Array, Array]]:
  return _rounded_once_depthwise(x, kernel, pads, stride), (x, kernel)


def _rounded_once_depthwise_bwd(pads: tuple[tuple[int, int], ...], stride: int,
                                residuals: tuple[Array, Array], g: Array) -> tuple[Array, Array]:
  x, kernel = residuals
  g = g.astype(jnp.float32)
  _, transpose = jax.vjp(lambda x: _depthwise_sums(x, kernel, pads, stride), x.astype(jnp.float32))
  (dx,) = transpose(g)
  dkernel = jnp.stack([jnp.sum(window.astype(jnp.float32) * g, axis=(0, 1, 2))
                       for _, _, window in _shifted_windows(x, pads, stride)])
  return dx.astype(x.dtype), dkernel.reshape(kernel.shape).astype(kernel.dtype)


_rounded_once_depthwise.defvjp(_rounded_once_depthwise_fwd, _rounded_once_depthwise_bwd)


class Conv(nn.Module):
  """1x1 or 3x3 convolution without bias: the variables and function of
  ``nn.Conv(features, (kernel_size, kernel_size), strides, padding, use_bias=False)``.

  The fast formulation is a matmul: over all pixels for a 1x1 convolution; for a 3x3 one, of the nine
  shifted windows gathered along channels (im2col), which suits a layer with few input channels like
  MobileNetV2's RGB stem (``Conv1``), where XLA:CPU's own convolution runs at a few percent of the machine's
  matmul rate.

  Attributes:
    features: output channels.
    kernel_size: 1 or 3.
    strides: 1 or 2 (1 for a 1x1 convolution).
    padding: "same", "valid" (Keras semantics) or, for 3x3, explicit ``((top, bottom), (left, right))``.
    impl: "fast" (matmul on CPU and GPU), "explicit" (matmul on every backend) or "reference" (``lax.conv``).
  """

  features: int
  kernel_size: int
  strides: int = 1
  padding: str | Sequence[tuple[int, int]] = "same"
  impl: str = "fast"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.lecun_normal()  # nn.Conv's default.

  @nn.compact
  def __call__(self, x: Array) -> Array:
    k, s = self.kernel_size, self.strides
    if (k, s) not in ((1, 1), (3, 1), (3, 2)) or (k == 1 and self.padding not in ("same", "valid")):
      raise ValueError(f"Conv supports 1x1 (stride 1, no padding) and 3x3 (stride 1 or 2); got "
                       f"kernel_size={k}, strides={s}, padding={self.padding!r}")
    kernel = self.param("kernel", self.kernel_init, (k, k, x.shape[-1], self.features), self.param_dtype)
    x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
    pads = _conv_padding(self.padding, x.shape[1:3], s) if k == 3 else [(0, 0), (0, 0)]
    if not _use_explicit_formulation(self.impl):
      return jax.lax.conv_general_dilated(x, kernel, (s, s), pads, dimension_numbers=_NHWC)
    if k == 1:
      return matmul(x, kernel[0, 0])
    columns = _channel_concat(tuple(window for _, _, window in _shifted_windows(x, pads, s)))
    return matmul(columns, kernel.reshape(-1, self.features))  # (dy, dx, in) order on both sides.


# --- 3x3 stride-2 transposed convolution -----------------------------------------------------------------


def _col2im_3x3s2(y: Array) -> Array:
  """Overlap-adds per-tap products (N, H, W, 3, 3, D) into the stride-2 transposed conv output (N, 2H, 2W, D).

  Per axis, TF "same" padding at stride 2 and kernel 3 sends input row ``m`` through kernel row ``k`` to
  output row ``2m + k`` (row ``2H`` is cropped). So output row ``2j`` sums tap ``k=0`` of row ``j`` and
  tap ``k=2`` of row ``j-1``; row ``2j+1`` is tap ``k=1`` of row ``j``. The same holds for columns.
  """
  n, h, w, _, _, d = y.shape
  # Shifts by one row/column with a zero border, padded per tap: XLA fuses these into the sums (a padded
  # copy of all of y would be materialized, and then read nine times).
  from_above = lambda z: jnp.pad(z[:, :-1], [(0, 0), (1, 0), (0, 0), (0, 0)])  # [j] = z[j-1]
  from_left = lambda z: jnp.pad(z[:, :, :-1], [(0, 0), (0, 0), (1, 0), (0, 0)])  # [l] = z[l-1]
  tap = lambda ky, kx: y[:, :, :, ky, kx]
  even_even = tap(0, 0) + from_above(tap(2, 0)) + from_left(tap(0, 2)) + from_above(from_left(tap(2, 2)))
  even_odd = tap(0, 1) + from_above(tap(2, 1))
  odd_even = tap(1, 0) + from_left(tap(1, 2))
  odd_odd = tap(1, 1)
  out = jnp.stack([jnp.stack([even_even, even_odd], axis=3), jnp.stack([odd_even, odd_odd], axis=3)], axis=2)
  return out.reshape(n, 2 * h, 2 * w, d)  # (N, H, 2, W, 2, D): rows and columns interleaved.


def _im2col_3x3s2(g: Array, h: int, w: int) -> Array:
  """The transpose of ``_col2im_3x3s2``: (N, 2H, 2W, D) → (N, H, W, 3, 3, D), ``[j, l, ky, kx] = g[2j+ky, 2l+kx]``
  (zero where that is the cropped row ``2H`` or column ``2W``).

  Taps 0 and 1 are the even and odd rows (columns) of a reshape; tap 2 is tap 0 of the next row (column).
  """
  n, _, _, d = g.shape
  g = g.reshape(n, h, 2, w, 2, d)
  next_row = lambda z: jnp.pad(z[:, 1:], [(0, 0), (0, 1), (0, 0), (0, 0)])  # [j] = z[j+1]
  next_col = lambda z: jnp.pad(z[:, :, 1:], [(0, 0), (0, 0), (0, 1), (0, 0)])  # [l] = z[l+1]

  def tap(ky: int, kx: int) -> Array:
    t = g[:, :, ky % 2, :, kx % 2]
    t = next_row(t) if ky == 2 else t
    return next_col(t) if kx == 2 else t

  return jnp.stack([jnp.stack([tap(ky, kx) for kx in range(3)], axis=3) for ky in range(3)], axis=3)


@jax.custom_vjp
def conv_transpose_3x3s2(parts: tuple[Array, ...], kernel: Array) -> Array:
  """Keras ``Conv2DTranspose(3, strides=2, padding="same")`` without bias: (N, H, W, in) → (N, 2H, 2W, out).

  ``parts`` are the input's channel blocks, in order (a U-Net decoder's upsampled features and encoder
  skip); the input is their concatenation. One matmul of the input with all nine taps,
  ``(N*H*W, in) @ (in, 9*out)`` (the transposed convolution's exact FLOPs in one large matmul), then
  ``_col2im_3x3s2``. The result is float32 whatever the inputs' dtype (the caller adds a bias before
  rounding). On CPU a product larger than the caches is computed a few images at a time (``_batch_chunks``).

  The backward pass is written out: it gathers the output gradient into per-tap rows
  (``_im2col_3x3s2``) and does an input-gradient matmul per part, and kernel-gradient matmuls (one over the
  concatenated input in float32, one per part in bfloat16). Autodiff of the overlap-add would
  materialize nine zero-padded copies of the per-tap gradient; and one input-gradient matmul per part means
  that the gradient of a part nobody differentiates (the skip of a frozen encoder, behind ``stop_gradient``)
  is dead code that XLA removes, instead of a slice of one large matmul that it computes in full.
  """
  chunks = _batch_chunks(parts, kernel)
  if chunks == 1:
    return _col2im_3x3s2(_taps_matmul(parts, kernel))
  split = tuple(_split_batch(part, chunks) for part in parts)
  return _merge_batch(jax.lax.map(lambda chunk: _col2im_3x3s2(_taps_matmul(chunk, kernel)), split))


# On CPU, a per-tap product larger than any cache (up_2 and up_3 at batch 64: 72 and 144 MiB of float32) is
# written to memory by the matmul and read back by the overlap-add. Computed a few images at a time, each
# chunk's product stays in cache: alone, up_3's forward took 175 -> 105 ms in float32 and up_2's 77 -> 68
# (smaller products, and the last layer's, were no faster chunked). In whole steps (BENCHMARKS.md): float32
# frozen training 3-6% faster in three alternating pairs, inference -2..+3%; bfloat16 inference 4-6% faster
# but training 1-9% slower in two pairs, so bfloat16 inputs are not chunked. The float32 backward pass is
# chunked the same way (frozen steps 2-6% faster in five of six more pairs, 5% slower in one).
_CHUNKED_PRODUCT_MIN_BYTES = 64 * 2**20
_CHUNK_PRODUCT_BYTES = 16 * 2**20


# Switched off by ``unchunked``; a context variable, so one thread's ``unchunked`` leaves another's tracing alone.
_chunking = contextvars.ContextVar("petseg_jax_batch_chunking", default=True)


@contextlib.contextmanager
def unchunked() -> Iterator[None]:
  """Within: ``conv_transpose_3x3s2`` traces without batch chunks (the same function, no loops).

  For XLA's cost analysis, which counts a loop's body once: ``scripts/benchmark.py`` counts a program's
  FLOPs on its unchunked twin. Trace a new function object inside (a jitted function traced before keeps
  its chunks).
  """
  token = _chunking.set(False)
  try:
    yield
  finally:
    _chunking.reset(token)


def _batch_chunks(parts: tuple[Array, ...], kernel: Array) -> int:
  """Into how many batch chunks ``conv_transpose_3x3s2`` splits its passes (1: not split)."""
  n, h, w, _ = parts[0].shape
  product_bytes = 4 * n * h * w * 9 * kernel.shape[-1]  # float32 whatever the inputs' dtype
  if (not _chunking.get() or jax.default_backend() != "cpu" or parts[0].dtype != jnp.float32
      or product_bytes <= _CHUNKED_PRODUCT_MIN_BYTES):
    return 1
  wanted = -(-product_bytes // _CHUNK_PRODUCT_BYTES)
  return next(d for d in range(min(wanted, n), n + 1) if n % d == 0)  # Equal chunks: a divisor of n.


def _split_batch(x: Array, chunks: int) -> Array:
  """(N, ...) -> (chunks, N // chunks, ...): the leading axis for ``lax.map``/``lax.scan``."""
  return x.reshape((chunks, x.shape[0] // chunks) + x.shape[1:])


def _merge_batch(x: Array) -> Array:
  """The inverse of ``_split_batch``."""
  return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def _taps_matmul(parts: tuple[Array, ...], kernel: Array) -> Array:
  """(N, H, W, in) @ (in, 3, 3, out) → (N, H, W, 3, 3, out) in float32, for the input given as channel blocks.

  Where the products are narrower than the input (the last layer: 27 columns from 160 channels), one
  matmul per block, summed, costs less memory traffic than writing the concatenated input; otherwise the
  concatenation feeds one larger matmul.
  """
  if _products_per_block(parts, kernel):
    products = [_dot(part, part_kernel, ((3,), (2,)), jnp.float32)
                for part, part_kernel in _kernel_blocks(parts, kernel)]
    return sum(products[1:], products[0])
  return _dot(_channel_concat(parts), kernel, ((3,), (2,)), jnp.float32)


def _products_per_block(parts: tuple[Array, ...], kernel: Array) -> bool:
  """Whether ``_taps_matmul`` multiplies each block separately (else the forward pass writes their concatenation)."""
  return len(parts) > 1 and 9 * kernel.shape[-1] < kernel.shape[2]


def _kernel_blocks(parts: tuple[Array, ...], kernel: Array) -> list[tuple[Array, Array]]:
  """Each input block with the (3, 3, block channels, out) slice of ``kernel`` that multiplies it."""
  bounds = np.cumsum([0] + [part.shape[-1] for part in parts])
  return [(part, kernel[:, :, start:stop]) for part, start, stop in zip(parts, bounds[:-1], bounds[1:])]


def _conv_transpose_3x3s2_fwd(parts: tuple[Array, ...], kernel: Array
                              ) -> tuple[Array, tuple[tuple[Array, ...], Array]]:
  return conv_transpose_3x3s2(parts, kernel), (parts, kernel)


def _conv_transpose_3x3s2_bwd(residuals: tuple[tuple[Array, ...], Array], g: Array
                              ) -> tuple[tuple[Array, ...], Array]:
  parts, kernel = residuals
  _, h, w, _ = parts[0].shape
  blocks = _kernel_blocks(parts, kernel)

  def input_gradients(dy: Array) -> tuple[Array, ...]:
    return tuple(_dot(dy, part_kernel, ((3, 4, 5), (0, 1, 3)), part.dtype) for part, part_kernel in blocks)

  if len(parts) > 1 and parts[0].dtype == jnp.float32 and not _products_per_block(parts, kernel):
    # One kernel-gradient matmul over the concatenated input, which the forward pass stored: XLA transposes
    # it as a plain copy. Per block, it recomputed the upsampled block's BatchNorm+ReLU inside a strided
    # transposing loop. Measured (BENCHMARKS.md): float32 frozen-encoder steps 2-14% faster, fine-tuning
    # steps 2-6% faster with huge pages (2-5% slower without); bfloat16 steps no faster: per block there.
    def gradients(parts: tuple[Array, ...], g: Array) -> tuple[tuple[Array, ...], Array]:
      dy = _im2col_3x3s2(g, h, w)  # (N, H, W, 3, 3, out)
      return input_gradients(dy), _dot(_channel_concat(parts), dy, ((0, 1, 2), (0, 1, 2)), jnp.float32)

    chunks = _batch_chunks(parts, kernel)
    if chunks == 1:
      dparts, dkernel = gradients(parts, g.astype(jnp.float32))
    else:  # As in the forward pass, a few images at a time keep the per-tap gradient in cache.
      def chunk(dkernel: Array, chunk_parts_and_g: tuple[tuple[Array, ...], Array]) -> tuple[Array, Any]:
        dparts, chunk_dkernel = gradients(*chunk_parts_and_g)
        return dkernel + chunk_dkernel, dparts

      dkernel = jnp.zeros((kernel.shape[2], 3, 3, kernel.shape[3]), jnp.float32)
      split = (tuple(_split_batch(part, chunks) for part in parts), _split_batch(g.astype(jnp.float32), chunks))
      dkernel, dparts = jax.lax.scan(chunk, dkernel, split)
      dparts = tuple(map(_merge_batch, dparts))
    return dparts, dkernel.astype(kernel.dtype).transpose(1, 2, 0, 3)
  dy = _as_bits(lambda g: _im2col_3x3s2(g, h, w), g.astype(parts[0].dtype))  # (N, H, W, 3, 3, out)
  dparts = input_gradients(dy)
  dkernels = []
  for part, _ in blocks:
    # The kernel gradient contracts over all pixels, and XLA transposes its left operand for the matmul:
    # put the narrower of the part and dy there (the part in the pix2pix blocks, dy in the last layer).
    if part.shape[-1] <= dy.shape[3] * dy.shape[4] * dy.shape[5]:
      dkernel = _dot(part, dy, ((0, 1, 2), (0, 1, 2)), kernel.dtype).transpose(1, 2, 0, 3)
    else:
      # The last layer's (27, in) result is one tile of the matmul, computed by one core; one small matmul
      # per image, summed, spreads it over the cores (steps measured about 5% faster, float32 and bfloat16).
      per_image = jax.lax.dot_general(dy, part, (((1, 2), (1, 2)), ((0,), (0,))),
                                      preferred_element_type=jnp.float32)
      dkernel = per_image.sum(0).astype(kernel.dtype).transpose(0, 1, 3, 2)
    dkernels.append(dkernel)  # (3, 3, in_part, out)
  return dparts, jnp.concatenate(dkernels, axis=2)


conv_transpose_3x3s2.defvjp(_conv_transpose_3x3s2_fwd, _conv_transpose_3x3s2_bwd)


class ConvTranspose3x3s2(nn.Module):
  """Keras ``Conv2DTranspose(features, 3, strides=2, padding="same")``: doubles height and width.

  The kernel has shape (3, 3, in, out) and ``out[2m + k] += in[m] @ kernel[k]`` per axis (Keras' kernel
  is (3, 3, out, in) with the same spatial order).

  Called on one array, or on a sequence of arrays that form the input as channel blocks (a U-Net's
  ``(upsampled, skip)``: the same function as on their concatenation, with the same kernel; on CPU the
  gradient of a block that is not differentiated is then not computed at all, see
  ``conv_transpose_3x3s2``).

  Attributes:
    features: output channels.
    use_bias: add a bias (the tutorial's last layer does; the pix2pix blocks don't).
    impl: "fast" (``conv_transpose_3x3s2``: matmul + overlap-add, on CPU and GPU), "explicit" (that on every
      backend) or "reference" (input-dilated ``lax.conv``).
  """

  features: int
  use_bias: bool = False
  impl: str = "fast"
  dtype: Dtype | None = None
  param_dtype: Dtype = jnp.float32
  kernel_init: Initializer = nn.initializers.glorot_uniform()
  bias_init: Initializer = nn.initializers.zeros

  @nn.compact
  def __call__(self, x: Array | Sequence[Array]) -> Array:
    """``x``: the input, or its channel blocks in order (their concatenation is the input)."""
    parts = tuple(x) if isinstance(x, (list, tuple)) else (x,)
    in_features = sum(part.shape[-1] for part in parts)
    kernel = self.param("kernel", self.kernel_init, (3, 3, in_features, self.features), self.param_dtype)
    bias = self.param("bias", self.bias_init, (self.features,), self.param_dtype) if self.use_bias else None
    *parts, kernel, promoted_bias = nn.dtypes.promote_dtype(*parts, kernel, bias, dtype=self.dtype)
    parts = tuple(parts)
    if _use_explicit_formulation(self.impl):
      # The bias is added to the float32 sums, so its gradient is summed in float32 too.
      y = conv_transpose_3x3s2(parts, kernel)
      if bias is not None:
        y = y + bias.astype(jnp.promote_types(bias.dtype, jnp.float32))
      return y.astype(parts[0].dtype)
    # Transposed conv = input-dilated conv with the spatially flipped kernel; padding (2, 1) gives 2x size.
    y = jax.lax.conv_general_dilated(
        _channel_concat(parts), kernel[::-1, ::-1], window_strides=(1, 1), padding=[(2, 1), (2, 1)],
        lhs_dilation=(2, 2), dimension_numbers=_NHWC)
    if promoted_bias is not None:
      y = y + promoted_bias
    return y


# --- BatchNorm folded into the convolution before it (inference) -----------------------------------------


def batch_norm(x: Array, name: str, *, folded: bool, train: bool, momentum: float, epsilon: float,
               axis_name: str | None) -> Array:
  """A BatchNorm named ``name`` (call from a module's compact method), in float32 or ``x``'s dtype if wider.

  ``folded``: the inference-only ``FoldedBatchNorm`` in its place; else ``nn.BatchNorm`` on running statistics
  unless ``train``, averaging batch statistics over ``axis_name`` when training.
  """
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  if folded:
    return FoldedBatchNorm(dtype, name=name)(x)
  return nn.BatchNorm(use_running_average=not train, momentum=momentum, epsilon=epsilon, dtype=dtype,
                      axis_name=axis_name if train else None, name=name)(x)


class FoldedBatchNorm(nn.Module):
  """An inference-mode BatchNorm whose scale is folded into the preceding convolution's kernel: ``x + bias``.

  ``petseg_jax.models.fold_batch_norm`` makes its variables from a BatchNorm's: with ``k = scale /
  sqrt(var + eps)`` per channel, the kernel becomes ``kernel * k`` and ``bias = beta - mean * k``. Same
  module name as the BatchNorm it replaces, so only the leaves change. Computed in ``dtype`` (float32 for
  bfloat16 activations, as the BatchNorm it replaces).
  """

  dtype: Dtype = jnp.float32
  param_dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x: Array) -> Array:
    bias = self.param("bias", nn.initializers.zeros, (x.shape[-1],), self.param_dtype)
    return x.astype(self.dtype) + bias.astype(self.dtype)
