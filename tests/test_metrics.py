"""Tests for petseg_jax.metrics and petseg_jax.metrics_log."""

import json
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petseg_jax import metrics
from petseg_jax import metrics_log

# A hand-checked example: one 2x3 image, class 2 ("border") absent from both truth and prediction.
LABELS = np.array([[[0, 0, 1], [1, 1, 0]]], np.int32)
PREDS = np.array([[[0, 1, 1], [1, 0, 0]]], np.int32)
# (true, pred) pairs: (0,0) (0,1) (1,1) (1,1) (1,0) (0,0).
EXPECTED = np.array([[2, 1, 0], [1, 2, 0], [0, 0, 0]])


def _numpy_confusion(labels, preds, valid, num_classes):
  cm = np.zeros((num_classes, num_classes), np.int64)
  np.add.at(cm, (labels[valid], preds[valid]), 1)
  return cm


def test_hand_computed_confusion_from_predictions_and_logits():
  np.testing.assert_array_equal(metrics.confusion_matrix(PREDS, LABELS), EXPECTED)
  logits = 5.0 * jax.nn.one_hot(PREDS, 3) - 1.0
  cm = metrics.confusion_matrix(logits, LABELS)
  assert cm.dtype == jnp.int32 and cm.shape == (3, 3)
  np.testing.assert_array_equal(cm, EXPECTED)
  # bfloat16 logits: the argmax is the same.
  np.testing.assert_array_equal(metrics.confusion_matrix(logits.astype(jnp.bfloat16), LABELS), EXPECTED)
  # Rows are the true class, columns the prediction (EXPECTED is symmetric, so it cannot tell).
  cm = metrics.confusion_matrix(np.array([[2, 2, 0]], np.int32), np.array([[0, 0, 0]], np.int32))
  assert cm[0, 2] == 2 and cm[2, 0] == 0 and cm[0, 0] == 1


def test_hand_computed_metrics_with_absent_class():
  m = metrics.compute_metrics(EXPECTED)
  assert m["pixel_accuracy"] == pytest.approx(4 / 6)
  # pet: tp 2, union 3 + 3 - 2 = 4; background the same; border absent everywhere -> None.
  assert m["iou"] == {"pet": pytest.approx(0.5), "background": pytest.approx(0.5), "border": None}
  assert m["dice_per_class"]["pet"] == pytest.approx(4 / 6)
  assert m["dice_per_class"]["border"] is None
  # Means are over the classes present (not (0.5 + 0.5 + 0) / 3, and not NaN).
  assert m["miou"] == pytest.approx(0.5)
  assert m["dice"] == pytest.approx(4 / 6)
  assert m["num_pixels"] == 6
  json.dumps(m, allow_nan=False)  # Plain Python, no NaN.
  for key in ("pixel_accuracy", "miou", "dice"):
    assert type(m[key]) is float


def test_class_only_predicted_counts_in_mean_with_zero():
  # Class 2 is predicted once but never true: IoU 0, and it is part of the mean.
  cm = np.array([[3, 0, 1], [0, 2, 0], [0, 0, 0]])
  m = metrics.compute_metrics(cm)
  assert m["iou"]["border"] == 0.0
  assert m["iou"]["pet"] == pytest.approx(3 / 4)
  assert m["miou"] == pytest.approx((3 / 4 + 1 + 0) / 3)
  assert m["dice_per_class"]["border"] == 0.0


def test_per_example_weights_exclude_padding():
  rng = np.random.default_rng(0)
  labels = rng.integers(0, 3, (4, 5, 6)).astype(np.int32)
  logits = rng.normal(size=(4, 5, 6, 3)).astype(np.float32)
  weights = np.array([1, 1, 0, 0], np.float32)  # Last two examples are padding.
  cm = metrics.confusion_matrix(logits, labels, weights)
  np.testing.assert_array_equal(cm, metrics.confusion_matrix(logits[:2], labels[:2]))
  assert int(cm.sum()) == 2 * 5 * 6


def test_per_pixel_weights_match_numpy():
  rng = np.random.default_rng(1)
  labels = rng.integers(0, 3, (3, 7, 5)).astype(np.int32)
  preds = rng.integers(0, 3, (3, 7, 5)).astype(np.int32)
  weights = (rng.random((3, 7, 5)) > 0.3).astype(np.float32)
  cm = metrics.confusion_matrix(preds, labels, weights)
  np.testing.assert_array_equal(cm, _numpy_confusion(labels, preds, weights > 0, 3))


def test_labels_outside_range_are_not_counted():
  labels = np.array([[0, 1, 255, -1]], np.int32)
  preds = np.array([[0, 1, 1, 1]], np.int32)
  cm = metrics.confusion_matrix(preds, labels)
  np.testing.assert_array_equal(cm, [[1, 0, 0], [0, 1, 0], [0, 0, 0]])


def test_jit_matches_eager():
  rng = np.random.default_rng(2)
  labels = rng.integers(0, 3, (2, 8, 8)).astype(np.int32)
  logits = rng.normal(size=(2, 8, 8, 3)).astype(np.float32)
  weights = np.array([1.0, 0.0], np.float32)
  jitted = jax.jit(metrics.confusion_matrix, static_argnames="num_classes")
  np.testing.assert_array_equal(
      jitted(logits, labels, weights), metrics.confusion_matrix(logits, labels, weights))
  np.testing.assert_array_equal(
      jitted(logits, labels, weights),
      _numpy_confusion(labels, logits.argmax(-1), np.broadcast_to(weights[:, None, None] > 0, labels.shape), 3))


def test_sharded_sum_equals_whole_batch():
  """pmap-style: per-shard matrices psum'ed (and summed on the host) equal the whole batch's."""
  rng = np.random.default_rng(3)
  num_shards, per_shard = 4, 3
  labels = rng.integers(0, 3, (num_shards, per_shard, 6, 6)).astype(np.int32)
  logits = rng.normal(size=(num_shards, per_shard, 6, 6, 3)).astype(np.float32)
  weights = np.ones((num_shards, per_shard), np.float32)
  weights[-1, -2:] = 0  # Padding at the end of the last shard, as in the last eval batch.

  def step(lg, lb, w):
    return jax.lax.psum(metrics.confusion_matrix(lg, lb, w), axis_name="batch")

  # vmap with an axis name runs the same collective as pmap, on one CPU device.
  psummed = jax.vmap(step, axis_name="batch")(logits, labels, weights)
  per_shard_cms = jax.vmap(metrics.confusion_matrix)(logits, labels, weights)
  whole = metrics.confusion_matrix(
      logits.reshape(-1, 6, 6, 3), labels.reshape(-1, 6, 6), weights.reshape(-1))
  for shard in range(num_shards):
    np.testing.assert_array_equal(psummed[shard], whole)
  np.testing.assert_array_equal(np.asarray(per_shard_cms).sum(0), whole)
  # Leading device axis outside pmap: weights (D, B) are a prefix of labels (D, B, H, W).
  np.testing.assert_array_equal(metrics.confusion_matrix(logits, labels, weights), whole)


def test_host_accumulation_beyond_int32():
  # Split-level sums are accumulated in int64 on the host; compute_metrics takes them as they are.
  big = np.array([[2**33, 2**31], [0, 2**32]], np.int64)
  m = metrics.compute_metrics(big, class_names=("a", "b"))
  assert m["num_pixels"] == 2**33 + 2**31 + 2**32
  assert m["iou"]["a"] == pytest.approx(2**33 / (2**33 + 2**31))


def test_input_errors_are_clear():
  with pytest.raises(ValueError, match="do not match labels"):
    metrics.confusion_matrix(np.zeros((1, 2, 3, 4), np.float32), np.zeros((1, 2, 3), np.int32))
  with pytest.raises(ValueError, match="integer class ids"):
    metrics.confusion_matrix(np.zeros((1, 2, 3), np.float32), np.zeros((1, 2, 3), np.int32))
  with pytest.raises(ValueError, match="labels must be integer"):
    metrics.confusion_matrix(np.zeros((1, 2, 3), np.int32), np.zeros((1, 2, 3), np.float32))
  with pytest.raises(ValueError, match="weights of shape"):
    metrics.confusion_matrix(PREDS, LABELS, np.ones((2,)))
  with pytest.raises(ValueError, match="expected \\(3, 3\\)"):
    metrics.compute_metrics(np.ones((2, 2)))
  with pytest.raises(ValueError, match="counts no pixel"):
    metrics.compute_metrics(np.zeros((3, 3)))
  with pytest.raises(ValueError, match="negative"):
    metrics.compute_metrics(-np.eye(3))


def test_format_metrics_table():
  m = metrics.compute_metrics(EXPECTED)
  table = metrics.format_metrics_table(m, num_images=1)
  assert "1 images, 6 pixels" in table
  assert "pixel accuracy" in table and "0.6667" in table
  for name in metrics.CLASS_NAMES:
    assert name in table
  pet_line = next(line for line in table.splitlines() if line.startswith("pet"))
  assert pet_line.split() == ["pet", "0.5000", "0.6667"]  # IoU, then Dice.
  border_line = next(line for line in table.splitlines() if line.startswith("border"))
  assert "absent" in border_line
  mean_line = next(line for line in table.splitlines() if line.startswith("mean"))
  assert mean_line.split()[1:] == ["0.5000", "0.6667"]
  assert not any(math.isnan(v) for v in (m["miou"], m["dice"]))
  with pytest.raises(ValueError, match="lack key"):
    metrics.format_metrics_table({"miou": 0.5})


def test_truncate_metrics_keeps_the_records_up_to_the_starting_step(tmp_path):
  """What a resumed run does to metrics.jsonl: later records (and a torn last line) go; nothing else."""
  path = tmp_path / metrics_log.METRICS_FILE
  assert metrics_log.truncate_metrics(tmp_path, 4) == [] and not path.exists()
  path.write_text("".join(json.dumps({"step": s}) + "\n" for s in (2, 4, 6)) + '{"step": 8, "tr')
  assert metrics_log.truncate_metrics(tmp_path, 4) == [{"step": 2}, {"step": 4}]
  assert path.read_text() == '{"step": 2}\n{"step": 4}\n'
  inode = path.stat().st_ino
  assert metrics_log.truncate_metrics(tmp_path, 10) == [{"step": 2}, {"step": 4}]
  assert path.stat().st_ino == inode  # Unchanged, so not rewritten.
