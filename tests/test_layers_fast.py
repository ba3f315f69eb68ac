"""The fast layer formulations equal the reference ones: forward, gradients, bfloat16, whole U-Net.

(Parity with Keras is in tests/test_models.py.)
"""

from __future__ import annotations

import concurrent.futures
import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petseg_jax.models import MobileNetV2Encoder, UNet
from petseg_jax.models.layers import Conv, ConvTranspose3x3s2, DepthwiseConv3x3, matmul
from tests.test_models import _random, relative_error  # pylint: disable=protected-access


def _grads(module, variables, x):
  """Gradients of a non-linear scalar of the output w.r.t. the variables and the input."""
  loss = lambda v, x: jnp.sum(jnp.sin(module.apply(v, x).astype(jnp.float32)))
  return jax.grad(loss, argnums=(0, 1))(variables, x)


def _assert_same_function(fast, ref, variables, x, tol=1e-5):
  y_fast, y_ref = fast.apply(variables, x), ref.apply(variables, x)
  assert y_fast.shape == y_ref.shape and y_fast.dtype == y_ref.dtype
  assert relative_error(y_fast, y_ref) < tol
  g_fast, g_ref = _grads(fast, variables, x), _grads(ref, variables, x)
  assert jax.tree.structure(g_fast) == jax.tree.structure(g_ref)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    assert a.dtype == b.dtype
    assert relative_error(a, b) < tol


def test_matmul_gradients_equal_autodiff_of_dot():
  x, w = _random((2, 3, 4, 5), 1), _random((5, 6), 2)
  f = lambda x, w: jnp.sum(jnp.cos(matmul(x, w)))
  g = lambda x, w: jnp.sum(jnp.cos(jnp.einsum("...c,cd->...d", x, w)))
  for a, b in zip(jax.grad(f, argnums=(0, 1))(x, w), jax.grad(g, argnums=(0, 1))(x, w)):
    assert relative_error(a, b) < 1e-6


@pytest.mark.parametrize("shape", [(2, 5, 7, 6), (1, 4, 4, 16)])
def test_conv1x1_equals_reference_and_flax_conv(shape):
  x = _random(shape, 3)
  fast, ref = Conv(9, 1, impl="fast"), Conv(9, 1, impl="reference")
  variables = fast.init(jax.random.key(0), x)
  flax_conv = nn.Conv(9, (1, 1), use_bias=False)
  # Same variable tree as nn.Conv, so Keras weights and checkpoints load unchanged.
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(0), x))
  _assert_same_function(fast, ref, variables, x)
  _assert_same_function(fast, flax_conv, variables, x)


@pytest.mark.parametrize("stride,padding,shape", [
    (1, "same", (2, 9, 8, 5)), (2, "valid", (2, 9, 11, 4)), (1, "same", (1, 1, 1, 3)), (2, "valid", (1, 3, 3, 2))])
def test_depthwise_equals_reference(stride, padding, shape):
  x = _random(shape, 4)
  fast = DepthwiseConv3x3(strides=stride, padding=padding, impl="fast")
  ref = DepthwiseConv3x3(strides=stride, padding=padding, impl="reference")
  _assert_same_function(fast, ref, fast.init(jax.random.key(1), x), x)


@pytest.mark.parametrize("stride,padding,shape", [
    (2, ((0, 1), (0, 1)), (2, 8, 8, 3)), (1, "same", (2, 5, 7, 4)), (2, ((1, 1), (0, 1)), (1, 7, 6, 2))])
def test_conv3x3_equals_reference_and_flax_conv(stride, padding, shape):
  """MobileNetV2's stem (Conv1): im2col + matmul is nn.Conv's function on nn.Conv's variables."""
  x = _random(shape, 12)
  fast = Conv(5, 3, strides=stride, padding=padding, impl="fast")
  variables = fast.init(jax.random.key(6), x)
  flax_padding = padding if padding == "same" else tuple(padding)
  flax_conv = nn.Conv(5, (3, 3), strides=(stride, stride), padding=flax_padding, use_bias=False)
  assert jax.tree.map(jnp.shape, variables) == jax.tree.map(jnp.shape, flax_conv.init(jax.random.key(0), x))
  _assert_same_function(fast, fast.clone(impl="reference"), variables, x)
  _assert_same_function(fast, flax_conv, variables, x)


@pytest.mark.parametrize("stride", [1, 2])
def test_depthwise_bfloat16_gradients_are_rounded_once(stride):
  """In bfloat16 the input gradient is the float32 one rounded once (not after each tap's padded add)."""
  x = _random((4, 16, 16, 32), 21).astype(jnp.bfloat16)
  g = _random((4, 16 // stride, 16 // stride, 32), 22).astype(jnp.bfloat16)
  module = DepthwiseConv3x3(strides=stride, dtype=jnp.bfloat16)
  variables = module.init(jax.random.key(8), x)
  kernel_bf16 = jax.tree.map(lambda k: k.astype(jnp.bfloat16).astype(jnp.float32), variables)  # What it sees.

  def vjp(module, variables, x, g):
    _, pullback = jax.vjp(lambda v, x: module.apply(v, x), variables, x)
    return pullback(g)

  dvariables, dx = vjp(module, variables, x, g)
  ref_dvariables, ref_dx = vjp(module.clone(dtype=jnp.float32), kernel_bf16, x.astype(jnp.float32),
                               g.astype(jnp.float32))
  assert dx.dtype == jnp.bfloat16
  ulp = jnp.abs(ref_dx) * 2.0**-7  # One bfloat16 step (8 significant bits) at that value, at most.
  assert bool(jnp.all(jnp.abs(dx.astype(jnp.float32) - ref_dx) <= ulp))
  # The float32 sums rounded once: equal but for the rare tie that another float32 summation order flips.
  assert float(jnp.mean(dx == ref_dx.astype(jnp.bfloat16))) > 0.99
  dkernel, ref_dkernel = dvariables["params"]["kernel"], ref_dvariables["params"]["kernel"]
  assert relative_error(dkernel, ref_dkernel) < 2.0**-8


def test_depthwise_explicit_padding_equals_padding_the_input():
  """Explicit ((top, bottom), (left, right)) pads are those of padding the input, then convolving "valid"."""
  x = _random((2, 8, 6, 4), 13)
  explicit = DepthwiseConv3x3(strides=2, padding=((0, 1), (1, 0)))
  valid = DepthwiseConv3x3(strides=2, padding="valid", impl="reference")
  variables = explicit.init(jax.random.key(7), x)
  padded = jnp.pad(x, [(0, 0), (0, 1), (1, 0), (0, 0)])
  assert relative_error(explicit.apply(variables, x), valid.apply(variables, padded)) < 1e-6


@pytest.mark.parametrize("shape,features,use_bias", [
    ((2, 4, 4, 8), 5, False), ((1, 3, 5, 6), 3, True), ((2, 1, 1, 4), 2, True), ((3, 2, 7, 1), 1, False)])
def test_conv_transpose_equals_reference(shape, features, use_bias):
  x = _random(shape, 5)
  fast = ConvTranspose3x3s2(features, use_bias=use_bias, impl="fast",
                            bias_init=nn.initializers.normal(1.0))
  ref = ConvTranspose3x3s2(features, use_bias=use_bias, impl="reference")
  variables = fast.init(jax.random.key(2), x)
  assert fast.apply(variables, x).shape == (shape[0], 2 * shape[1], 2 * shape[2], features)
  _assert_same_function(fast, ref, variables, x)


def test_conv_transpose_on_channel_blocks_equals_concatenation_and_skips_dead_gradients():
  """``(upsampled, skip)`` as two blocks: the function of their concatenation, forward and gradients; and
  with the skip behind stop_gradient (a frozen encoder) its input-gradient matmul is gone from the program."""
  a, b = _random((2, 8, 8, 16), 8), _random((2, 8, 8, 32), 9)
  fast = ConvTranspose3x3s2(8, use_bias=True, impl="fast", bias_init=nn.initializers.normal(1.0))
  ref = ConvTranspose3x3s2(8, use_bias=True, impl="reference")
  variables = fast.init(jax.random.key(3), (a, b))
  assert variables["params"]["kernel"].shape == (3, 3, 48, 8)
  concatenated = jnp.concatenate([a, b], axis=-1)
  loss = lambda module, v, a, b: jnp.sum(jnp.sin(module.apply(v, (a, b))))
  ref_loss = lambda v, a, b: jnp.sum(jnp.sin(ref.apply(v, jnp.concatenate([a, b], axis=-1))))
  assert relative_error(fast.apply(variables, (a, b)), ref.apply(variables, concatenated)) < 1e-5
  assert relative_error(ref.apply(variables, (a, b)), ref.apply(variables, concatenated)) < 1e-6
  expected = jax.grad(ref_loss, argnums=(0, 1, 2))(variables, a, b)
  got = jax.grad(functools.partial(loss, fast), argnums=(0, 1, 2))(variables, a, b)
  for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
    assert relative_error(x, y) < 1e-5

  def compiled_flops(f):
    cost = jax.jit(f).lower(variables, a, b).compile().cost_analysis()
    return (cost[0] if isinstance(cost, list) else cost)["flops"]

  all_grads = jax.grad(functools.partial(loss, fast), argnums=(0, 1, 2))
  skip_frozen = jax.grad(lambda v, a, b: loss(fast, v, a, jax.lax.stop_gradient(b)), argnums=(0, 1))
  skip_input_gradient = 2 * 2 * 8 * 8 * (9 * 8) * 32  # (N*H*W, 9*out) @ (9*out, 32)
  assert compiled_flops(all_grads) - compiled_flops(skip_frozen) >= skip_input_gradient


def test_conv_transpose_matches_a_direct_scatter():
  """Independent of lax: out[2m + ky, 2l + kx] += x[m, l] @ kernel[ky, kx], cropped to 2H x 2W."""
  x, kernel = _random((1, 3, 2, 4), 6), _random((3, 3, 4, 5), 7)
  expected = np.zeros((1, 7, 5, 5), np.float64)
  for m in range(3):
    for l in range(2):
      for ky in range(3):
        for kx in range(3):
          expected[0, 2 * m + ky, 2 * l + kx] += x[0, m, l] @ kernel[ky, kx]
  y = ConvTranspose3x3s2(5, impl="fast").apply({"params": {"kernel": kernel}}, x)
  np.testing.assert_allclose(y, expected[:, :6, :4], atol=1e-5)


@pytest.mark.parametrize("module", [
    Conv(6, 1), Conv(6, 3, strides=2, padding=((0, 1), (0, 1))), DepthwiseConv3x3(),
    DepthwiseConv3x3(strides=2, padding=((0, 1), (0, 1))), ConvTranspose3x3s2(6, use_bias=True)],
    ids=["conv1x1", "conv3x3_s2", "depthwise", "depthwise_s2", "conv_transpose"])
def test_bfloat16_fast_is_close_to_float32_reference(module):
  x = _random((2, 6, 6, 8), 8)
  variables = module.init(jax.random.key(3), x)
  fast = module.clone(dtype=jnp.bfloat16)
  ref = module.clone(impl="reference")
  y = fast.apply(variables, x)
  assert y.dtype == jnp.bfloat16
  assert relative_error(y, ref.apply(variables, x)) < 2e-2
  g_fast, g_ref = _grads(fast, variables, x), _grads(ref, variables, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    assert relative_error(a, b) < 3e-2


@pytest.mark.parametrize("features", [2, 8])  # 18 or 72 tap columns: per-block matmuls, or one on the concatenation.
def test_bfloat16_conv_transpose_on_channel_blocks_gradients(features):
  """bfloat16 blocks are concatenated (and zero-padded) as bit patterns; their gradients must still flow."""
  a, b = _random((2, 4, 4, 16), 14), _random((2, 4, 4, 32), 15)
  fast = ConvTranspose3x3s2(features, use_bias=True, impl="fast", dtype=jnp.bfloat16)
  ref = ConvTranspose3x3s2(features, use_bias=True, impl="reference")
  variables = fast.init(jax.random.key(8), (a, b))
  loss = lambda module, v, a, b: jnp.sum(jnp.sin(module.apply(v, (a, b)).astype(jnp.float32)))
  expected = jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2))(variables, a, b)
  for module in (fast, fast.clone(impl="reference")):  # The reference one concatenates outside a custom VJP.
    assert relative_error(module.apply(variables, (a, b)), ref.apply(variables, (a, b))) < 2e-2
    got = jax.grad(functools.partial(loss, module), argnums=(0, 1, 2))(variables, a, b)
    for x, y in zip(jax.tree.leaves(got), jax.tree.leaves(expected)):
      assert relative_error(x, y) < 3e-2


_UNET = UNet(alpha=0.35, decoder_filters=(32, 16, 16, 8))


@functools.lru_cache(maxsize=None)
def _frozen_train_step(impl: str, dtype: str) -> tuple[float, dict]:
  """Loss and gradients of a frozen-encoder training step (training-mode decoder BatchNorm: the tutorial's
  configuration) of a small U-Net, on fixed variables and data; cached, as tests compare them."""
  x = _random((2, 32, 32, 3), 9)
  labels = jnp.asarray(np.random.default_rng(10).integers(0, 3, (2, 32, 32)))
  model = _UNET.clone(impl=impl, dtype=jnp.dtype(dtype))
  variables = jax.jit(_UNET.init)(jax.random.key(4), x)

  def loss(params):
    logits, _ = model.apply({"params": params, "batch_stats": variables["batch_stats"]}, x, train=True,
                            frozen_encoder=True, mutable=["batch_stats"])
    return jnp.mean(-jnp.take_along_axis(jax.nn.log_softmax(logits), labels[..., None], -1))

  value, grads = jax.jit(jax.value_and_grad(loss))(variables["params"])
  return float(value), grads


def _decoder_errors(grads: dict, reference: dict) -> dict[str, float]:
  return {jax.tree_util.keystr(path): relative_error(a, b) for (path, a), b in
          zip(jax.tree_util.tree_leaves_with_path(grads["decoder"]), jax.tree.leaves(reference["decoder"]))}


def test_unet_fast_equals_reference_frozen_encoder_train_step_gradients():
  l_fast, g_fast = _frozen_train_step("fast", "float32")
  l_ref, g_ref = _frozen_train_step("reference", "float32")
  assert abs(l_fast - l_ref) < 1e-5 * abs(l_ref)
  assert not any(np.any(np.asarray(g)) for g in jax.tree.leaves(g_fast["encoder"]))
  for path, error in _decoder_errors(g_fast, g_ref).items():
    assert error < 2e-4, path


def test_unet_bfloat16_fast_is_as_accurate_as_bfloat16_reference():
  """bfloat16 (bit-pattern pads and concatenations, float32 BatchNorm and depthwise sums) against float32,
  no less accurate than the plain lax formulation in bfloat16. At this tiny size (batch 2, training-mode
  BatchNorm) bfloat16 rounding alone moves decoder gradients by about 10%, whichever formulation computes it."""
  l_ref, g_ref = _frozen_train_step("reference", "float32")
  l_fast, g_fast = _frozen_train_step("fast", "bfloat16")
  l_lax, g_lax = _frozen_train_step("reference", "bfloat16")
  assert abs(l_fast - l_ref) < 1e-4 * abs(l_ref)
  assert all(g.dtype == jnp.float32 for g in jax.tree.leaves(g_fast))
  fast, lax_bf16 = _decoder_errors(g_fast, g_ref), _decoder_errors(g_lax, g_ref)
  assert np.median(list(fast.values())) < 2 * np.median(list(lax_bf16.values()))
  assert max(fast.values()) < 2 * max(lax_bf16.values())


def test_encoder_fast_equals_reference_vjp():
  """Gradients through every encoder layer (fine-tuning), for a fixed cotangent of the five taps.

  A fixed cotangent rather than a loss through the decoder: the U-Net's ReLU kinks make its parameter
  gradients jump by ~1% under 1e-6 relative input changes at this tiny size (measured with the reference
  formulation alone), which would hide what this test is about.
  """
  x = _random((2, 32, 32, 3), 11)
  fast, ref = MobileNetV2Encoder(0.35, impl="fast"), MobileNetV2Encoder(0.35, impl="reference")
  variables = jax.jit(fast.init)(jax.random.key(5), x)
  shapes = jax.eval_shape(ref.apply, variables, x)
  cotangent = {name: jnp.asarray(_random(t.shape, i)) for i, (name, t) in enumerate(shapes.items())}

  @functools.partial(jax.jit, static_argnums=0)
  def taps_and_grads(model, params, x):
    taps, vjp = jax.vjp(lambda p, x: model.apply({**variables, "params": p}, x), params, x)
    return taps, vjp(cotangent)

  taps_fast, g_fast = taps_and_grads(fast, variables["params"], x)
  taps_ref, g_ref = taps_and_grads(ref, variables["params"], x)
  for name in taps_ref:
    assert relative_error(taps_fast[name], taps_ref[name]) < 1e-5, name
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_fast), jax.tree.leaves(g_ref)):
    assert np.any(np.asarray(b)), jax.tree_util.keystr(path)
    assert relative_error(a, b) < 1e-4, jax.tree_util.keystr(path)


@pytest.mark.parametrize("kernel_size,strides,padding", [(5, 1, "same"), (1, 2, "same"), (1, 1, ((1, 1), (1, 1)))])
def test_unsupported_conv_is_a_clear_error(kernel_size, strides, padding):
  with pytest.raises(ValueError, match=f"got kernel_size={kernel_size}, strides={strides}"):
    Conv(4, kernel_size, strides, padding).init(jax.random.key(0), jnp.zeros((1, 4, 4, 3)))


def test_unknown_impl_is_a_clear_error():
  with pytest.raises(ValueError, match="impl='slow' is not one of"):
    Conv(4, 1, impl="slow").init(jax.random.key(0), jnp.zeros((1, 2, 2, 3)))


@pytest.mark.parametrize("backend", ["cpu", "gpu", "tpu"])
def test_impl_picks_the_formulation_per_backend(monkeypatch, backend):
  """"fast" is the explicit formulation on CPU and GPU; "explicit" on every backend; "reference" on none.

  Traced only (the backend is what ``jax.default_backend`` reports at trace time), so this runs on CPU.
  """
  monkeypatch.setattr(jax, "default_backend", lambda: backend)
  model = UNet(num_classes=3, alpha=0.35, decoder_filters=(16, 8, 8, 8))
  x = jnp.zeros((1, 64, 64, 3))
  variables = jax.eval_shape(functools.partial(model.init, train=False), jax.random.key(0), x)

  def convolutions(impl):
    jaxpr = jax.make_jaxpr(lambda v, x: model.clone(impl=impl).apply(v, x, train=False))(variables, x)
    return str(jaxpr).count("conv_general_dilated")

  lax_convs = convolutions("reference")
  assert lax_convs > 0
  assert convolutions("explicit") == 0
  assert convolutions("fast") == (lax_convs if backend == "tpu" else 0)


def test_conv_transpose_in_batch_chunks_equals_reference(monkeypatch):
  """Large per-tap products are computed a few images at a time on CPU: the same values and gradients."""
  from petseg_jax.models import layers

  up, skip = _random((6, 4, 4, 5), 11), _random((6, 4, 4, 3), 12)
  kernel = _random((3, 3, 8, 4), 13)
  assert layers._batch_chunks((up, skip), kernel) == 1  # Small: one piece.
  monkeypatch.setattr(layers, "_CHUNKED_PRODUCT_MIN_BYTES", 0)
  monkeypatch.setattr(layers, "_CHUNK_PRODUCT_BYTES", 4 * 2 * 16 * 9 * 4)  # Two images' products a chunk.
  assert layers._batch_chunks((up, skip), kernel) == 3
  fast, ref = ConvTranspose3x3s2(4, impl="fast"), ConvTranspose3x3s2(4, impl="reference")
  variables = {"params": {"kernel": kernel}}
  assert "scan" in str(jax.make_jaxpr(lambda x: fast.apply(variables, x))((up, skip)))  # Chunked (lax.map).
  _assert_same_function(fast, ref, variables, (up, skip))
  assert layers._batch_chunks((up[:5], skip[:5]), kernel) == 5  # 3 wanted, no divisor of 5 but 5: one a chunk.
  monkeypatch.setattr(layers, "_CHUNK_PRODUCT_BYTES", 4 * 4 * 16 * 9 * 4)  # 4 images: not a divisor of 6.
  assert layers._batch_chunks((up, skip), kernel) == 2
  with layers.unchunked():  # For XLA's cost analysis (it counts a loop's body once): the same, no loop.
    assert layers._batch_chunks((up, skip), kernel) == 1
    assert "scan" not in str(jax.make_jaxpr(lambda x: fast.apply(variables, x))((up, skip)))
    with concurrent.futures.ThreadPoolExecutor(1) as other_thread:  # Tracing elsewhere keeps its chunks.
      assert other_thread.submit(layers._batch_chunks, (up, skip), kernel).result() == 2
  assert layers._batch_chunks((up, skip), kernel) == 2
  bf16 = tuple(x.astype(jnp.bfloat16) for x in (up, skip))
  assert layers._batch_chunks(bf16, kernel.astype(jnp.bfloat16)) == 1  # Measured slower in bfloat16 training.
