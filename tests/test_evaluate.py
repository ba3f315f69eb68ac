"""scripts/evaluate.py: the training loop's validation numbers, other data folders, outputs, CLI errors."""

from __future__ import annotations

import json
import re
import shutil

import numpy as np
import pytest

from petseg_jax import checkpoint
from petseg_jax import inference
from petseg_jax import input_pipeline
from petseg_jax import train
from tests import trained_run


@pytest.fixture(scope="session")
def workdir(tmp_path_factory):
  return trained_run.trained_workdir(tmp_path_factory)


@pytest.fixture(scope="module")
def cli(workdir):
  """The CLI runs of this file, started together (each one pays the TensorFlow/JAX start-up)."""
  latest, folder, bad_step = trained_run.run_scripts(
      ("evaluate.py", "--workdir", workdir),
      ("evaluate.py", "--workdir", workdir, "--config.data.source=folder",
       f"--config.data.data_dir={input_pipeline.BUNDLED_SAMPLE_DIR}", "--split", "test"),
      ("evaluate.py", f"--workdir={workdir}", "--checkpoint", "3"))
  return {"latest": latest, "folder": folder, "bad_step": bad_step}


def _last_json(stdout: str) -> dict:
  return json.loads(stdout.strip().splitlines()[-1])


def _assert_clean_error(proc, *fragments: str) -> None:
  assert proc.returncode != 0, proc.stdout
  assert "Traceback" not in proc.stderr, proc.stderr
  for fragment in fragments:
    assert fragment in proc.stderr, proc.stderr


def _assert_matches_record(summary: dict, record: dict) -> None:
  assert summary["checkpoint_step"] == record["step"]
  assert summary["num_images"] == trained_run.NUM_EVAL
  for key in ("pixel_accuracy", "miou", "dice"):
    assert summary[key] == pytest.approx(record[f"eval_{key}"], abs=1e-6), key
  assert set(summary["iou"]) == set(input_pipeline.CLASS_NAMES)
  for name, value in summary["iou"].items():
    assert value == pytest.approx(record[f"eval_iou_{name}"], abs=1e-6), name


def test_latest_equals_training_validation_and_writes_confusion(workdir, cli):
  proc = cli["latest"]
  assert proc.returncode == 0, proc.stderr
  records = train.read_metrics(workdir)
  summary = _last_json(proc.stdout)
  assert set(summary) == {"pixel_accuracy", "miou", "iou", "dice", "num_images", "checkpoint_step"}
  _assert_matches_record(summary, records[-1])
  # The readable table: class names, mIoU, accuracy, number of images.
  for text in ("pet", "background", "border", "mean", "pixel accuracy", f"{trained_run.NUM_EVAL} images"):
    assert text in proc.stdout

  stem = workdir / "eval" / f"test_{summary['checkpoint_step']}_confusion"
  assert stem.with_suffix(".png").stat().st_size > 0
  saved = json.loads(stem.with_suffix(".json").read_text())
  confusion = np.array(saved["confusion"])
  size = trained_run.tiny_config().data.image_size
  assert confusion.shape == (3, 3) and confusion.sum() == trained_run.NUM_EVAL * size * size
  assert np.trace(confusion) / confusion.sum() == pytest.approx(summary["pixel_accuracy"])


def test_step_selects_checkpoint(workdir):
  """An earlier step, through the library the script calls ("best" is exercised by test_predict.py)."""
  first = trained_run.STEPS[0]
  record = next(r for r in train.read_metrics(workdir) if r["step"] == first)
  config = inference.load_config(workdir)
  model, variables, step = inference.restore_model(config, workdir, first)
  result, confusion, num_images = inference.evaluate_checkpoint(config, model, variables, "test")
  assert step == first and confusion.sum() == result["num_pixels"]
  _assert_matches_record(inference.summary_record(result, num_images, step), record)
  assert result["loss"] == pytest.approx(record["eval_loss"], rel=1e-5)


def test_other_folder_in_oxford_layout(workdir, cli):
  """Any folder in the official layout: here the sample bundled with the package (24 test images)."""
  proc = cli["folder"]
  assert proc.returncode == 0, proc.stderr
  summary = _last_json(proc.stdout)
  assert summary["num_images"] == 24
  assert 0.0 <= summary["miou"] <= 1.0
  # Written beside, not over, the evaluation of the run's own data.
  assert (workdir / "eval" / f"pets_sample_test_{summary['checkpoint_step']}_confusion.json").exists()


def test_errors_are_clear(workdir, cli, tmp_path):
  _assert_clean_error(cli["bad_step"], "error: No checkpoint for step 3", "available steps: [2, 4]")
  # The other failures take the same path through the script (WorkdirError → "error: ...", exit 1).
  with pytest.raises(inference.WorkdirError, match="does not exist"):
    inference.load_config(tmp_path / "missing")
  with pytest.raises(inference.WorkdirError, match="config.json not found"):
    inference.load_config(tmp_path)
  # A checkpoint's step directory (what one sees in the run's tree): the flags that select it.
  step = trained_run.STEPS[-1]
  with pytest.raises(inference.WorkdirError,
                     match=rf"step {step}.*--workdir {re.escape(str(workdir))} --checkpoint {step}$"):
    inference.load_config(workdir / checkpoint.LATEST_DIR / str(step))
  no_checkpoints = tmp_path / "no_checkpoints"
  no_checkpoints.mkdir()
  shutil.copy(workdir / checkpoint.CONFIG_FILE, no_checkpoints)
  config = inference.load_config(no_checkpoints)
  with pytest.raises(inference.WorkdirError, match="No checkpoint in"):
    inference.restore_model(config, no_checkpoints, "latest")
  config.model.decoder_filters = (8, 8, 8, 8)
  with pytest.raises(inference.WorkdirError, match="does not fit the model"):
    inference.restore_model(config, workdir, "latest")
