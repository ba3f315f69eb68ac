"""Checkpoints: round trip, keep-last-K, best by mIoU, partial writes, NaN refusal, lock, config check."""

import json
import re
import os
from pathlib import Path
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from petseg_jax import checkpoint
from petseg_jax import optim
from petseg_jax import train

REPO_ROOT = Path(__file__).resolve().parents[1]


def _tiny_state(freeze: bool = True) -> train.TrainState:
  """A TrainState shaped like the UNet's (encoder/decoder subtrees) with the real freezing optimizer."""
  params = {"encoder": {"conv": {"kernel": jnp.arange(6.0).reshape(2, 3)}},
            "decoder": {"last": {"kernel": jnp.ones((3, 2)), "bias": jnp.zeros((2,))}}}
  batch_stats = {"encoder": {"bn": {"mean": jnp.zeros(3), "var": jnp.ones(3)}}}
  train_config = ml_collections.ConfigDict({"weight_decay": 0.0, "encoder_lr_multiplier": 1.0})
  tx = optim.create_optimizer(train_config, optax.constant_schedule(1e-3),
                              optim.param_labels(params, ("encoder/.*",)), freeze=freeze,
                              unfreeze_step=None)
  return train.TrainState.create(apply_fn=None, params=params, tx=tx, batch_stats=batch_stats)


def _stepped(state: train.TrainState, steps: int) -> train.TrainState:
  grads = jax.tree.map(jnp.ones_like, state.params)
  for _ in range(steps):
    state = state.apply_gradients(grads=grads)
  return state


def _assert_trees_equal(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


@pytest.mark.parametrize("freeze", [True, False])
def test_round_trip_is_exact(tmp_path, freeze):
  template = _tiny_state(freeze)
  state = _stepped(template, 3)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  ckpt.save(state)
  restored = ckpt.restore_latest(template)
  ckpt.close()
  assert restored.step == 3 and isinstance(restored.step, int)
  _assert_trees_equal(restored.params, state.params)
  _assert_trees_equal(restored.batch_stats, state.batch_stats)
  _assert_trees_equal(restored.opt_state, state.opt_state)
  # The restored state keeps training exactly like the original.
  _assert_trees_equal(_stepped(restored, 2).params, _stepped(state, 2).params)


def test_keeps_last_k_and_best(tmp_path):
  template = _tiny_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  for step, miou in ((1, 0.3), (2, 0.7), (3, 0.5), (4, None)):
    state = _stepped(template, step)
    ckpt.save(state)
    if miou is not None and (ckpt.best_metric() is None or miou > ckpt.best_metric()):
      ckpt.save_best(state, miou)
  assert ckpt.best_metric() == pytest.approx(0.7)
  ckpt.close()
  assert checkpoint.available_steps(tmp_path) == [3, 4]
  assert checkpoint.best_step(tmp_path) == 2
  assert checkpoint.restore(tmp_path, "latest", template).step == 4
  best = checkpoint.restore(tmp_path, "best", template)
  assert best.step == 2
  _assert_trees_equal(best.params, _stepped(template, 2).params)
  assert checkpoint.restore(tmp_path, 3, template).step == 3
  assert checkpoint.restore(tmp_path, "2", template).step == 2  # The best step, by number.
  variables, step = checkpoint.restore_variables(tmp_path / checkpoint.LATEST_DIR / "3")
  assert step == 3 and set(variables) == {"params", "batch_stats"}
  _assert_trees_equal(variables["params"], _stepped(template, 3).params)
  # A checkpoints dir given as the place (model.init_from): its latest; checkpoints_best/'s is the best.
  assert checkpoint.restore_variables(tmp_path / checkpoint.LATEST_DIR, "latest")[1] == 4
  variables, step = checkpoint.restore_variables(tmp_path / checkpoint.BEST_DIR, "latest")
  assert step == 2
  _assert_trees_equal(variables["params"], _stepped(template, 2).params)


def test_best_checkpoint_after_the_starting_step_is_discarded(tmp_path):
  """A run killed after a best checkpoint but before the next periodic one resumes from an earlier step."""
  template = _tiny_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  ckpt.save(_stepped(template, 2))
  ckpt.save_best(_stepped(template, 4), 0.9)
  ckpt.close()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)  # The next attempt starts at step 2.
  assert ckpt.discard_best_after(4) is None  # Not after the starting step: kept.
  assert ckpt.discard_best_after(2) == 4
  assert ckpt.best_metric() is None
  assert not list((tmp_path / checkpoint.BEST_DIR).iterdir())
  ckpt.save_best(_stepped(template, 4), 0.5)  # The redone evaluation is the best again.
  ckpt.close()
  assert checkpoint.best_step(tmp_path) == 4


def test_partially_written_checkpoint_is_never_restored(tmp_path):
  template = _tiny_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
  ckpt.save(_stepped(template, 1))
  ckpt.close()
  # What a process killed while Orbax writes step 2 leaves behind: the temporary directory, never renamed.
  partial = tmp_path / checkpoint.LATEST_DIR / "2.orbax-checkpoint-tmp-1700000000"
  (partial / "default").mkdir(parents=True)
  (partial / "default" / "garbage").write_bytes(b"\0" * 10)
  assert checkpoint.available_steps(tmp_path) == [1]
  assert checkpoint.restore(tmp_path, "latest", template).step == 1
  # The next training process removes the leftover as it opens the workdir and resumes from step 1.
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
  assert not partial.exists()
  assert ckpt.latest_step() == 1
  ckpt.save(_stepped(template, 2))
  ckpt.close()
  assert checkpoint.available_steps(tmp_path) == [1, 2]


def test_refuses_to_save_non_finite_state(tmp_path):
  template = _tiny_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  ckpt.save(_stepped(template, 1))
  bad = _stepped(template, 2)
  bad = bad.replace(params=jax.tree.map(lambda x: x * jnp.nan, bad.params))
  with pytest.raises(FloatingPointError, match="step 2"):
    ckpt.save(bad)
  with pytest.raises(FloatingPointError):
    ckpt.save_best(bad, 0.9)
  ckpt.close()
  assert checkpoint.available_steps(tmp_path) == [1]
  assert checkpoint.best_step(tmp_path) is None


def test_restore_errors_are_clear(tmp_path):
  template = _tiny_state()
  with pytest.raises(checkpoint.CheckpointError, match="does not exist"):
    checkpoint.restore(tmp_path / "nope", "latest", template)
  ckpt = checkpoint.Checkpointer(tmp_path, keep=2)
  with pytest.raises(checkpoint.CheckpointError, match="No checkpoint"):
    checkpoint.restore(tmp_path, "latest", template)
  with pytest.raises(checkpoint.CheckpointError, match="No best checkpoint .*; train the run first"):
    checkpoint.restore(tmp_path, "best", template)  # No latest to point to either.
  ckpt.save(_stepped(template, 5))
  ckpt.close()
  with pytest.raises(checkpoint.CheckpointError, match="No best checkpoint .*; use --checkpoint latest"):
    checkpoint.restore(tmp_path, "best", template)
  with pytest.raises(checkpoint.CheckpointError, match=r"step 7.*available steps: \[5\]"):
    checkpoint.restore(tmp_path, 7, template)
  with pytest.raises(checkpoint.CheckpointError, match="'latest', 'best' or a step"):
    checkpoint.restore(tmp_path, "newest", template)
  # A state of another optimizer layout (fine-tuning instead of frozen) cannot take this checkpoint.
  with pytest.raises(checkpoint.CheckpointError, match="does not fit"):
    checkpoint.restore(tmp_path, "latest", _tiny_state(freeze=False))
  # Nor a state of the same structure with other shapes (e.g. other decoder_filters): Orbax alone would
  # restore the saved shapes into it.
  wider = _tiny_state().replace(params={**template.params, "decoder": {"last": {
      "kernel": jnp.ones((3, 4)), "bias": jnp.zeros((4,))}}})
  wider = wider.replace(opt_state=wider.tx.init(wider.params))
  with pytest.raises(checkpoint.CheckpointError,
                     match=r"does not fit.*\['decoder'\]\['last'\]\['bias'\] is \(2,\) there, \(4,\) here"):
    checkpoint.restore(tmp_path, "latest", wider)


def _truncate_array_data(step_dir):
  for path in step_dir.rglob("*"):
    if path.is_file() and path.parent.name == "d":  # The array data.
      path.write_bytes(b"")


def test_damaged_checkpoint_is_reported_as_damaged(tmp_path):
  """Files truncated or missing (a disk error, an interrupted copy of the workdir): a CheckpointError naming
  the directory and what to do, not Orbax's exception from deep inside TensorStore, nor "does not fit"."""
  template = _tiny_state()
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
  for step in (1, 2, 3):
    ckpt.save(_stepped(template, step))
  ckpt.close()
  truncated = tmp_path / checkpoint.LATEST_DIR / "3"
  _truncate_array_data(truncated)
  missing = tmp_path / checkpoint.LATEST_DIR / "2"
  (missing / "default" / "_METADATA").unlink()
  for damaged in (truncated, missing):
    with pytest.raises(checkpoint.CheckpointError,
                       match=f"Checkpoint {damaged} cannot be read: it is damaged.*Delete that directory"):
      checkpoint.restore_variables(tmp_path, int(damaged.name))
    with pytest.raises(checkpoint.CheckpointError, match=f"Checkpoint {damaged} cannot be read"):
      checkpoint.restore(tmp_path, int(damaged.name), template)
  with pytest.raises(checkpoint.CheckpointError, match=r"other steps here: \[1, 2\]"):
    checkpoint.Checkpointer(tmp_path, keep=3).restore_latest(template)  # What resuming does.
  assert checkpoint.restore(tmp_path, 1, template).step == 1


_RESTORE_DAMAGED = """
import sys
import time
from pathlib import Path
from petseg_jax import checkpoint
from tests import test_checkpoint as t
workdir, template = Path(sys.argv[1]), t._tiny_state()
ckpt = checkpoint.Checkpointer(workdir, keep=5)
for step in range(1, 6):
  ckpt.save(t._stepped(template, step))
ckpt.close()
# Whether reads outlive a failed restore is a race (none does about one time in four): five tries.
for step in range(1, 6):
  t._truncate_array_data(workdir / checkpoint.LATEST_DIR / str(step))
  try:
    checkpoint.restore(workdir, step, template)
  except checkpoint.CheckpointError as e:
    error = e
  time.sleep(0.1)  # For the late reads to end (at interpreter exit they would not be reported).
print(f"error: {error}", file=sys.stderr)
"""


def test_damaged_checkpoint_leaves_no_tracebacks_on_stderr(tmp_path):
  """Only the one-line error: neither the "Event loop is closed" of each TensorStore read that outlived the
  failed restore (reported from TensorStore's threads, also after the restore returned) nor asyncio's "Task
  exception was never retrieved" of each read that failed too."""
  result = subprocess.run([sys.executable, "-c", _RESTORE_DAMAGED, str(tmp_path)], capture_output=True,
                          text=True, cwd=REPO_ROOT, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)}, timeout=120)
  assert result.returncode == 0, result.stderr
  assert "error: Checkpoint" in result.stderr and "cannot be read" in result.stderr
  assert "Traceback" not in result.stderr and "Event loop is closed" not in result.stderr, result.stderr


def test_workdir_lock(tmp_path):
  with checkpoint.lock_workdir(tmp_path):
    with pytest.raises(checkpoint.CheckpointError, match=f"in use by another training process \\(pid {os.getpid()}\\)"):
      with checkpoint.lock_workdir(tmp_path):
        pass
  with checkpoint.lock_workdir(tmp_path):  # Released: usable again.
    pass


# Each setting a resume must not change, with another value: written out here, not read from RESUME_KEYS,
# so that a key dropped from there is a failure.
CHANGED_RESUME_SETTINGS = {
    "seed": 1, "model.num_classes": 4, "model.alpha": 0.35, "model.decoder_filters": (64, 32, 32, 16),
    "model.freeze_encoder": False, "data.image_size": 96, "data.source": "folder",
    "data.tfds_name": "oxford_iiit_pet:3.*.*", "data.train_split": "train[:50%]", "data.shuffle_buffer": 10,
    "data.num_synthetic_train": 64, "train.batch_size": 32, "train.frozen_params": ("encoder/Conv1/.*",),
    "train.unfreeze_after_epochs": 2,
}


@pytest.mark.parametrize("key", sorted(CHANGED_RESUME_SETTINGS))
def test_every_setting_of_the_runs_shape_data_or_freezing_refuses_a_resume(tmp_path, key):
  from configs import default  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  checkpoint.write_config(tmp_path, config)
  section, _, name = key.rpartition(".")
  (config[section] if section else config)[name] = CHANGED_RESUME_SETTINGS[key]
  with pytest.raises(checkpoint.CheckpointError, match=rf"{re.escape(key)}: saved"):
    checkpoint.check_resume_config(tmp_path, config)


def test_resume_config_check(tmp_path):
  config = ml_collections.ConfigDict({
      "seed": 0,
      "data": {"image_size": 64, "source": "synthetic", "train_split": "train", "shuffle_buffer": 100,
               "num_synthetic_train": 32, "data_dir": ""},
      "model": {"num_classes": 3, "alpha": 0.35, "decoder_filters": (64, 32, 32, 16),
                "freeze_encoder": True},
      "train": {"batch_size": 8, "frozen_params": ("encoder/.*",), "unfreeze_after_epochs": -1,
                "learning_rate": 1e-3, "weight_decay": 0.0},
  })
  checkpoint.write_config(tmp_path, config)
  saved = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
  assert saved["model"]["decoder_filters"] == [64, 32, 32, 16]
  checkpoint.check_resume_config(tmp_path, config)  # Same config: fine.
  config.train.learning_rate = 1e-4  # Not part of the architecture or data shape: fine.
  checkpoint.check_resume_config(tmp_path, config)
  config.model.alpha = 1.0
  config.data.image_size = 128
  with pytest.raises(checkpoint.CheckpointError, match=r"model\.alpha: saved 0\.35, now 1\.0.*data\.image_size"
                     r".*do not fit the new model\.alpha, so model\.init_from cannot start from them"):
    checkpoint.check_resume_config(tmp_path, config)
  config.model.alpha, config.data.image_size = 0.35, 64
  config.seed = 1  # Another seed's data order and dropout from here on: neither seed's run.
  with pytest.raises(checkpoint.CheckpointError, match=r"seed: saved 0, now 1.*or --config\.model\.init_from="):
    checkpoint.check_resume_config(tmp_path, config)
  config.seed = 0
  for key, value in (("source", "folder"), ("train_split", "train[:50%]"), ("shuffle_buffer", 10),
                     ("num_synthetic_train", 64)):  # Another data order: images twice, others never.
    changed = ml_collections.ConfigDict(config.to_dict())
    changed.data[key] = value
    with pytest.raises(checkpoint.CheckpointError, match=rf"data\.{key}: saved"):
      checkpoint.check_resume_config(tmp_path, changed)
  config.train.weight_decay = 1e-4  # Adam -> AdamW: the optimizer state has another structure.
  with pytest.raises(checkpoint.CheckpointError, match=r"train\.weight_decay: saved 0\.0, now 0\.0001 \(switched on"):
    checkpoint.check_resume_config(tmp_path, config)
  config.train.weight_decay = 0.0
  config.data.data_dir = "/moved/elsewhere"  # The same data moved: resumes (the log says what changed).
  assert set(checkpoint.check_resume_config(tmp_path, config)) == {"data.data_dir", "train.learning_rate"}
  assert checkpoint.read_config(tmp_path).model.alpha == 0.35
  decayed = ml_collections.ConfigDict(config.to_dict())
  decayed.train.weight_decay = 1e-4
  checkpoint.write_config(tmp_path, decayed)
  decayed.train.weight_decay = 3e-4  # Another positive decay: the same AdamW state, resumes.
  assert "train.weight_decay" in checkpoint.check_resume_config(tmp_path, decayed)
  decayed.train.weight_decay = 0.0
  with pytest.raises(checkpoint.CheckpointError, match=r"train\.weight_decay: .*switched off"):
    checkpoint.check_resume_config(tmp_path, decayed)
  saved = json.loads((tmp_path / checkpoint.CONFIG_FILE).read_text())
  saved["train"]["weight_decay"] = None  # A hand-edited config.json: no decay, not a crash.
  (tmp_path / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  decayed.train.weight_decay = 1e-4
  with pytest.raises(checkpoint.CheckpointError, match=r"train\.weight_decay: saved None, now 0\.0001 \(switched on"):
    checkpoint.check_resume_config(tmp_path, decayed)
  (tmp_path / checkpoint.CONFIG_FILE).unlink()  # Checkpoints whose config.json is gone: nothing to check.
  with pytest.raises(checkpoint.CheckpointError, match="holds checkpoints but no config.json"):
    checkpoint.check_resume_config(tmp_path, config)
