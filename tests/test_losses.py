"""Tests for petseg_jax.losses."""

import json
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petseg_jax import losses


def _data(seed=0, shape=(4, 6, 5), num_classes=3, scale=2.0):
  rng = np.random.default_rng(seed)
  logits = (scale * rng.normal(size=shape + (num_classes,))).astype(np.float32)
  labels = rng.integers(0, num_classes, shape).astype(np.int32)
  return logits, labels


def _np_log_softmax(logits):
  x = logits.astype(np.float64)
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def _np_ce(logits, labels):
  return -np.take_along_axis(_np_log_softmax(logits), labels[..., None], -1)[..., 0]


def test_cross_entropy_matches_numpy():
  logits, labels = _data()
  value = losses.segmentation_loss(logits, labels, loss="cross_entropy")
  assert value.shape == () and value.dtype == jnp.float32
  np.testing.assert_allclose(value, _np_ce(logits, labels).mean(), rtol=1e-6)


def test_cross_entropy_equals_optax_integer_label_form_value_and_gradient():
  """The one-hot form (no scatter-add in the gradient) is optax's integer-label cross-entropy."""
  import optax  # pylint: disable=g-import-not-at-top
  logits, labels = _data(4, scale=5.0)
  ours = lambda x: losses.segmentation_loss(x, labels, loss="cross_entropy")
  optax_form = lambda x: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(x, labels))
  np.testing.assert_allclose(ours(logits), optax_form(logits), rtol=1e-6)
  np.testing.assert_allclose(jax.grad(ours)(logits), jax.grad(optax_form)(logits), rtol=1e-5, atol=1e-9)


def test_per_example_weights_exclude_padding():
  logits, labels = _data(1)
  padded = losses.segmentation_loss(logits, labels, weights=np.array([1, 1, 1, 0], np.float32))
  np.testing.assert_allclose(padded, losses.segmentation_loss(logits[:3], labels[:3]), rtol=1e-6)
  # Changing a padding example's content changes nothing.
  logits2 = logits.copy()
  logits2[3] = 100.0
  np.testing.assert_allclose(
      losses.segmentation_loss(logits2, labels, weights=np.array([1, 1, 1, 0], np.float32)), padded, rtol=1e-6)


def test_per_pixel_weights_match_numpy():
  logits, labels = _data(2)
  w = (np.random.default_rng(3).random(labels.shape) > 0.5).astype(np.float32)
  value = losses.segmentation_loss(logits, labels, weights=w)
  np.testing.assert_allclose(value, (w * _np_ce(logits, labels)).sum() / w.sum(), rtol=1e-6)


def test_class_weights_keras_reduction():
  logits, labels = _data(4)
  cw = np.array([2.0, 2.0, 1.0])
  value = losses.segmentation_loss(logits, labels, class_weights=(2.0, 2.0, 1.0))
  # Keras "sum_over_batch_size": divide by the number of pixels, not by the sum of the weights.
  np.testing.assert_allclose(value, (cw[labels] * _np_ce(logits, labels)).mean(), rtol=1e-6)
  assert float(value) > float(losses.segmentation_loss(logits, labels))
  # With padding: padded pixels leave both sums.
  w = np.array([1, 0, 1, 1], np.float32)
  value = losses.segmentation_loss(logits, labels, class_weights=cw, weights=w)
  keep = w.astype(bool)
  np.testing.assert_allclose(
      value, (cw[labels[keep]] * _np_ce(logits[keep], labels[keep])).mean(), rtol=1e-6)


def test_class_weights_match_keras_sample_weight():
  tf = pytest.importorskip("tensorflow")
  try:
    tf.config.set_visible_devices([], "GPU")  # Keep TF off the GPU that JAX uses.
  except RuntimeError:
    pass  # TF already initialized its devices in this process (by another test); nothing to change.
  keras = pytest.importorskip("keras")
  logits, labels = _data(5)
  cw = np.array([2.0, 2.0, 1.0], np.float32)
  # The tutorial's add_sample_weights: per-pixel sample weights of shape (B, H, W, 1).
  sample_weight = cw[labels][..., None]
  keras_value = keras.losses.SparseCategoricalCrossentropy(from_logits=True)(
      labels[..., None], logits, sample_weight=sample_weight)
  value = losses.segmentation_loss(logits, labels, class_weights=tuple(cw))
  np.testing.assert_allclose(value, np.asarray(keras_value), rtol=1e-5)


def test_bfloat16_logits_computed_in_float32():
  logits, labels = _data(6)
  bf16 = jnp.asarray(logits, jnp.bfloat16)
  for name in losses.LOSSES:
    value = losses.segmentation_loss(bf16, labels, loss=name)
    assert value.dtype == jnp.float32
    # Same as float32 logits holding the bf16-rounded values: nothing else is computed in bf16.
    reference = losses.segmentation_loss(bf16.astype(jnp.float32), labels, loss=name)
    np.testing.assert_allclose(value, reference, rtol=1e-6)
  np.testing.assert_allclose(
      losses.segmentation_loss(bf16, labels),
      _np_ce(np.asarray(bf16.astype(jnp.float32)), labels).mean(), rtol=1e-6)


def test_focal_gamma_zero_is_cross_entropy():
  logits, labels = _data(7)
  np.testing.assert_allclose(
      losses.segmentation_loss(logits, labels, loss="focal", focal_gamma=0.0),
      losses.segmentation_loss(logits, labels, loss="cross_entropy"), rtol=1e-6)


def test_focal_matches_numpy_and_downweights_easy_pixels():
  logits, labels = _data(8)
  ce = _np_ce(logits, labels)
  pt = np.exp(-ce)
  cw = np.array([2.0, 2.0, 1.0])
  value = losses.segmentation_loss(logits, labels, loss="focal", class_weights=cw)
  np.testing.assert_allclose(value, (cw[labels] * (1 - pt) ** 2 * ce).mean(), rtol=1e-5)
  np.testing.assert_allclose(
      losses.segmentation_loss(logits, labels, loss="focal", focal_gamma=0.5),
      ((1 - pt) ** 0.5 * ce).mean(), rtol=1e-5)
  for gamma in (1.0, 1.5, 3.0):  # Integer powers take another path than fractional ones.
    np.testing.assert_allclose(losses.segmentation_loss(logits, labels, loss="focal", focal_gamma=gamma),
                               ((1 - pt) ** gamma * ce).mean(), rtol=1e-5, err_msg=f"gamma={gamma}")
  assert float(losses.segmentation_loss(logits, labels, loss="focal")) < ce.mean()


def test_dice_loss_perfect_prediction_and_numpy_reference():
  _, labels = _data(9)
  perfect = 20.0 * np.eye(3, dtype=np.float32)[labels]
  assert float(losses.soft_dice_loss(perfect, labels)) < 1e-6
  wrong = 20.0 * np.eye(3, dtype=np.float32)[(labels + 1) % 3]
  assert float(losses.soft_dice_loss(wrong, labels)) > 0.95  # Only the smoothing term is left.

  logits, labels = _data(10)
  p = np.exp(_np_log_softmax(logits))
  y = np.eye(3)[labels]
  dice = (2 * (p * y).sum((0, 1, 2)) + 1) / (p.sum((0, 1, 2)) + y.sum((0, 1, 2)) + 1)
  np.testing.assert_allclose(losses.soft_dice_loss(logits, labels), 1 - dice.mean(), rtol=1e-5)
  combined = losses.segmentation_loss(logits, labels, loss="cross_entropy+dice")
  np.testing.assert_allclose(combined, _np_ce(logits, labels).mean() + 1 - dice.mean(), rtol=1e-5)


def test_dice_loss_ignores_padding():
  logits, labels = _data(11)
  w = np.array([1, 1, 0, 0], np.float32)
  np.testing.assert_allclose(
      losses.soft_dice_loss(logits, labels, w), losses.soft_dice_loss(logits[:2], labels[:2]), rtol=1e-6)


def test_jit_grad_finite_including_all_padding_and_perfect_predictions():
  _, labels = _data(12)
  perfect = 200.0 * np.eye(3, dtype=np.float32)[labels]  # p_t == 1 exactly in float32.

  @jax.jit
  def loss_and_grads(logits, weights):
    out = {}
    for name in losses.LOSSES:
      out[name] = jax.value_and_grad(
          lambda lg: losses.segmentation_loss(
              lg, labels, loss=name, class_weights=(2.0, 2.0, 1.0), weights=weights))(logits)
    return out

  for weights in (np.ones(4, np.float32), np.zeros(4, np.float32)):
    for name, (value, grad) in loss_and_grads(perfect, weights).items():
      assert np.isfinite(value) and np.all(np.isfinite(grad)), name
  for name, (value, _) in loss_and_grads(perfect, np.zeros(4, np.float32)).items():
    assert abs(float(value)) < 1e-6, name  # No valid pixel: 0, not NaN.


@pytest.mark.parametrize("bad_label", [3, 255, -1])
def test_out_of_range_labels_behave_as_documented(bad_label):
  """segmentation_loss's docstring: no NaN; cross-entropy/focal give the pixel 0 loss and 0 gradient but
  count it in the mean; the Dice term sees its probabilities as false positives."""
  logits, labels = _data(14)
  labels[0, 0, 0] = bad_label
  excluded = np.ones(labels.shape, np.float32)
  excluded[0, 0, 0] = 0.0
  num_pixels = labels.size
  for name in losses.LOSSES:
    value, grad = jax.value_and_grad(
        lambda lg, name=name: losses.segmentation_loss(lg, labels, loss=name, class_weights=(2.0, 2.0, 1.0))
    )(logits)
    assert np.isfinite(value) and np.all(np.isfinite(grad)), name
    if name == "cross_entropy+dice":
      assert np.any(grad[0, 0, 0] != 0), name  # The Dice term's false positives.
      continue
    ignored = losses.segmentation_loss(logits, labels, loss=name, class_weights=(2.0, 2.0, 1.0),
                                       weights=excluded)
    np.testing.assert_allclose(value, ignored * (num_pixels - 1) / num_pixels, rtol=1e-5, err_msg=name)
    np.testing.assert_array_equal(grad[0, 0, 0], 0.0, err_msg=name)


def test_bad_arguments_raise_clear_errors():
  logits, labels = _data(13)
  with pytest.raises(ValueError, match="Unknown loss 'dice'.*cross_entropy.*focal"):
    losses.segmentation_loss(logits, labels, loss="dice")
  with pytest.raises(ValueError, match="class_weights"):
    losses.segmentation_loss(logits, labels, class_weights=(1.0, 2.0))
  with pytest.raises(ValueError, match="do not match labels"):
    losses.segmentation_loss(logits[:2], labels)
  with pytest.raises(ValueError, match="weights of shape"):
    losses.segmentation_loss(logits, labels, weights=np.ones(3))
  with pytest.raises(ValueError, match="gamma"):
    losses.segmentation_loss(logits, labels, loss="focal", focal_gamma=-1.0)


@pytest.mark.parametrize("name", losses.LOSSES)
def test_summed_loss_sums_give_the_loss_of_everything_at_once(name):
  """Evaluation adds ``loss_sums`` over batches (padded ones included): the split's loss whatever the
  batching, where a mean of batch losses depends on it (the Dice term is not a per-pixel mean)."""
  logits, labels = _data(15, shape=(6, 5, 4))
  settings = {"loss": name, "class_weights": (2.0, 1.0, 1.0)}
  whole = losses.segmentation_loss(logits, labels, **settings)
  for batch in (1, 2, 4):  # 4: the second batch holds 2 examples and 2 padding.
    sums = []
    for start in range(0, 6, batch):
      part_logits, part_labels = logits[start:start + batch], labels[start:start + batch]
      valid = np.ones(batch, np.float32)
      valid[len(part_labels):] = 0.0
      padding = batch - len(part_labels)
      part_logits = np.concatenate([part_logits, np.zeros((padding,) + logits.shape[1:], np.float32)])
      part_labels = np.concatenate([part_labels, np.zeros((padding,) + labels.shape[1:], np.int32)])
      sums.append(losses.loss_sums(part_logits, part_labels, **settings, weights=valid))
    total = jax.tree.map(lambda *xs: sum(np.asarray(x, np.float64) for x in xs), *sums)
    np.testing.assert_allclose(losses.loss_from_sums(total), whole, rtol=2e-6, err_msg=f"batch {batch}")
  assert ("dice_intersection" in sums[0]) == (name == "cross_entropy+dice")


_PMAP_LOSS_SCRIPT = r"""
import json, sys
import jax, jax.numpy as jnp, numpy as np
from petseg_jax import losses

assert jax.local_device_count() == 2
rng = np.random.default_rng(0)
features = rng.normal(size=(8, 5, 4, 6)).astype(np.float32)  # A linear "model": logits = features @ kernel.
labels = rng.integers(0, 3, (8, 5, 4)).astype(np.int32)
kernel = rng.normal(size=(6, 3)).astype(np.float32)
out = {}
for name in losses.LOSSES:
  loss = lambda k, x, y, axis_name=None: losses.segmentation_loss(x @ k, y, loss=name, axis_name=axis_name)
  value, grad = jax.value_and_grad(loss)(kernel, features, labels)  # The global batch on one device.
  def step(k, x, y, axis_name):
    v, g = jax.value_and_grad(loss)(k, x, y, axis_name)
    return jax.lax.pmean(v, "i"), jax.lax.pmean(g, "i")  # As train_step averages them.
  shard = lambda a: a.reshape((2, 4) + a.shape[1:])
  for axis_name in ("i", None):
    v2, g2 = jax.pmap(step, axis_name="i", static_broadcasted_argnums=3)(
        jnp.stack([kernel] * 2), shard(features), shard(labels), axis_name)
    out[f"{name} {axis_name}"] = [float(abs(v2[0] - value) / abs(value)),
                                  float(np.abs(g2[0] - grad).max() / np.abs(grad).max())]
print("RESULT" + json.dumps(out))
"""


def test_two_devices_compute_the_global_batch_loss_and_gradient():
  """Under pmap with ``axis_name``, the devices' mean loss and gradient are the global batch's; for the
  Dice term they are not without it (the mean of the shards' Dice values is another function)."""
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
  proc = subprocess.run([sys.executable, "-c", _PMAP_LOSS_SCRIPT], capture_output=True, text=True, env=env,
                        cwd=Path(__file__).resolve().parents[1], timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  result = json.loads(next(l for l in proc.stdout.splitlines() if l.startswith("RESULT"))[len("RESULT"):])
  for name in losses.LOSSES:
    value_error, grad_error = result[f"{name} i"]
    assert value_error < 1e-6 and grad_error < 1e-5, (name, result)
  # Without the axis, only the Dice term differs (cross-entropy and focal are per-pixel means).
  assert max(result["cross_entropy None"] + result["focal None"]) < 1e-5, result
  assert min(result["cross_entropy+dice None"]) > 1e-4, result
