"""Reliability, end to end through ``scripts/train.py``: kill and resume, graceful stop, workdir lock,
crash-safe metrics and checkpoints, and clean errors for bad data and bad configurations.

Crashes are real: the child is SIGKILLed (no handler, no cleanup) at exact moments chosen by
``tests/reliability_utils.py`` (which patches the child from a ``sitecustomize``; the training code holds no
test hook). The runs are tiny (32x32 synthetic pets, 4 steps per epoch, 2 epochs) and share a persistent
compilation cache; subprocesses are started concurrently where the test allows it.

Covered elsewhere (not repeated here): each planted bad file and bad folder layout, with and without
``data.skip_bad_examples`` (tests/test_input_pipeline.py); an in-process SIGTERM resume, the NaN guard on a
corrupted batch, an incompatible resume and a config typo (tests/test_train.py); partial checkpoint
directories, the refusal to save NaN and the lock in-process (tests/test_checkpoint.py).
"""

from __future__ import annotations

import errno
import json
import os
from pathlib import Path
import shutil
import signal
import subprocess

from absl import flags
import jax
import ml_collections
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import synthetic
from petseg_jax import checkpoint
from petseg_jax import config_checks
from petseg_jax import input_pipeline
from petseg_jax import stopping
from petseg_jax import train
from petseg_jax import weights
from tests import reliability_utils as rel
from tests import test_checkpoint

# 32 examples / batch 8 = 4 steps per epoch, 2 epochs; checkpoints every 2 steps (the last 3 kept);
# evaluations at steps 4 and 8. Dropout and random flips on: both must resume exactly.
TINY = ("--config.data.image_size=32", "--config.data.num_synthetic_train=32",
        "--config.data.num_synthetic_eval=8", "--config.train.batch_size=8", "--config.train.num_epochs=2",
        "--config.train.checkpoint_every_steps=2", "--config.train.log_every_steps=2",
        "--config.train.keep_checkpoints=3", "--config.train.num_figure_examples=0",
        "--config.model.dropout=0.2")
EVAL_STEPS = [4, 8]
TMP_GLOB = "*.orbax-checkpoint-tmp*"
KILLED = -signal.SIGKILL


@pytest.fixture
def children():
  """Processes a test starts; any still running when it ends (a failed assertion) are killed."""
  procs: list[subprocess.Popen] = []
  yield procs
  for proc in procs:
    if proc.poll() is None:
      proc.kill()
      proc.communicate()


def assert_clean_error(proc: subprocess.CompletedProcess, *fragments: str) -> str:
  """Exit code 1, one ``error: <message>`` at the end of stderr naming every fragment, no traceback."""
  assert proc.returncode == 1, (proc.returncode, proc.stderr[-4000:])
  assert "Traceback" not in proc.stderr, proc.stderr[-4000:]
  starts = [i for i, line in enumerate(proc.stderr.splitlines()) if line.startswith("error: ")]
  assert len(starts) == 1, proc.stderr[-4000:]
  message = "\n".join(proc.stderr.splitlines()[starts[0]:])  # Messages may say what to do on a next line.
  for fragment in fragments:
    assert fragment in message, (fragment, message)
  return message


def assert_checkpoints_sound(workdir: Path) -> None:
  """Every checkpoint a reader can list restores, with finite values; partial ones are never listed."""
  for which in [*checkpoint.available_steps(workdir), *(
      ["best"] if checkpoint.best_step(workdir) is not None else [])]:
    variables, _ = checkpoint.restore_variables(workdir, which)
    assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(variables)), which


def raw_checkpoint(workdir: Path, directory: str, step: int) -> dict:
  """Everything a checkpoint holds (step, params, batch_stats, opt_state), as saved."""
  return ocp.StandardCheckpointer().restore((workdir / directory / str(step) / "default").absolute())


def assert_trees_equal(a, b) -> None:
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def metrics_lines(workdir: Path) -> list[dict]:
  """The records of metrics.jsonl; every line must be complete."""
  text = (workdir / train.METRICS_FILE).read_text()
  assert text.endswith("\n"), text[-200:]
  return [json.loads(line) for line in text.splitlines()]


# --- kill, resume, stop, lock -----------------------------------------------------------------------------

def test_killed_stopped_and_resumed_run_equals_an_uninterrupted_run(tmp_path, children):
  """Five processes on one workdir, each stopped at a different moment, give the uninterrupted run's bits."""
  workdir, reference_dir = tmp_path / "run", tmp_path / "reference"
  command = rel.train_command(workdir, *TINY)
  plain_env = rel.cli_env(tmp_path)

  def run_with(fault: dict) -> subprocess.CompletedProcess:
    proc = rel.start(command, rel.cli_env(tmp_path, fault), children)
    result = rel.finish(proc)
    result.pid = proc.pid
    return result

  # 0. An earlier attempt killed after an evaluation but before its first checkpoint left a record behind:
  #    a run starting afresh must not keep it (the final comparison would see two step-4 records).
  workdir.mkdir()
  (workdir / train.METRICS_FILE).write_text(json.dumps({"step": 4, "eval_miou": 0.123}) + "\n")

  # 1. SIGTERM (a preemption notice) while the run is between steps, with a second process trying the same
  #    workdir meanwhile: the second is refused, the first finishes its step, checkpoints and exits 143.
  ready, go = tmp_path / "ready", tmp_path / "go"
  first = rel.start(command, rel.cli_env(tmp_path, {"at": "batch", "step": 3, "do": "pause",
                                                    "ready": str(ready), "go": str(go)}),
                    children)
  rel.wait_for_file(ready, first)
  # The uninterrupted reference runs alongside from now on (the train step is in the compilation cache).
  reference = rel.start(rel.train_command(reference_dir, *TINY), plain_env, children)
  second = rel.run(command, plain_env)
  assert_clean_error(second, f"{workdir} is in use by another training process (pid {first.pid})")
  first.send_signal(signal.SIGTERM)
  go.touch()
  stopped = rel.finish(first)
  assert stopped.returncode == 128 + signal.SIGTERM, stopped.stderr[-4000:]
  assert "Traceback" not in stopped.stderr
  assert "Stopped by SIGTERM after step 3" in stopped.stderr
  assert "Run the same command again to resume" in stopped.stderr
  assert checkpoint.available_steps(workdir) == [2, 3]
  assert_checkpoints_sound(workdir)
  assert train.read_metrics(workdir) == []

  # 2. SIGKILL while checkpoint 4 is written: all its files are there, the atomic rename is not done.
  killed = run_with({"at": "ckpt_finalize", "dir": "checkpoints", "step": 4, "do": "kill"})
  assert killed.returncode == KILLED, killed.stderr[-4000:]
  (partial,) = (workdir / checkpoint.LATEST_DIR).glob(TMP_GLOB)
  assert partial.name.startswith("4.") and any(p.is_file() for p in partial.rglob("*"))
  assert checkpoint.available_steps(workdir) == [2, 3]  # Never listed, so never restored.
  assert_checkpoints_sound(workdir)
  # The killed process could not release anything: its pid is still in the lock file.
  assert (workdir / checkpoint.LOCK_FILE).read_text().strip() == str(killed.pid)

  # 3. SIGKILL while the step-4 record is appended to metrics.jsonl, after checkpoint 4 and the best
  #    checkpoint: half a line on disk, which readers skip. The stale lock does not block this restart, and
  #    the next one must evaluate step 4 again (its checkpoint exists, its record does not).
  killed = run_with({"at": "metrics_write", "step": 4, "do": "kill"})
  assert killed.returncode == KILLED, killed.stderr[-4000:]
  assert not list((workdir / checkpoint.LATEST_DIR).glob(TMP_GLOB))  # Step 2's leftover was cleaned up.
  assert checkpoint.available_steps(workdir) == [2, 3, 4]
  assert checkpoint.best_step(workdir) == 4  # The record is written last: it marks the evaluation done.
  text = (workdir / train.METRICS_FILE).read_text()
  assert text and not text.endswith("\n")
  assert train.read_metrics(workdir) == []
  assert_checkpoints_sound(workdir)

  # 4. SIGKILL while the oldest checkpoint (2) is deleted after checkpoint 6 is saved.
  killed = run_with({"at": "ckpt_delete", "dir": "checkpoints", "step": 2, "do": "kill"})
  assert killed.returncode == KILLED, killed.stderr[-4000:]
  assert checkpoint.available_steps(workdir) == [3, 4, 6]
  assert_checkpoints_sound(workdir)
  assert [r["step"] for r in metrics_lines(workdir)] == [4]
  # Step 4's evaluation was redone at the restart, with no training since: no rate (not a rate of 0).
  assert metrics_lines(workdir)[0]["images_per_sec"] is None

  # Alongside the next stage, a copy of this workdir is resumed with a learning rate that makes the loss
  # overflow at once (nothing else changed; the learning rate may change on resume).
  diverging_dir = tmp_path / "diverging"
  shutil.copytree(workdir, diverging_dir)
  diverging = rel.start(rel.train_command(diverging_dir, *TINY, "--config.train.learning_rate=1e30"),
                        plain_env, children)

  # 5. The same command again finishes the run.
  finished = rel.run(command, plain_env)
  assert finished.returncode == 0, finished.stderr[-4000:]
  done = rel.finish(reference)
  assert done.returncode == 0, done.stderr[-4000:]

  # The diverging copy stopped at the first non-finite loss with a message; its checkpoints and metrics
  # are those it started from, every one restorable and finite.
  assert_clean_error(rel.finish(diverging), "Training diverged", "Lower config.train.learning_rate",
                     f"last good checkpoint: step 6 in {diverging_dir / checkpoint.LATEST_DIR}")
  assert checkpoint.available_steps(diverging_dir) == [3, 4, 6]
  assert_checkpoints_sound(diverging_dir)
  assert [r["step"] for r in metrics_lines(diverging_dir)] == [4]

  # Bit-identical to the uninterrupted run: every checkpointed array, the best checkpoint, the evaluations.
  assert checkpoint.available_steps(workdir) == checkpoint.available_steps(reference_dir) == [4, 6, 8]
  for step in (6, 8):
    assert_trees_equal(raw_checkpoint(workdir, checkpoint.LATEST_DIR, step),
                       raw_checkpoint(reference_dir, checkpoint.LATEST_DIR, step))
  best = checkpoint.best_step(reference_dir)
  assert checkpoint.best_step(workdir) == best
  assert_trees_equal(raw_checkpoint(workdir, checkpoint.BEST_DIR, best),
                     raw_checkpoint(reference_dir, checkpoint.BEST_DIR, best))
  records, expected = metrics_lines(workdir), metrics_lines(reference_dir)
  assert [r["step"] for r in records] == [r["step"] for r in expected] == EVAL_STEPS
  for record, reference_record in zip(records, expected):
    for key, value in reference_record.items():
      if key.startswith("eval_") or key in ("epoch", "learning_rate"):
        assert record[key] == value, (record["step"], key)
  # Nothing half-written is left anywhere.
  assert not list(workdir.rglob(TMP_GLOB))
  assert_checkpoints_sound(workdir)


def test_sigint_requests_the_same_graceful_stop_as_sigterm():
  """Ctrl-C: the loop's handler records the request (the step finishes and a checkpoint is written, as the
  end-to-end SIGTERM case above shows); the previous handlers come back afterwards."""
  previous = signal.getsignal(signal.SIGINT)
  with stopping.graceful_stop() as stop:
    os.kill(os.getpid(), signal.SIGINT)
    assert stop.signum == signal.SIGINT  # No KeyboardInterrupt in the middle of a step.
    os.kill(os.getpid(), stopping.STOP_SIGNAL)  # An ablation sweep's request: never a second one.
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGINT)  # A second Ctrl-C aborts at once.
  with stopping.graceful_stop() as stop:
    os.kill(os.getpid(), stopping.STOP_SIGNAL)  # The sweep's request first, then the job's scheduler's.
    os.kill(os.getpid(), signal.SIGTERM)
    assert stop.signum == stopping.STOP_SIGNAL
    with pytest.raises(KeyboardInterrupt):
      os.kill(os.getpid(), signal.SIGTERM)
  assert signal.getsignal(signal.SIGINT) is previous


# --- crash-safe files -------------------------------------------------------------------------------------

def test_metrics_file_tolerates_a_partial_last_line_and_names_a_corrupt_one(tmp_path):
  path = tmp_path / train.METRICS_FILE
  path.write_text('{"step": 4, "eval_miou": 0.5}\n{"step": 8, "eval_mi')
  assert train.read_metrics(tmp_path) == [{"step": 4, "eval_miou": 0.5}]
  path.write_text('{"step": 4, "eval_miou": 0.5}\n{"step": 8, "eval_mi\n{"step": 12, "eval_miou": 0.6}\n')
  with pytest.raises(ValueError, match=f"{path}.* line 2"):
    train.read_metrics(tmp_path)


def test_config_json_is_replaced_atomically(tmp_path, monkeypatch):
  config = synthetic.get_config()
  checkpoint.write_config(tmp_path, config)
  before = (tmp_path / checkpoint.CONFIG_FILE).read_text()
  config.train.learning_rate = 0.5

  def crash(*args, **kwargs):
    raise OSError(errno.ENOSPC, "No space left on device")

  monkeypatch.setattr(os, "replace", crash)
  with pytest.raises(OSError):
    checkpoint.write_config(tmp_path, config)
  assert (tmp_path / checkpoint.CONFIG_FILE).read_text() == before


def test_disk_full_during_a_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top

  template = test_checkpoint._tiny_state()  # pylint: disable=protected-access
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
  ckpt.save(test_checkpoint._stepped(template, 1))  # pylint: disable=protected-access
  finalize = atomicity.AtomicRenameTemporaryPath.finalize

  async def disk_full(self):
    raise OSError(errno.ENOSPC, "No space left on device", str(self.get()))

  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", disk_full)
  with pytest.raises(OSError, match="No space left"):
    ckpt.save(test_checkpoint._stepped(template, 2))  # pylint: disable=protected-access
  monkeypatch.setattr(atomicity.AtomicRenameTemporaryPath, "finalize", finalize)
  assert checkpoint.available_steps(tmp_path) == [1]
  assert checkpoint.restore(tmp_path, "latest", template).step == 1
  ckpt.close()
  # The next run removes the leftover as it opens the workdir, resumes from step 1 and saves on.
  ckpt = checkpoint.Checkpointer(tmp_path, keep=3)
  assert not list(tmp_path.rglob(TMP_GLOB))
  assert ckpt.latest_step() == 1
  ckpt.save(test_checkpoint._stepped(template, 2))  # pylint: disable=protected-access
  ckpt.close()
  assert not list(tmp_path.rglob(TMP_GLOB))
  assert checkpoint.available_steps(tmp_path) == [1, 2]


# --- bad configurations and bad data ----------------------------------------------------------------------

def _tiny_config() -> ml_collections.ConfigDict:
  config = synthetic.get_config()
  config.data.image_size = 32
  config.data.num_synthetic_train = 16
  config.data.num_synthetic_eval = 8
  config.train.batch_size = 8
  return config


BAD_CONFIGS = [
    # (overrides, fragments the message must contain)
    ({"data.image_size": 48}, ["config.data.image_size=48", "multiple of 32"]),
    ({"data.train_split": "test"}, ["config.data.train_split='test'", "share 8 example(s)"]),
    ({"model.encoder_weights": "imagenet", "model.alpha": 0.6}, ["alpha=0.6", "(0.35, 0.5, 0.75, 1.0"]),
    ({"model.alpha": 1.0}, ["alpha=0.35", "config.model.alpha=1.0"]),  # The bundled alpha-0.35 weights.
    ({"model.encoder_weights": "/nonexistent/weights.h5"}, ["/nonexistent/weights.h5", "does not exist"]),
    ({"model.num_classes": 4}, ["config.model.num_classes=4", "the data has 3 classes"]),
    ({"model.dtype": "float16"}, ["config.model.dtype='float16'"]),
    ({"model.init_from": "/nonexistent/run"}, ["/nonexistent/run does not exist"]),
    ({"train.batch_size": 0}, ["config.train.batch_size=0"]),
    ({"train.lr_schedule": "cosin"}, ["config.train.lr_schedule='cosin'", "cosine"]),
    ({"train.loss": "dice"}, ["config.train.loss='dice'", "cross_entropy+dice"]),
    ({"train.class_weights": (1.0, 2.0)}, ["config.train.class_weights", "must be 3 finite non-negative"]),
    ({"train.frozen_params": ("encoder/[",)}, ["config.train.frozen_params", "encoder/["]),
    ({"train.checkpoint_every_steps": 0}, ["config.train.checkpoint_every_steps=0"]),
    ({"train.log_every_steps": 0}, ["config.train.log_every_steps=0"]),
    ({"train.eval_every_epochs": 0}, ["config.train.eval_every_epochs=0"]),
    ({"train.keep_checkpoints": 0}, ["config.train.keep_checkpoints=0"]),
]


def test_bad_config_values_fail_before_the_workdir_is_touched(tmp_path):
  """Each bad value: an error of a type scripts/train.py reports without a traceback, naming the field, and
  no workdir created (nothing to clean up, nothing a later run could mistake for its own)."""
  for i, (overrides, fragments) in enumerate(BAD_CONFIGS):
    config = _tiny_config()
    for key, value in overrides.items():
      section, name = key.split(".")
      config[section][name] = value
    workdir = tmp_path / f"w{i}"
    with pytest.raises(Exception) as raised:
      train.train_and_evaluate(config, workdir)
    error = raised.value
    assert isinstance(error, (config_checks.ConfigError, input_pipeline.DataError, weights.WeightsError,
                              checkpoint.CheckpointError)), (overrides, repr(error))
    for fragment in fragments:
      assert fragment in str(error), (overrides, fragment, str(error))
    assert not workdir.exists(), overrides


def _parse_config_flags(*overrides: str) -> ml_collections.ConfigDict:
  """scripts/train.py's --config flag (lock_config=True), parsed in isolation."""
  argv = ["train.py", f"--config={rel.REPO_ROOT / 'configs' / 'synthetic.py'}", *overrides]
  flag_values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=flag_values, lock_config=True, sys_argv=argv)
  flag_values(argv)
  return flag_values.config


def test_config_overrides_of_the_wrong_type_or_unknown_key_are_refused():
  assert _parse_config_flags("--config.train.batch_size=4").train.batch_size == 4
  for override in ("--config.train.batch_size=abc", "--config.train.batch_size=8.5",
                   "--config.train.learning_rate=fast", "--config.data.random_flip=maybe",
                   "--config.model.alpha=[1"):
    with pytest.raises(flags.IllegalFlagValueError, match=override.partition("=")[0].lstrip("-")):
      _parse_config_flags(override)
  with pytest.raises(AttributeError, match='Did you mean "batch_size"'):
    _parse_config_flags("--config.train.batchsize=8")


def _small_folder(root: Path) -> Path:
  """4 train and 2 test pairs of the bundled sample, in the official layout."""
  sample = Path(input_pipeline.BUNDLED_SAMPLE_DIR)
  (root / "images").mkdir(parents=True)
  (root / "annotations" / "trimaps").mkdir(parents=True)
  for split_file, count in (("trainval.txt", 4), ("test.txt", 2)):
    lines = (sample / "annotations" / split_file).read_text().splitlines()[:count]
    for line in lines:
      name = line.split()[0]
      shutil.copy(sample / "images" / f"{name}.jpg", root / "images")
      shutil.copy(sample / "annotations" / "trimaps" / f"{name}.png", root / "annotations" / "trimaps")
    (root / "annotations" / split_file).write_text("\n".join(lines) + "\n")
  return root


def test_cli_reports_bad_data_and_bad_config_without_a_traceback(tmp_path, children):
  """Five runs at once, each failing on one problem: exit code 1 and one ``error:`` line naming it."""
  # A workdir holding a run of another configuration (the default synthetic one, at step 3).
  other_run = tmp_path / "w_other"
  other_run.mkdir()
  checkpoint.write_config(other_run, synthetic.get_config())
  ckpt = checkpoint.Checkpointer(other_run, keep=1)
  ckpt.save(test_checkpoint._stepped(test_checkpoint._tiny_state(), 3))  # pylint: disable=protected-access
  ckpt.close()
  saved_config = (other_run / checkpoint.CONFIG_FILE).read_text()
  folder = _small_folder(tmp_path / "pets")
  victim = sorted((folder / "images").iterdir())[1]
  victim.write_bytes(victim.read_bytes()[:victim.stat().st_size // 2])  # A truncated JPEG.
  env = rel.cli_env(tmp_path)
  two_devices = dict(env, XLA_FLAGS=env["XLA_FLAGS"] + " --xla_force_host_platform_device_count=2")
  runs = {
      "truncated": rel.start(rel.train_command(
          tmp_path / "w_data", "--config.data.image_size=32", "--config.data.data_dir=" + str(folder),
          config="configs/quickstart.py"), env, children),
      "devices": rel.start(rel.train_command(tmp_path / "w_devices", "--config.train.batch_size=7"),
                           two_devices, children),
      "alpha": rel.start(rel.train_command(tmp_path / "w_alpha", "--config.model.alpha=1.0"), env, children),
      "typo": rel.start(rel.train_command(tmp_path / "w_typo", "--config.train.batchsize=8"), env, children),
      "resume": rel.start(rel.train_command(other_run, "--config.data.image_size=32",
                                            "--config.model.decoder_filters=(16,16,16,16)"), env, children),
  }
  results = {name: rel.finish(proc) for name, proc in runs.items()}
  assert_clean_error(results["truncated"], victim.name, "truncated", "skip_bad_examples")
  assert_clean_error(results["devices"], "config.train.batch_size=7", "divisible", "number of devices (2)")
  assert not (tmp_path / "w_devices").exists()
  assert_clean_error(results["alpha"], "alpha=0.35", "config.model.alpha=1.0")
  typo = results["typo"]
  assert typo.returncode == 1 and "Traceback" not in typo.stderr, typo.stderr[-4000:]
  assert "batchsize" in typo.stderr and 'Did you mean "batch_size"' in typo.stderr
  assert not (tmp_path / "w_typo").exists()
  assert_clean_error(results["resume"], f"Cannot resume in {other_run}", "data.image_size: saved 64, now 32",
                     "model.decoder_filters: saved [64, 32, 32, 16], now [16, 16, 16, 16]")
  assert (other_run / checkpoint.CONFIG_FILE).read_text() == saved_config
  assert checkpoint.available_steps(other_run) == [3]
