"""Training: frozen encoder, pmap equivalence, learning, resume, NaN guard, CLI.

Every loop run uses tiny synthetic configs (32x32, alpha 0.35). Compilation dominates their cost; the
session's persistent compilation cache (tests/conftest.py) compiles runs with the same config once.
"""

import functools
import json
import logging
import os
import re
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax
import PIL.Image
import pytest

from configs import synthetic
from petseg_jax import checkpoint
from petseg_jax import config_checks
from petseg_jax import freezing as freezing_lib
from petseg_jax import input_pipeline
from petseg_jax import metric_writer
from petseg_jax import metrics_log
from petseg_jax import models
from petseg_jax import optim
from petseg_jax import parallel
from petseg_jax import plots
from petseg_jax import prediction
from petseg_jax import provenance
from petseg_jax import stopping
from petseg_jax import train
from petseg_jax import weights

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
STEPS_PER_EPOCH = 8  # 64 synthetic examples / batch 8.


def tiny_config(**train_overrides):
  """16 steps (2 epochs) on 64 synthetic 32x32 examples; the encoder is unfrozen after epoch 1."""
  config = synthetic.get_config()
  config.data.image_size = 32
  config.data.num_synthetic_train = 64
  config.data.num_synthetic_eval = 12  # The second eval batch is padded.
  config.train.batch_size = 8
  config.train.num_epochs = 2
  config.train.unfreeze_after_epochs = 1
  config.train.encoder_lr_multiplier = 0.5
  config.train.checkpoint_every_steps = STEPS_PER_EPOCH
  config.train.log_every_steps = 4
  config.train.num_figure_examples = 2
  for key, value in train_overrides.items():
    config.train[key] = value
  return config


def _state(config):
  model = train.create_model(config)
  return train.create_train_state(jax.random.PRNGKey(config.seed), config, model,
                                  train.create_learning_rate_fn(config.train, 100), STEPS_PER_EPOCH)


@pytest.fixture(scope="module")
def initial_state():
  """The tiny config's initial TrainState (what a run starts from)."""
  return _state(tiny_config())


def _random_batch(config, num_devices=1, seed=0):
  rs = np.random.RandomState(seed)
  size, batch = config.data.image_size, config.train.batch_size
  image = rs.uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)
  mask = rs.randint(0, 3, (batch, size, size)).astype(np.int32)
  shard = lambda x: x.reshape((num_devices, batch // num_devices) + x.shape[1:])
  return {"image": shard(image), "mask": shard(mask)}


def _trees_equal(a, b) -> bool:
  return jax.tree.structure(a) == jax.tree.structure(b) and all(
      np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


def _leaves_changed(a, b) -> list[bool]:
  return [not np.array_equal(np.asarray(x), np.asarray(y)) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))]


# --- the frozen encoder ---------------------------------------------------------------------------------

def _flops(lowered) -> float:
  cost = lowered.cost_analysis()  # Of the HLO JAX emits, before XLA optimizes (nothing compiled).
  return (cost[0] if isinstance(cost, list) else cost)["flops"]


def test_frozen_step_does_not_differentiate_the_encoder(initial_state):
  config = tiny_config()
  (state, layout), batch = parallel.replicate_state(initial_state), _random_batch(config)
  rng = parallel.replicate(jax.random.PRNGKey(0))
  frozen_step = train.pmapped_train_step(config, freezing_lib.Freezing(encoder=True), layout)
  frozen = _flops(frozen_step.lower(state, batch, rng))
  fine_tune = _flops(train.pmapped_train_step(config, freezing_lib.Freezing(), layout).lower(state, batch, rng))
  encoder = models.MobileNetV2Encoder(config.model.alpha)
  image = jnp.zeros(batch["image"].shape[1:])
  # Lowering needs only the variables' shapes (an eager init would dispatch op by op: ~30 s).
  variables = jax.eval_shape(encoder.init, jax.random.PRNGKey(0), image)
  encoder_forward = _flops(jax.jit(encoder.apply).lower(variables, image))
  # The encoder's backward pass (input and weight gradients) costs about twice its forward pass. The frozen
  # step's program does not contain it at all (stop_gradient: JAX emits no encoder backward, whatever XLA
  # would eliminate later); the same optimizer is in both steps.
  assert fine_tune - frozen > 1.5 * encoder_forward, (frozen, fine_tune, encoder_forward)


def test_a_replicated_state_and_a_stepped_state_share_one_compiled_step(initial_state, caplog):
  """pmap compiles per input sharding: ``parallel.replicate`` must shard like the steps' outputs, or every run
  compiles its first training step twice (it did, with flax's default replication axis name). The batches
  come as the loop feeds them, from ``parallel.device_batches``."""
  config = tiny_config()
  (state, layout), rng = parallel.replicate_state(initial_state), parallel.replicate(jax.random.PRNGKey(0))
  step = train.pmapped_train_step(config, freezing_lib.Freezing(encoder=True), layout)
  host_batches = [_random_batch(config, seed=i) for i in range(3)]
  with jax.log_compiles(), caplog.at_level(logging.WARNING):
    for batch in parallel.device_batches(host_batches):
      assert batch["image"].sharding == state[0].sharding  # Sharded over AXIS like the state.
      state, _ = step(state, batch, rng)
  compiled = [r.getMessage()[:80] for r in caplog.records if r.getMessage().startswith("Compiling ")]
  assert len(compiled) == 1, compiled


def test_the_packed_step_is_train_step_on_the_state_tree(initial_state, users_xla_options):
  """Packing the state through the pmapped step changes nothing computed, bit for bit: the fine-tuning step
  as the suite compiles, the frozen encoder's step as users compile (with the suite's code generation XLA
  fuses its two programs differently, and 42 of 609 leaves differ by up to 2e-6)."""
  config = tiny_config()
  batch, rng = _random_batch(config), parallel.replicate(jax.random.PRNGKey(0))
  assert parallel.replicate_state(initial_state)[1].concatenated == (jax.default_backend() != "cpu")
  for freezing, options in ((freezing_lib.Freezing(), {}), (freezing_lib.Freezing(encoder=True), users_xla_options)):
    tree_step = jax.pmap(functools.partial(train.train_step, config=config, freezing=freezing),
                         axis_name=parallel.AXIS)
    state = parallel.replicate(initial_state)
    expected, expected_metrics = tree_step.lower(state, batch, rng).compile(options)(state, batch, rng)
    # As on accelerators; made for each step, which donates them.
    buffers, layout = parallel.replicate_state(initial_state, concatenate=True)
    assert len(buffers) == 2  # float32 and int32: ~300 leaves in two arguments.
    packed_step = train.pmapped_train_step(config, freezing, layout)
    stepped, metrics = packed_step.lower(buffers, batch, rng).compile(options)(buffers, batch, rng)
    assert _trees_equal(parallel.host_state(stepped, layout), parallel.first_replica(expected)), freezing
    assert _trees_equal(metrics, expected_metrics), freezing


def test_device_batches_yields_every_batch_in_order_put_ahead():
  host_batches = [{"x": np.full((1, 2), i, np.float32)} for i in range(5)]
  put = []
  source = (put.append(i) or batch for i, batch in enumerate(host_batches))
  for i, batch in enumerate(parallel.device_batches(source, ahead=2)):
    assert isinstance(batch["x"], jax.Array)
    np.testing.assert_array_equal(np.asarray(batch["x"]), host_batches[i]["x"])
    assert len(put) == min(i + 3, 5)  # Taken from the host iterator two batches ahead of its step.
  assert i == 4


def test_evaluation_sums_every_batch_fetching_each_after_later_steps_are_dispatched(initial_state,
                                                                                    monkeypatch):
  config = tiny_config()
  state_buffers, state_layout = parallel.replicate_state(initial_state)
  inference_variables, layout = train.pmapped_inference_variables(state_layout)
  buffers = inference_variables(state_buffers)
  p_eval_step = train.pmapped_eval_step(config, train.create_model(config).clone(batch_norm_folded=True), layout)
  batches = [_random_batch(config, seed=i) for i in range(5)]
  for batch in batches:
    batch["weight"] = np.ones((1, config.train.batch_size), np.float32)
  batches[-1]["weight"][0, 5:] = 0.0  # A padded last batch.
  outputs = [p_eval_step(buffers, batch) for batch in batches]
  expected = [jax.tree.map(lambda x: np.asarray(x[0]), sums) for sums, _ in outputs]

  dispatched, fetched_after = [], []
  first_replica = parallel.first_replica
  monkeypatch.setattr(parallel, "first_replica",
                      lambda tree: fetched_after.append(len(dispatched)) or first_replica(tree))
  sums, shown = train.evaluation_sums(lambda *args: dispatched.append(1) or p_eval_step(*args), buffers, batches)
  assert shown == {}  # None asked for.

  # Batch k's sums are read once steps up to k + PREFETCH_BATCHES are dispatched (then the rest at the end).
  lag = parallel.PREFETCH_BATCHES
  assert fetched_after == [min(k + 1 + lag, 5) for k in range(5)]
  np.testing.assert_array_equal(sums["confusion"], sum(e["confusion"].astype(np.int64) for e in expected))
  assert sums["confusion"].dtype == np.int64 and sums["confusion"].sum() == (4 * 8 + 5) * 32 * 32
  assert sums["num_pixels"] == sum(float(e["num_pixels"]) for e in expected)
  np.testing.assert_allclose(sums["loss_sum"], sum(float(e["loss_sum"]) for e in expected), rtol=1e-6)
  metrics = train.eval_metrics(sums)
  np.testing.assert_allclose(metrics["loss"], sums["loss_sum"] / sums["num_pixels"], rtol=1e-6)
  assert 0 <= metrics["miou"] <= 1

  # The examples the figures show: the first batch's first ones, padding left out, with the eval step's own
  # class maps, which are the Predictor's (the same folded function, compiled apart: ties may differ).
  batches[0]["weight"][0, 1] = 0.0
  _, shown = train.evaluation_sums(p_eval_step, buffers, batches, num_shown=3)
  real = [0, 2, 3]
  np.testing.assert_array_equal(shown["image"], batches[0]["image"][0, real])
  np.testing.assert_array_equal(shown["mask"], batches[0]["mask"][0, real])
  np.testing.assert_array_equal(shown["class_map"], np.asarray(outputs[0][1])[0, real])
  predicted = prediction.Predictor(train.create_model(config), initial_state.variables)(shown["image"])
  assert shown["class_map"].shape == predicted.shape and (shown["class_map"] == predicted).mean() > 0.99


def test_predictor_is_model_apply_and_compiles_once_per_layout(initial_state):
  """Packed variables change nothing computed, folded BatchNorms only the rounding; Predictors of other values
  reuse the compiled program."""
  config = tiny_config()
  model = train.create_model(config)
  variables = initial_state.variables
  images = _random_batch(config)["image"][0]
  expected = jax.jit(lambda v, x: model.apply(v, x, train=False))(variables, images)
  unfolded = prediction.Predictor(model, variables, concatenate=True, fold_batch_norm=False)  # As on accelerators.
  np.testing.assert_array_equal(np.asarray(unfolded.logits(images)), np.asarray(expected))
  predictor = prediction.Predictor(model, variables, concatenate=True)
  assert predictor.model.batch_norm_folded and "batch_stats" not in predictor.layout.treedef.node_data()[1]
  logits = np.asarray(predictor.logits(images))
  np.testing.assert_allclose(logits, np.asarray(expected), rtol=0, atol=1e-5 * np.abs(expected).max())
  np.testing.assert_array_equal(predictor(images), np.argmax(logits, -1))
  compilations = prediction._class_maps._cache_size()  # pylint: disable=protected-access
  other = jax.tree.map(lambda x: x * 0.5, variables)
  prediction.Predictor(model, other, concatenate=True)(images)
  assert prediction._class_maps._cache_size() == compilations  # pylint: disable=protected-access


# --- pmap: N devices == 1 device ------------------------------------------------------------------------

def _three_steps_and_an_eval(state, num_devices):
  """Params/stats after 3 train steps and a padded eval batch, on ``num_devices`` devices (global batch 8)."""
  config = tiny_config()
  # The state packed as on accelerators (the CPU's default passes its leaves, as the loop tests do).
  (replicated, layout), rng = parallel.replicate_state(state, True), parallel.replicate(jax.random.PRNGKey(1))
  inference_variables, variables_layout = train.pmapped_inference_variables(layout)
  step = train.pmapped_train_step(config, freezing_lib.Freezing(encoder=True), layout)
  evaluate = train.pmapped_eval_step(config, train.create_model(config).clone(batch_norm_folded=True),
                                     variables_layout)
  losses, confusions = [], []
  for batch in parallel.device_batches(_random_batch(config, num_devices, seed=i) for i in range(3)):
    replicated, m = step(replicated, batch, rng)
    losses.append(float(m["loss"][0]))
    confusions.append(np.asarray(m["confusion"][0]).tolist())
  batch = _random_batch(config, num_devices, seed=7)
  batch["weight"] = np.array([1.0] * 5 + [0.0] * 3, np.float32).reshape(num_devices, -1)  # 3 padding.
  sums, class_maps = evaluate(inference_variables(replicated), batch)
  ev = jax.tree.map(lambda x: np.asarray(x[0]).tolist(), sums)
  ev["class_maps"] = np.asarray(class_maps).reshape(8, -1).tolist()  # Each device's shard, in the batch's order.
  final = parallel.host_state(replicated, layout)
  leaves = [np.asarray(x).ravel() for x in jax.tree.leaves((final.params, final.batch_stats))]
  return {"losses": losses, "confusions": confusions, "eval": ev, "variables": np.concatenate(leaves).tolist()}


_PMAP_SCRIPT = r"""
import json, sys
sys.path.insert(0, sys.argv[1])
import jax
import numpy as np
from petseg_jax import parallel
from tests.test_train import _state, _three_steps_and_an_eval, tiny_config

assert jax.local_device_count() == 2, jax.local_devices()
tree = {"a": np.arange(6.0).reshape(2, 3), "n": np.int32(7)}
replicated = parallel.replicate(tree)
assert replicated["a"].shape == (2, 2, 3) and replicated["n"].shape == (2,)
per_device = jax.pmap(lambda x: x + 10.0 * jax.lax.axis_index("i"), axis_name="i")(replicated["a"])
assert np.array_equal(np.asarray(per_device)[1], tree["a"] + 10)
assert np.array_equal(parallel.first_replica(per_device), tree["a"])  # The first device's, not the second's.
print("RESULT" + json.dumps(_three_steps_and_an_eval(_state(tiny_config()), 2)))
"""


def test_two_devices_equal_one_device_for_the_same_global_batch(initial_state):
  env = dict(os.environ, XLA_FLAGS=os.environ["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2",
             TF_CPP_MIN_LOG_LEVEL="2")
  # The two-device run compiles in a child while this process runs the one-device run.
  proc = subprocess.Popen([sys.executable, "-c", _PMAP_SCRIPT, str(REPO_ROOT)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=env, cwd=REPO_ROOT)
  try:
    one = _three_steps_and_an_eval(initial_state, 1)
    stdout, stderr = proc.communicate(timeout=600)
  finally:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()
  assert proc.returncode == 0, stderr[-3000:]
  line = next(l for l in stdout.splitlines() if l.startswith("RESULT"))
  two = json.loads(line[len("RESULT"):])
  np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
  # Confusion matrices: the same pixels counted; argmax ties may flip a handful under float reordering.
  assert np.abs(np.array(two["confusions"]) - np.array(one["confusions"])).sum() <= 10
  assert np.array(one["confusions"]).sum() == 3 * 8 * 32 * 32
  np.testing.assert_allclose(two["variables"], one["variables"], atol=1e-5)
  assert one["eval"]["num_pixels"] == two["eval"]["num_pixels"] == 5 * 32 * 32
  np.testing.assert_allclose(two["eval"]["loss_sum"], one["eval"]["loss_sum"], rtol=1e-5)
  np.testing.assert_array_equal(np.array(two["eval"]["confusion"]).sum(), 5 * 32 * 32)
  assert (np.array(two["eval"]["class_maps"]) == np.array(one["eval"]["class_maps"])).mean() > 0.99


# --- TensorBoard events ---------------------------------------------------------------------------------

def _event_files(workdir):
  """The events of each TensorBoard file in ``workdir``, files in the order they were written."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  files = [list(tf.compat.v1.train.summary_iterator(str(path))) for path in workdir.glob("events.out.tfevents.*")]
  # By the times of their events (the first, file_version, is in whole seconds).
  return sorted(files, key=lambda events: [e.wall_time for e in events])


def _scalars_as_tensorboard_shows_them(workdir, tag):
  """(step, value) of curve ``tag`` as TensorBoard's event loader keeps them (purge_orphaned_data, the default:
  a SessionLog START at step s discards the points read before it with a step >= s)."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  # The loader of `tensorboard --load_fast=false` (the multiplexer's); the older event_accumulator purges no
  # tensor summaries.
  from tensorboard.backend.event_processing import plugin_event_accumulator  # pylint: disable=g-import-not-at-top
  accumulator = plugin_event_accumulator.EventAccumulator(str(workdir))
  accumulator.Reload()
  return [(event.step, float(tf.make_ndarray(event.tensor_proto))) for event in accumulator.Tensors(tag)]


def test_summary_writer_marks_a_restart_for_tensorboard(tmp_path):
  """An attempt logged steps 4, 8 and 12 but checkpointed only step 8; the next one resumes at step 8."""
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  killed = metric_writer.SummaryWriter(tmp_path)
  killed.mark_start(0)
  for step in (4, 8, 12):
    killed.scalar("train/loss", float(step), step)
  killed.close()
  resumed = metric_writer.SummaryWriter(tmp_path)
  resumed.mark_start(8)
  for step in (12, 16):
    resumed.scalar("train/loss", -float(step), step)
  resumed.close()
  first, second = _event_files(tmp_path)
  starts = [[e.step for e in events if e.session_log.status == tf.compat.v1.SessionLog.START]
            for events in (first, second)]
  assert starts == [[1], [9]]
  # The START comes first in the resumed attempt's file: after all of the killed attempt's scalars.
  assert second[1].session_log.status == tf.compat.v1.SessionLog.START
  assert _scalars_as_tensorboard_shows_them(tmp_path, "train/loss") == [(4, 4.0), (8, 8.0), (12, -12.0),
                                                                          (16, -16.0)]


# --- the training loop ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def uninterrupted_run(tmp_path_factory):
  """The tiny config trained in one go: (workdir, final state)."""
  workdir = tmp_path_factory.mktemp("uninterrupted")
  return workdir, train.train_and_evaluate(tiny_config(), workdir)


def test_run_writes_checkpoints_metrics_figures_and_summaries(uninterrupted_run, tmp_path):
  workdir, final = uninterrupted_run
  assert final.step == 2 * STEPS_PER_EPOCH
  assert json.loads((workdir / "config.json").read_text())["data"]["image_size"] == 32
  assert checkpoint.available_steps(workdir) == [8, 16]
  assert checkpoint.best_step(workdir) in (8, 16)
  records = train.read_metrics(workdir)
  assert [r["step"] for r in records] == [8, 16]
  (attempt,) = provenance.read_provenance(workdir)  # One attempt, from step 0, with this code.
  assert attempt["step"] == 0 and attempt["git_commit"] == provenance.git_commit()
  assert attempt["train_examples"] == 8 * STEPS_PER_EPOCH
  for key in ("epoch", "train_loss", "train_pixel_accuracy", "eval_loss", "eval_miou", "eval_pixel_accuracy",
              "eval_dice", "eval_iou_pet", "eval_iou_background", "eval_iou_border", "images_per_sec",
              "elapsed_sec", "wall_time"):
    assert all(np.isfinite(r[key]) for r in records), key
  best = max(records, key=lambda r: r["eval_miou"])
  assert checkpoint.best_step(workdir) == best["step"]
  figures = workdir / train.FIGURES_DIR
  assert sorted(p.name for p in figures.iterdir()) == [
      "predictions_step_0000008.png", "predictions_step_0000016.png", "training_curves.png"]
  # The last figure: the eval split's first examples, their masks and the final model's predictions.
  config = tiny_config()
  batch = next(iter(input_pipeline.EvalInput(config.data, config.data.eval_split, config.train.batch_size)))
  images = batch["image"][:config.train.num_figure_examples]
  redrawn = plots.save_prediction_triplets(
      images, batch["mask"][:len(images)],
      prediction.Predictor(train.create_model(config), final.variables)(images), tmp_path / "redrawn.png")
  drawn, redrawn = (np.asarray(PIL.Image.open(path)) for path in (figures / "predictions_step_0000016.png", redrawn))
  assert drawn.shape == redrawn.shape and (drawn != redrawn).any(-1).mean() < 0.001  # Argmax ties may flip.
  # TensorBoard event file with the evaluation scalars.
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  (events,) = workdir.glob("events.out.tfevents.*")
  points = [(e.step, v.tag, float(tf.make_ndarray(v.tensor)))
            for e in tf.compat.v1.train.summary_iterator(str(events)) for v in e.summary.value]
  tags = {(step, tag): value for step, tag, value in points}
  assert len(tags) == len(points), "a tag written twice at one step: TensorBoard zigzags between the values"
  assert tags[(16, "eval/miou")] == pytest.approx(records[-1]["eval_miou"])
  assert tags[(16, "train_epoch/loss")] == pytest.approx(records[-1]["train_loss"])
  assert (4, "train/loss") in tags and (8, "train/loss") in tags


def test_train_means_are_read_after_later_steps_are_dispatched(tmp_path, monkeypatch):
  """Each log point's train/ means are fetched PREFETCH_BATCHES steps later (so the host never waits for the
  step it just dispatched), covering the same steps as before; checkpoints and epoch ends fetch everything."""
  flushes = []
  flush = train._TrainMetrics.flush

  def recording_flush(self, last_checkpoint, through=None):
    pending = [s for s, _ in self.pending]
    flushes.append((through, [s for s in pending if through is None or s <= through], max(pending, default=0)))
    return flush(self, last_checkpoint, through)

  monkeypatch.setattr(train._TrainMetrics, "flush", recording_flush)
  train.train_and_evaluate(tiny_config(), tmp_path)  # log_every_steps 4; checkpoints and epochs every 8.
  lag = parallel.PREFETCH_BATCHES
  logged = [(through, fetched, dispatched) for through, fetched, dispatched in flushes if through is not None]
  assert logged == [(4, [1, 2, 3, 4], 4 + lag), (8, [5, 6, 7, 8], 8), (12, [9, 10, 11, 12], 12 + lag),
                    (16, [13, 14, 15, 16], 16)]
  assert all(not fetched for through, fetched, _ in flushes if through is None)  # Nothing left over.


def test_train_log_means_cover_the_steps_since_the_last_log_point():
  """log_every_steps 5, a checkpoint at step 7 (which fetches every pending step): the log point at step 10
  still covers steps 6-10, and the evaluation's means every step since the last reset."""
  metrics = train._TrainMetrics(lambda step: 1e-3)
  losses = {step: float(step) for step in range(1, 13)}

  def add(step):  # One replica; the confusion counts step pixels right out of 2 * step.
    metrics.add(step, {"loss": np.array([losses[step]], np.float32),
                       "confusion": np.array([[[step, 0, 0], [0, 0, 0], [step, 0, 0]]])})

  for step in range(1, 8):
    add(step)
  metrics.flush("none", through=5)
  assert metrics.take_interval() == {"loss": 3.0, "pixel_accuracy": 0.5}
  metrics.flush("none")  # The checkpoint at step 7.
  for step in range(8, 13):
    add(step)
  metrics.flush("none", through=10)
  assert metrics.take_interval() == {"loss": 8.0, "pixel_accuracy": 0.5}  # Steps 6-10.
  assert metrics.take_interval() is None
  metrics.flush("none")
  assert metrics.summary()["loss"] == 6.5 and metrics.summary()["num_steps"] == 12


_PACKED_RUN_SCRIPT = r"""
import sys
from pathlib import Path
sys.path.insert(0, sys.argv[1])
import jax
from petseg_jax import checkpoint, packed, train
from tests.test_train import _trees_equal, tiny_config

reference_dir, workdir = Path(sys.argv[2]) / "tree", Path(sys.argv[2]) / "packed"
reference = train.train_and_evaluate(tiny_config(), reference_dir)
pack, layouts = packed.pack, []

def pack_as_on_accelerators(tree, concatenate=None):
  buffers, layout = pack(tree, concatenate is not False)
  layouts.append(layout)
  return buffers, layout

packed.pack = pack_as_on_accelerators
final = train.train_and_evaluate(tiny_config(), workdir)
state_layouts = [layout for layout in layouts if len(layout.shapes) == len(jax.tree.leaves(final))]
assert state_layouts and all(layout.concatenated for layout in state_layouts)
for part in ("params", "batch_stats", "opt_state", "step"):
  assert _trees_equal(getattr(final, part), getattr(reference, part)), part
assert train.read_metrics(workdir)[-1]["eval_miou"] == train.read_metrics(reference_dir)[-1]["eval_miou"]
assert checkpoint.available_steps(workdir) == checkpoint.available_steps(reference_dir)
assert _trees_equal(checkpoint.restore(workdir, 8, final).params,
                    checkpoint.restore(reference_dir, 8, reference).params)
print("SAME BITS")
"""


def test_the_accelerators_packed_state_path_gives_the_cpu_paths_bits(tmp_path, users_xla_environment):
  """On accelerators the loop keeps the state (and the figures' variables) packed into buffers; on the CPU it
  passes the leaves. Forced here on the CPU, the packed path trains, evaluates and checkpoints the same bits.
  Both runs in a child that compiles as users compile: with the suite's code generation XLA fuses the frozen
  phase's step differently in the two paths (last bits, which 16 Adam steps spread to ~6e-3)."""
  proc = subprocess.run([sys.executable, "-c", _PACKED_RUN_SCRIPT, str(REPO_ROOT), str(tmp_path)],
                        capture_output=True, text=True, env=dict(users_xla_environment, TF_CPP_MIN_LOG_LEVEL="2"),
                        cwd=REPO_ROOT, timeout=600)
  assert proc.returncode == 0 and "SAME BITS" in proc.stdout, proc.stderr[-3000:]


def test_freezing_patterns_that_miss_the_encoder_are_refused(tmp_path):
  config = tiny_config(frozen_params=("decoder/up_0/.*",))  # model.freeze_encoder=True.
  with pytest.raises(config_checks.ConfigError, match=r"frozen_params=\('decoder/up_0/\.\*',\) match no encoder "
                                                r"parameter: the encoder would train in full"):
    train.train_and_evaluate(config, tmp_path / "run")
  assert not (tmp_path / "run").exists()  # Refused before the workdir is made.


FIRST_BLOCKS = ("encoder/(Conv1|bn_Conv1|expanded_conv_.*)/.*",)


def test_freezing_follows_the_patterns_and_the_phase(initial_state):
  variables = initial_state.variables
  freezing = lambda config, step=0: freezing_lib.freezing_at(config, variables, step, STEPS_PER_EPOCH)
  assert freezing(tiny_config()) == freezing_lib.Freezing(encoder=True)
  assert freezing(tiny_config(), step=STEPS_PER_EPOCH) == freezing_lib.Freezing()  # Unfrozen after epoch 1.
  assert freezing(tiny_config(frozen_params=FIRST_BLOCKS)) == freezing_lib.Freezing(
      batch_norms=("encoder/bn_Conv1", "encoder/expanded_conv_depthwise_BN", "encoder/expanded_conv_project_BN"))
  assert freezing(tiny_config(frozen_params=("encoder/.*", "decoder/up_[12]/.*"))) == freezing_lib.Freezing(
      encoder=True, batch_norms=("decoder/up_1/bn", "decoder/up_2/bn"))
  # A BatchNorm layer whose own parameters train is not frozen, whatever else is.
  assert freezing(tiny_config(frozen_params=("encoder/.*/kernel",))) == freezing_lib.Freezing()
  fine_tuned = tiny_config()
  fine_tuned.model.freeze_encoder = False
  assert freezing(fine_tuned) == freezing_lib.Freezing()
  assert freezing_lib.Freezing(encoder=True, batch_norms=("decoder/up_1/bn",)).describe() == (
      "the encoder frozen; BatchNorm layers decoder/up_1/bn on running statistics")


def test_a_batch_norm_layer_frozen_in_part_is_warned_of(initial_state, caplog):
  variables = initial_state.variables
  with caplog.at_level("WARNING"):
    freezing_lib.check_freezing(tiny_config(frozen_params=("encoder/(Conv1|bn_Conv1)/.*", "encoder/block_1_.*/scale")),
                         variables)
  assert ("freeze some but not all parameters of the BatchNorm layers encoder/block_1_depthwise_BN, "
          "encoder/block_1_expand_BN, encoder/block_1_project_BN: those stay fixed") in caplog.text
  assert "bn_Conv1" not in caplog.text
  caplog.clear()
  with caplog.at_level("WARNING"):
    freezing_lib.check_freezing(tiny_config(), variables)  # The whole encoder: nothing to say.
  assert not caplog.text


def test_layers_frozen_by_path_keep_their_parameters_and_batch_norm_statistics():
  """Keras' ``trainable=False`` for the first encoder blocks and a decoder block: their parameters and
  moving statistics stay; the rest trains, its statistics move."""
  config = tiny_config(frozen_params=FIRST_BLOCKS + ("decoder/up_1/.*",))
  initial = _state(config)
  freezing = freezing_lib.freezing_at(config, initial.variables, 0, STEPS_PER_EPOCH)
  state, layout = parallel.replicate_state(initial)
  state, _ = train.pmapped_train_step(config, freezing, layout)(state, _random_batch(config),
                                                                parallel.replicate(jax.random.PRNGKey(0)))
  stepped = parallel.host_state(state, layout)
  for collection in ("params", "batch_stats"):
    before, after = (flax.traverse_util.flatten_dict(getattr(s, collection)) for s in (initial, stepped))
    for path in before:
      frozen = bool(re.fullmatch(FIRST_BLOCKS[0] + "|decoder/up_1/.*", "/".join(path)))
      assert np.array_equal(before[path], after[path]) == frozen, (collection, path)


def test_encoder_frozen_then_unfrozen(uninterrupted_run, initial_state):
  workdir, final = uninterrupted_run
  initial = initial_state
  after_epoch_1 = checkpoint.restore(workdir, 8, initial)
  # Epoch 1: encoder parameters and BatchNorm statistics untouched; the decoder trained.
  assert _trees_equal(after_epoch_1.params["encoder"], initial.params["encoder"])
  assert _trees_equal(after_epoch_1.batch_stats["encoder"], initial.batch_stats["encoder"])
  assert all(_leaves_changed(after_epoch_1.params["decoder"], initial.params["decoder"]))
  # Epoch 2 (train.unfreeze_after_epochs=1): the encoder is fine-tuned, its statistics updated.
  assert all(_leaves_changed(final.params["encoder"], after_epoch_1.params["encoder"]))
  assert all(_leaves_changed(final.batch_stats["encoder"], after_epoch_1.batch_stats["encoder"]))


def test_resume_after_sigterm_is_bit_identical(uninterrupted_run, tmp_path, monkeypatch):
  workdir = tmp_path / "interrupted"
  epoch_fn = input_pipeline.TrainInput.epoch

  def epoch_with_sigterm(self, epoch, start_step=0):
    for i, batch in enumerate(epoch_fn(self, epoch, start_step)):
      if (epoch, start_step + i) == (0, 5):
        os.kill(os.getpid(), signal.SIGTERM)  # Arrives while step 6's batch is being prepared.
      yield batch

  # Batches are taken from the input PREFETCH_BATCHES steps ahead: the step that finishes next is step 4.
  stopped = 6 - parallel.PREFETCH_BATCHES
  monkeypatch.setattr(input_pipeline.TrainInput, "epoch", epoch_with_sigterm)
  with pytest.raises(stopping.TrainingInterrupted, match=f"SIGTERM after step {stopped};") as raised:
    train.train_and_evaluate(tiny_config(), workdir)
  assert raised.value.signum == signal.SIGTERM
  assert checkpoint.available_steps(workdir) == [stopped]
  assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # Handlers restored.
  monkeypatch.undo()

  # The checkpoint holds every value: a resume neither reads the encoder weights (a file since removed, or
  # 'imagenet' offline) nor compiles the initializer.
  monkeypatch.setattr(weights, "load_encoder_variables", lambda *args: pytest.fail("read the encoder weights"))
  monkeypatch.setattr(train, "initialized", lambda *args: pytest.fail("initialized a state to overwrite"))
  resumed = train.train_and_evaluate(tiny_config(), workdir)
  monkeypatch.undo()
  _, final = uninterrupted_run
  assert resumed.step == final.step
  assert _trees_equal(resumed.params, final.params)
  assert _trees_equal(resumed.batch_stats, final.batch_stats)
  assert _trees_equal(resumed.opt_state, final.opt_state)
  records, reference = train.read_metrics(workdir), train.read_metrics(uninterrupted_run[0])
  assert [r["step"] for r in records] == [8, 16]
  assert [r["step"] for r in provenance.read_provenance(workdir)] == [0, stopped]
  assert [r["eval_miou"] for r in records] == [r["eval_miou"] for r in reference]
  # The resumed attempt's first train_* means cover the steps after the checkpoint only, and say so.
  assert [r["train_steps"] for r in records] == [STEPS_PER_EPOCH - stopped, STEPS_PER_EPOCH]
  assert [r["train_steps"] for r in reference] == [STEPS_PER_EPOCH, STEPS_PER_EPOCH]
  # Each attempt's events mark the step it trains from (see test_summary_writer_marks_a_restart_for_tensorboard).
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  event_files = _event_files(workdir)
  assert [[e.step for e in events if e.session_log.status == tf.compat.v1.SessionLog.START]
          for events in event_files] == [[1], [stopped + 1]]
  steps_shown = [step for step, _ in _scalars_as_tensorboard_shows_them(workdir, "train/loss")]
  assert steps_shown == sorted(set(steps_shown)) and steps_shown[-1] == 2 * STEPS_PER_EPOCH, steps_shown


def test_resume_with_changed_settings_warns_and_keeps_the_earlier_config(uninterrupted_run, tmp_path, caplog):
  """A finished 2-epoch run resumed for a third epoch at another learning rate: allowed (the shapes and the
  data order fit), said in the log, and config.json's earlier version kept beside it."""
  workdir = tmp_path / "extended"
  shutil.copytree(uninterrupted_run[0], workdir)
  before = (workdir / checkpoint.CONFIG_FILE).read_text()
  # As if it had been trained with another commit and jax: the resume says that the code changed too.
  (attempt,) = provenance.read_provenance(workdir)
  attempt.update(git_commit="0" * 40, packages=dict(attempt["packages"], jax="0.0.1"))
  (workdir / provenance.PROVENANCE_FILE).write_text(json.dumps(attempt) + "\n")
  with caplog.at_level("WARNING"):
    final = train.train_and_evaluate(tiny_config(num_epochs=3, learning_rate=5e-4), workdir)
  assert (f"Resuming at step 16 with other code than the attempt before (git_commit {'0' * 40} -> "
          f"{provenance.git_commit()}; jax 0.0.1 -> {jax.__version__})") in caplog.text
  assert final.step == 3 * STEPS_PER_EPOCH
  kept = workdir / f"config_before_step_{2 * STEPS_PER_EPOCH}.json"
  assert kept.read_text() == before
  assert json.loads((workdir / checkpoint.CONFIG_FILE).read_text())["train"]["learning_rate"] == 5e-4
  assert "train.learning_rate: 0.003 -> 0.0005" in caplog.text and "train.num_epochs: 2 -> 3" in caplog.text
  # Resumed again without a change: nothing more is kept or said.
  caplog.clear()
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(tiny_config(num_epochs=3, learning_rate=5e-4), workdir)
  assert "changed settings" not in caplog.text and "other code" not in caplog.text
  assert sorted(p.name for p in workdir.glob("config_before_step_*.json")) == [kept.name]


def test_an_unfreeze_after_the_last_step_is_a_warning(tmp_path, caplog):
  with caplog.at_level("WARNING"):
    train.train_and_evaluate(tiny_config(num_epochs=1, unfreeze_after_epochs=1, num_figure_examples=0),
                             tmp_path / "run")
  assert "unfreeze_after_epochs=1 unfreezes the encoder at step 8, but the run ends at step 8" in caplog.text


def test_fresh_start_discards_a_best_checkpoint_left_by_an_earlier_attempt(tmp_path):
  """An attempt killed after an evaluation but before its first periodic checkpoint (here of another model
  entirely, with a high mIoU) leaves a best checkpoint: the run starting afresh must not keep it, neither
  as the mIoU to beat nor as what ``--checkpoint best`` restores."""
  workdir = tmp_path / "restarted"
  from tests import test_checkpoint  # pylint: disable=g-import-not-at-top
  stale = checkpoint.Checkpointer(workdir, keep=1)
  stale.save_best(test_checkpoint._stepped(test_checkpoint._tiny_state(), 3), 0.99)  # pylint: disable=protected-access
  stale.close()
  train.train_and_evaluate(tiny_config(num_train_steps=STEPS_PER_EPOCH, unfreeze_after_epochs=-1), workdir)
  assert checkpoint.best_step(workdir) == STEPS_PER_EPOCH
  variables, _ = checkpoint.restore_variables(workdir, "best")
  assert "decoder" in variables["params"] and "conv" not in variables["params"]["encoder"]


def test_resume_refuses_another_number_of_training_examples(uninterrupted_run, tmp_path):
  """data.data_dir may change on resume (the same data moved), and a folder may change in place: a resume on
  another example list is refused before anything is written."""
  workdir = tmp_path / "other_data"
  shutil.copytree(uninterrupted_run[0], workdir)
  (attempt,) = provenance.read_provenance(workdir)
  attempt["train_examples"] = 63  # As if it had trained on a folder with one example more than now.
  (workdir / provenance.PROVENANCE_FILE).write_text(json.dumps(attempt) + "\n")
  written = lambda: sorted((p.name, p.stat().st_mtime_ns) for p in workdir.iterdir() if p.name != "lock")
  before = written()
  with pytest.raises(checkpoint.CheckpointError, match=re.escape(
      f"{workdir} trained on 63 examples of config.data.train_split='train', which now has 64")):
    train.train_and_evaluate(tiny_config(num_epochs=3), workdir)
  assert written() == before  # Refused holding the lock, before anything is written.
  # A damaged provenance.jsonl (no count to compare) is named, and stops the run before anything is written too.
  (workdir / provenance.PROVENANCE_FILE).write_text("{oops\n" + json.dumps(attempt) + "\n")
  before = written()
  with pytest.raises(metrics_log.MetricsFileError, match=re.escape(
      f"{workdir / provenance.PROVENANCE_FILE}, line 1: not a JSON record")):
    train.train_and_evaluate(tiny_config(num_epochs=3), workdir)
  assert written() == before


def test_resume_refuses_an_incompatible_config(uninterrupted_run):
  workdir, _ = uninterrupted_run
  config = tiny_config()
  config.model.alpha = 0.5
  config.data.image_size = 64
  with pytest.raises(checkpoint.CheckpointError, match=r"model\.alpha: saved 0\.35, now 0\.5.*data\.image_size"):
    train.train_and_evaluate(config, workdir)


def test_init_from_a_previous_run(uninterrupted_run):
  workdir, final = uninterrupted_run
  config = tiny_config()
  config.model.init_from = str(workdir / checkpoint.LATEST_DIR)
  model = train.create_model(config)
  loaded = train.checked_init_from(model, config.data.image_size, train.read_init_from(config))
  assert _trees_equal(loaded["params"], final.params)
  assert _trees_equal(loaded["batch_stats"], final.batch_stats)
  # A model whose last layer has another shape (other num_classes) is refused.
  config.model.init_from = str(workdir)
  config.model.num_classes = 2
  with pytest.raises(checkpoint.CheckpointError, match=r"init_from=.*\(step 16\): its params do not fit"):
    train.checked_init_from(train.create_model(config), config.data.image_size, train.read_init_from(config))


def test_a_run_from_init_from_reads_no_encoder_weights_and_compiles_no_initializer(uninterrupted_run, tmp_path,
                                                                                   monkeypatch):
  """E.g. the tutorial config's 'imagenet' beside model.init_from=unet.keras: no download is tried, and no
  random state is made to be overwritten. Here through write_initial_run (what scripts/import_keras_unet.py
  runs), whose step-0 checkpoint then holds the earlier run's parameters and a fresh optimizer."""
  workdir, final = uninterrupted_run
  config = tiny_config()
  config.model.init_from = str(workdir)
  config.model.encoder_weights = "imagenet"
  monkeypatch.setattr(weights, "load_encoder_variables", lambda *args: pytest.fail("read the encoder weights"))
  monkeypatch.setattr(train, "initialized", lambda *args: pytest.fail("initialized a state to overwrite"))
  train.write_initial_run(config, tmp_path / "from_earlier")
  variables, step = checkpoint.restore_variables(tmp_path / "from_earlier")
  assert step == 0
  assert _trees_equal(variables["params"], final.params)
  assert _trees_equal(variables["batch_stats"], final.batch_stats)
  with pytest.raises(checkpoint.CheckpointError, match="holds a run's checkpoints already"):
    train.write_initial_run(config, tmp_path / "from_earlier")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  """A non-finite loss at step 6 (here from a corrupted batch; tests/test_reliability.py makes one with a
  huge learning rate through the CLI) stops the run at the next log point, step 8, before checkpoint 8."""
  workdir = tmp_path / "diverging"
  epoch_fn = input_pipeline.TrainInput.epoch

  def epoch_with_nan(self, epoch, start_step=0):
    for i, batch in enumerate(epoch_fn(self, epoch, start_step)):
      if (epoch, start_step + i) == (0, 5):
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(input_pipeline.TrainInput, "epoch", epoch_with_nan)
  with pytest.raises(FloatingPointError, match=r"the loss is nan at step 6\. Lower config\.train\.learning_rate") \
      as raised:
    train.train_and_evaluate(tiny_config(num_train_steps=8, checkpoint_every_steps=4), workdir)
  assert f"last good checkpoint: step 4 in {workdir / checkpoint.LATEST_DIR}" in str(raised.value)
  assert checkpoint.available_steps(workdir) == [4]
  restored, step = checkpoint.restore_variables(workdir, "latest")
  assert step == 4
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(restored))
  assert train.read_metrics(workdir) == []
  # The points logged before the divergence are on disk.
  assert [step for step, _ in _scalars_as_tensorboard_shows_them(workdir, "train/loss")] == [4]


# --- the command line -----------------------------------------------------------------------------------

def _run_cli(*args, env_extra=None, timeout=600):
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **(env_extra or {}))
  return subprocess.run([sys.executable, str(TRAIN_SCRIPT), *map(str, args)], capture_output=True, text=True,
                        cwd=REPO_ROOT, env=env, timeout=timeout)


def test_cli_helpshort_lists_the_config_flag():
  """--config is the script's own flag (absl files a flag under the module that defines it: cli_flags)."""
  proc = _run_cli("--helpshort")
  assert "--config: Training configuration file" in proc.stdout + proc.stderr, proc.stderr[-2000:]


def test_cli_reports_an_unusable_workdir_and_a_corrupt_metrics_file_without_a_traceback(
    uninterrupted_run, tmp_path):
  """A --workdir that cannot be created, and a finished run whose metrics.jsonl has a damaged line (the resume
  reads it first): one ``error:`` line naming the path, exit code 1."""
  (tmp_path / "file").write_text("")
  damaged = tmp_path / "damaged"
  shutil.copytree(uninterrupted_run[0], damaged)
  lines = (damaged / train.METRICS_FILE).read_text().splitlines(keepends=True)
  (damaged / train.METRICS_FILE).write_text("{oops\n" + "".join(lines))
  overrides = [f"--config.{key}={value}" for key, value in (
      ("data.image_size", 32), ("data.num_synthetic_train", 64), ("data.num_synthetic_eval", 12),
      ("train.batch_size", 8), ("train.num_epochs", 2), ("train.unfreeze_after_epochs", 1),
      ("train.encoder_lr_multiplier", 0.5))]
  for workdir, message in ((tmp_path / "file" / "run", f"Cannot create the workdir {tmp_path / 'file' / 'run'}"),
                           (damaged, f"{damaged / train.METRICS_FILE}, line 1: not a JSON record")):
    proc = _run_cli("--config", REPO_ROOT / "configs" / "synthetic.py", "--workdir", workdir, *overrides)
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"error: {message}" in proc.stderr, proc.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (("--config.train.batchsize=3",), "unknown config field 'batchsize' in --config.train.batchsize"),
    (("--config", "configs/synthetic.py", "--config.train.batchsize=3"), "unknown config field 'batchsize'"),
    # The section's fields: absl's --helpfull lists no config file's fields.
    (("--config", "configs/synthetic.py", "--config.train.batchsize=3"), "config.train has: batch_size, "
     "checkpoint_every_steps, class_weights,"),
    (("--config.trian.batch_size=3",), "config has: data, model, seed, train."),
    (("--config", "configs/nonexistent.py"), "config file configs/nonexistent.py not found"),
    (("--config=configs",), "config file configs is a directory"),
    (("--config", "{tmp}/not_a_config.py"), "defines no get_config() function"),
    # The quickstart's length is num_train_steps=440: more epochs alone would train the same 440 steps.
    (("--config.train.num_epochs", "30"), "--config.train.num_epochs=30 has no effect: the config sets "
     "train.num_train_steps=440"),
    (("-config.train.num_epochs=30",), "--config.train.num_epochs=30 has no effect"),  # absl takes one dash too.
    (("--flagfile={tmp}/missing.flags",), "Unable to open flagfile: [Errno 2] No such file or directory"),
    # ml_collections would join the tuples to ('encoder/Conv1', 'encoder/bn_Conv1'), not take the last.
    (("--config.train.frozen_params=('encoder/Conv1',)", "--config.train.frozen_params=('encoder/bn_Conv1',)"),
     "--config.train.frozen_params is given 2 times, and a tuple field's values are joined, not replaced: "
     "('encoder/Conv1', 'encoder/bn_Conv1'). Give it once"),
])
def test_cli_config_errors_name_the_key_or_file(tmp_path, args, message):
  """A typo'd key (in the default config, read as the flag is defined, or in a --config file) and a
  --config that is no config file: one line naming it, no traceback, no workdir."""
  (tmp_path / "not_a_config.py").write_text("SETTINGS = {}\n")
  proc = _run_cli(*(arg.format(tmp=tmp_path) for arg in args), "--workdir", tmp_path / "w")
  assert proc.returncode == 1 and message in proc.stderr, proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
  assert not (tmp_path / "w").exists()


# --- learning -------------------------------------------------------------------------------------------

def test_synthetic_training_reaches_high_miou(tmp_path):
  config = synthetic.get_config()
  config.train.num_train_steps = 48
  config.train.eval_every_epochs = 100  # Only the final evaluation.
  config.train.num_figure_examples = 0
  train.train_and_evaluate(config, tmp_path)
  (record,) = train.read_metrics(tmp_path)
  assert record["eval_miou"] > 0.8, record


# --- initialization -------------------------------------------------------------------------------------

def test_initializer_compiled_faster_gives_the_default_compilations_bits(default_compiles):
  """``train.INIT_COMPILER_OPTIONS`` only makes the initializer compile faster: same values, bit for bit."""
  config = tiny_config()
  model = train.create_model(config)
  image = jnp.zeros((1, config.data.image_size, config.data.image_size, 3), jnp.float32)
  key = jax.random.PRNGKey(config.seed)
  default = jax.jit(lambda rng: model.init({"params": rng}, image, train=False)).lower(key).compile(
      default_compiles)(key)
  # train.initialized's program, compiled with its options and the users' code generation.
  fast = train._init.lower(model, key, config.data.image_size, None).compile(  # pylint: disable=protected-access
      {**train.INIT_COMPILER_OPTIONS, **default_compiles})(key, None)
  assert _trees_equal(flax.core.unfreeze(default), flax.core.unfreeze(fast))


def test_initializer_with_given_encoder_skips_its_random_init_and_keeps_the_decoders_bits():
  """Loaded encoder variables replace the encoder inside the compiled initializer: the decoder's random values
  are those of a full initialization, the encoder's are the given ones, and the encoder's random kernels are
  not computed at all (XLA removes them: the compiled program has far fewer random-number ops)."""
  config = tiny_config()
  model = train.create_model(config)
  key = jax.random.PRNGKey(config.seed)
  full = train.initialized(key, config.data.image_size, model)
  encoder = jax.tree.map(lambda x: np.full(x.shape, 0.25, np.float32),
                         {c: full[c]["encoder"] for c in ("params", "batch_stats")})
  merged = train.initialized(key, config.data.image_size, model, encoder)
  assert _trees_equal(merged["params"]["decoder"], full["params"]["decoder"])
  assert _trees_equal(merged["batch_stats"]["decoder"], full["batch_stats"]["decoder"])
  assert _trees_equal({c: merged[c]["encoder"] for c in ("params", "batch_stats")}, encoder)

  def random_ops(*args) -> int:  # Threefry's rounds rotate bits: count the shift ops XLA kept.
    hlo = train._init.lower(model, key, config.data.image_size, *args).compile().as_text()
    return hlo.count("shift-left")
  assert random_ops(encoder) < random_ops(None) / 4

  wrong = jax.tree.map(lambda x: np.zeros(x.shape + (1,), np.float32), encoder)
  with pytest.raises(weights.WeightsError, match="do not fit the model's encoder"):
    train.initialized(key, config.data.image_size, model, wrong)

# --- schedule and optimizer -----------------------------------------------------------------------------

@pytest.mark.parametrize("key, value, message", [
    ("class_weights", (-1.0, 1.0, 1.0), r"config\.train\.class_weights=\(-1\.0, 1\.0, 1\.0\) must be 3 finite "
     "non-negative"),
    ("class_weights", (float("nan"), 1.0, 1.0), r"config\.train\.class_weights=\(nan"),
    ("class_weights", (0.0, 0.0, 0.0), r"one per class, not all zero \(a zero loss trains nothing\)"),
    ("class_weights", ("(nan,1.0,1.0)",), r"config\.train\.class_weights=\('\(nan,1\.0,1\.0\)',\) must be 3 finite"),
    ("weight_decay", -1e-4, r"config\.train\.weight_decay=-0\.0001 must be a finite number >= 0\."),
    ("weight_decay", float("inf"), r"config\.train\.weight_decay=inf must be a finite number >= 0\."),
    ("learning_rate", None, r"config\.train\.learning_rate=None must be a finite number > 0\."),
    ("learning_rate", float("inf"), r"config\.train\.learning_rate=inf must be a finite number > 0\."),
    ("encoder_lr_multiplier", float("nan"), r"config\.train\.encoder_lr_multiplier=nan must be a finite number"),
    ("warmup_steps", -1, r"config\.train\.warmup_steps=-1 must be an integer >= 0\."),
    ("num_train_steps", None, r"config\.train\.num_train_steps=None must be an integer\."),
    ("num_figure_examples", None, r"config\.train\.num_figure_examples=None must be an integer >= 0\."),
    # With model.freeze_encoder=True (the tiny config's): the encoder would train, BatchNorm and all.
    ("frozen_params", (), r"freeze_encoder=True but config\.train\.frozen_params=\(\) freezes nothing"),
])
def test_bad_loss_and_optimizer_values_are_config_errors(key, value, message):
  """Refused with the other config checks, before a workdir is made (the loss's own check of the class
  weights would raise only when the first step is traced; the others would not raise at all)."""
  with pytest.raises(config_checks.ConfigError, match=message):
    config_checks.validate_config(tiny_config(**{key: value}), num_devices=1)


@pytest.mark.parametrize("section, key, value, message", [
    (None, "seed", 2**32, r"config\.seed=4294967296 must be an integer >= 0 and < 4294967296\."),
    (None, "seed", -1, r"config\.seed=-1 must be an integer >= 0"),
    ("train", "batch_size", True, r"config\.train\.batch_size=True must be a positive integer\."),
    ("train", "lr_schedule", None, r"config\.train\.lr_schedule=None is not one of \('constant', 'cosine'\)"),
    ("train", "frozen_params", None, r"config\.train\.frozen_params=None must be a tuple of regexes"),
    ("model", "decoder_filters", None, r"config\.model\.decoder_filters=\(None,\) must be 4 positive integers"),
    ("data", "eval_split", None, r"config\.data\.eval_split=None must name a split"),
    ("model", "decoder_bn_momentum", 1.0, r"config\.model\.decoder_bn_momentum=1\.0 must be a finite number >= 0 "
     r"and < 1\."),
    ("model", "dropout", None, r"config\.model\.dropout=None must be a finite number >= 0 and < 1\."),
    ("model", "freeze_encoder", None, r"config\.model\.freeze_encoder=None must be True or False\."),
    ("data", "shuffle_buffer", None, r"config\.data\.shuffle_buffer=None must be an integer >= 0\."),
    ("data", "cache", None, r"config\.data\.cache=None must be True or False\."),
])
def test_values_of_the_wrong_type_or_out_of_range_are_named(section, key, value, message):
  """What a config file can set (None, a string) or a flag can give, named before any work starts."""
  config = tiny_config()
  (config if section is None else config[section])[key] = value
  with pytest.raises(ValueError, match=message):  # ConfigError, DataError for config.data.
    config_checks.validate_config(config, num_devices=1)


def test_learning_rate_schedules():
  config = tiny_config(learning_rate=0.01, warmup_steps=10)
  constant = train.create_learning_rate_fn(config.train, 100)
  np.testing.assert_allclose([constant(0), constant(5), constant(10), constant(99)], [0, 0.005, 0.01, 0.01],
                             rtol=1e-6)
  config.train.lr_schedule = "cosine"
  cosine = train.create_learning_rate_fn(config.train, 100)
  np.testing.assert_allclose([cosine(5), cosine(10), cosine(55), cosine(100)], [0.005, 0.01, 0.005, 0.0],
                             rtol=1e-6, atol=1e-9)


def test_unfrozen_group_starts_adam_afresh_at_the_multiplied_rate():
  params = {"encoder": {"w": jnp.zeros(3)}, "decoder": {"w": jnp.zeros(3)}}
  labels = optim.param_labels(params, ("encoder/.*",))
  config = tiny_config(learning_rate=0.1, encoder_lr_multiplier=0.5)
  tx = optim.create_optimizer(config.train, optax.constant_schedule(0.1), labels, freeze=True,
                              unfreeze_step=3)
  opt_state = tx.init(params)
  grads = {"encoder": {"w": jnp.full(3, 4.0)}, "decoder": {"w": jnp.full(3, 4.0)}}
  moved = []
  for _ in range(4):
    updates, opt_state = tx.update(grads, opt_state, params)
    moved.append(float(updates["encoder"]["w"][0]))
    params = optax.apply_updates(params, updates)
  # Frozen for steps 0-2; at step 3 Adam's first (bias-corrected) step: -lr * multiplier * sign(g).
  np.testing.assert_allclose(moved, [0, 0, 0, -0.05], rtol=1e-5)
  np.testing.assert_allclose(params["decoder"]["w"], -0.4, rtol=1e-5)  # Four steps of -0.1.
  # Keras' Adam epsilon and AdamW when weight_decay > 0.
  assert optim.KERAS_ADAM["eps"] == 1e-7
  decayed, _ = optim.keras_adam(0.1, 0.1).update(
      {"w": jnp.zeros(1)}, optim.keras_adam(0.1, 0.1).init({"w": jnp.ones(1)}), {"w": jnp.ones(1)})
  np.testing.assert_allclose(decayed["w"], -0.01, rtol=1e-5)  # -lr * weight_decay * param.


def test_a_group_frozen_for_good_never_moves_even_with_weight_decay():
  """``freeze_encoder`` without unfreezing: the frozen group's updates are exact zeros, whatever its gradients
  (a partial freeze gets real ones) and with weight decay, which would shrink it without any gradient."""
  params = {"encoder": {"w": jnp.ones(3)}, "decoder": {"w": jnp.ones(3)}}
  labels = optim.param_labels(params, ("encoder/.*",))
  config = tiny_config(learning_rate=0.1, weight_decay=0.1)
  tx = optim.create_optimizer(config.train, optax.constant_schedule(0.1), labels, freeze=True,
                              unfreeze_step=None)
  opt_state = tx.init(params)
  grads = {"encoder": {"w": jnp.full(3, 4.0)}, "decoder": {"w": jnp.full(3, 4.0)}}
  for _ in range(3):
    updates, opt_state = tx.update(grads, opt_state, params)
    assert np.array_equal(updates["encoder"]["w"], np.zeros(3))
    assert np.all(np.asarray(updates["decoder"]["w"]) < 0)
    params = optax.apply_updates(params, updates)
  assert np.array_equal(params["encoder"]["w"], np.ones(3))


def test_the_model_state_and_config_check_need_no_tensorflow():
  """Accelerator hosts may have JAX and no TensorFlow: the train module, the config check (data settings
  included) and the benchmark's model paths import without it (TensorFlow is imported where data is read)."""
  code = """
import sys
sys.modules["tensorflow"] = sys.modules["tensorflow_datasets"] = None  # Any import of them fails.
from configs import default
from petseg_jax import config_checks
from petseg_jax import train
from petseg_jax.data import DataError
config = default.get_config()
config_checks.validate_config(config, 1)
config.data.mask_resize = "cubic"
try:
  config_checks.validate_config(config, 1)
except DataError as e:
  print("refused:", e)
"""
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "refused: config.data.mask_resize='cubic' is not one of" in proc.stdout
