"""scripts/evaluate.py: the training loop's validation numbers, other data folders, outputs, CLI errors."""

from __future__ import annotations

import json
from pathlib import Path
import re
import shutil

import jax
import numpy as np
import pytest

from petseg_jax import checkpoint
from petseg_jax import inference
from petseg_jax import input_pipeline
from petseg_jax import train
from tests import trained_run


@pytest.fixture(scope="session")
def workdir(workers_temp_dir):
  return trained_run.trained_workdir(workers_temp_dir)


@pytest.fixture(scope="module")
def cli(workdir, tmp_path_factory):
  """The CLI runs of this file, started together (each one pays the TensorFlow/JAX start-up)."""
  # A copy of the run whose eval/ is a file: nothing can be written there, whoever runs the tests (root
  # ignores permissions).
  unwritable = tmp_path_factory.mktemp("unwritable") / "run"
  shutil.copytree(workdir, unwritable, ignore=shutil.ignore_patterns(inference.EVAL_DIR))
  (unwritable / inference.EVAL_DIR).write_text("not a directory")
  latest, folder, bad_step, image_size, unwritable_run, typo = trained_run.run_scripts(
      ("evaluate.py", "--workdir", workdir),
      ("evaluate.py", "--workdir", workdir, "--config.data.source=folder",
       f"--config.data.data_dir={input_pipeline.BUNDLED_SAMPLE_DIR}", "--split", "test"),
      ("evaluate.py", f"--workdir={workdir}", "--checkpoint", "3"),
      ("evaluate.py", "--workdir", workdir, "--config.data.image_size=64"),
      ("evaluate.py", "--workdir", unwritable),
      ("evaluate.py", "--workdir", workdir, "--config.data.sorce=folder"))
  return {"latest": latest, "folder": folder, "bad_step": bad_step, "image_size": image_size,
          "unwritable": unwritable_run, "unwritable_workdir": unwritable, "typo": typo}


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


def test_an_unknown_override_of_the_runs_config_lists_the_sections_fields(cli):
  _assert_clean_error(cli["typo"], "unknown config field 'sorce' in --config.data.sorce",
                      'Did you mean "source"', "config.data has: cache, color_jitter, data_dir,")


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


def test_best_is_the_best_checkpoint_when_it_is_not_the_latest(workdir, tmp_path):
  """--checkpoint best (what evaluate.py and predict.py pass to restore_model): here the tiny run's best is
  rewritten to step 2, so that "best" and "latest" differ."""
  run = tmp_path / "run"
  shutil.copytree(workdir, run)
  config = inference.load_run_config(run)
  first, last = trained_run.STEPS
  template = train.abstract_train_state(config, train.create_model(config),
                                        train.create_learning_rate_fn(config.train, last), first)
  ckpt = checkpoint.Checkpointer(run, keep=config.train.keep_checkpoints)
  assert ckpt.discard_best_after(first) == last  # The run's own best was its last step.
  ckpt.save_best(checkpoint.restore(run, first, template), 0.99)
  ckpt.close()
  _, variables, step = inference.restore_model(config, run, "best")
  assert step == first == checkpoint.best_step(run) and checkpoint.available_steps(run)[-1] == last
  expected, _ = checkpoint.restore_variables(run, first)
  for got, want in zip(jax.tree.leaves(variables), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))
  _, latest_variables, _ = inference.restore_model(config, run, "latest")
  assert any(not np.array_equal(np.asarray(a), np.asarray(b))
             for a, b in zip(jax.tree.leaves(latest_variables), jax.tree.leaves(expected)))


def test_step_selects_checkpoint(workdir):
  """An earlier step, through the library the script calls."""
  first = trained_run.STEPS[0]
  record = next(r for r in train.read_metrics(workdir) if r["step"] == first)
  config = inference.load_run_config(workdir)
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
  # Written beside, not over, the evaluation of the run's own data; named by the folder (and a hash of its
  # path: another folder of the same name gets other files).
  (path,) = (workdir / "eval").glob(f"pets_sample-??????_test_{summary['checkpoint_step']}_confusion.json")
  saved = json.loads(path.read_text())
  assert saved["data_dir"] == str(input_pipeline.BUNDLED_SAMPLE_DIR)
  assert saved["data_overrides"] == {"data_dir": str(input_pipeline.BUNDLED_SAMPLE_DIR), "source": "folder"}


def test_other_data_settings_get_their_own_files(workdir, cli):
  """--config.data.image_size=64: files named by the override, beside (not over) the default ones, and the
  JSON records the settings used."""
  proc = cli["image_size"]
  assert proc.returncode == 0, proc.stderr
  step = _last_json(proc.stdout)["checkpoint_step"]
  stem = workdir / "eval" / f"test_image_size-64_{step}_confusion"
  assert stem.with_suffix(".png").stat().st_size > 0
  saved = json.loads(stem.with_suffix(".json").read_text())
  assert saved["data_overrides"] == {"image_size": 64}
  assert saved["data_config"]["image_size"] == 64 and saved["data_config"]["source"] == "synthetic"
  assert np.array(saved["confusion"]).sum() == trained_run.NUM_EVAL * 64 * 64
  assert cli["latest"].returncode == 0, cli["latest"].stderr  # Its files are the run's own size:
  default = json.loads((workdir / "eval" / f"test_{step}_confusion.json").read_text())
  assert default["data_overrides"] == {} and default["data_config"]["image_size"] == 32
  assert str(stem.with_suffix(".json")) in proc.stdout  # The paths are printed.


def test_data_tag_names_what_differs(tmp_path):
  saved = trained_run.tiny_config().data
  assert inference.data_tag(saved, saved, "test") == "test"  # The name the README and tests rely on.
  # tfds slices: readable, and distinct (their characters alone would give both the same name).
  slices = [inference.data_tag(saved, saved, split) for split in ("train[:80%]", "train[80%:]", "train[:10%]")]
  assert slices[0] == "train-80-_77688a" and len(set(slices)) == 3
  other = saved.copy_and_resolve_references()
  other.image_size, other.input_range = 160, "[0,1]"
  assert inference.data_tag(other, saved, "test") == "test_image_size-160_input_range-0-1"
  # Two folders of the same name: told apart by the hash of their paths; the same folder, by any path,
  # gets the same name.
  tags = []
  for parent in ("a", "b", "b/../b"):
    other = saved.copy_and_resolve_references()
    other.source, other.data_dir = "folder", str(tmp_path / parent / "pets")
    tags.append(inference.data_tag(other, saved, "val"))
  assert tags[0] != tags[1] and tags[1] == tags[2]
  assert all(tag.startswith("pets-") and tag.endswith("_val") for tag in tags)
  synthetic = saved.copy_and_resolve_references()
  folder_run = saved.copy_and_resolve_references()
  folder_run.source, folder_run.data_dir = "folder", str(tmp_path / "pets")
  synthetic.source, synthetic.data_dir = "synthetic", folder_run.data_dir  # The run's folder, never read.
  assert inference.data_tag(synthetic, folder_run, "test") == "synthetic_test"
  many = saved.copy_and_resolve_references()
  many.mask_resize, many.tfds_name, many.manual_dir = "bilinear" * 20, "oxford_iiit_pet:4.*.*", "/x" * 40
  assert len(inference.data_tag(many, saved, "test")) < 100  # Cut, with a hash to keep names distinct.


def test_data_tag_uses_the_callers_overrides(monkeypatch):
  """scripts/evaluate.py computes data_overrides once, for the file names and the JSON record."""
  saved = trained_run.tiny_config().data
  other = saved.copy_and_resolve_references()
  other.image_size = 160
  overrides = inference.data_overrides(other, saved)
  monkeypatch.setattr(inference, "data_overrides", lambda *args: pytest.fail("computed the overrides again"))
  assert inference.data_tag(other, saved, "test", overrides=overrides) == "test_image_size-160"


def test_another_dtype_or_formulation_gets_its_own_files():
  """--config.model.dtype=bfloat16 evaluates the same checkpoint with other numbers: not over float32's."""
  saved = trained_run.tiny_config()
  assert inference.model_overrides(saved.model, saved.model) == {}
  other = saved.copy_and_resolve_references()
  other.model.dtype, other.model.conv_impl, other.model.dropout = "bfloat16", "reference", 0.5
  numerics = inference.model_overrides(other.model, saved.model)
  assert numerics == {"model.dtype": "bfloat16", "model.conv_impl": "reference"}  # Not dropout: no effect.
  assert (inference.data_tag(other.data, saved.data, "test", overrides=numerics)
          == "test_model.dtype-bfloat16_model.conv_impl-reference")
  # The files keep the whole tag, dots and all (Path.with_suffix cut each of these to test_model.json).
  paths = [inference.confusion_paths("eval", inference.data_tag(other.data, saved.data, "test", overrides=o), 7)
           for o in ({}, {"model.dtype": "bfloat16"}, {"model.conv_impl": "reference"}, numerics)]
  assert len(set(paths)) == 4
  assert paths[1] == (Path("eval/test_model.dtype-bfloat16_7_confusion.json"),
                      Path("eval/test_model.dtype-bfloat16_7_confusion.png"))


def test_unwritable_workdir_prints_results_then_one_line_error(cli):
  """The table and the JSON line come first; the failed write is one line naming the path, exit code 1."""
  proc = cli["unwritable"]
  summary = _last_json(proc.stdout)
  assert summary == _last_json(cli["latest"].stdout)
  assert "pixel accuracy" in proc.stdout
  path = cli["unwritable_workdir"] / "eval" / f"test_{summary['checkpoint_step']}_confusion.json"
  _assert_clean_error(proc, f"error: Cannot write the confusion matrix to {path}")
  assert len([line for line in proc.stderr.splitlines() if line.startswith("error:")]) == 1
  assert "Confusion matrix:" not in proc.stdout and "Confusion matrix:" in cli["latest"].stdout  # Once written.


def test_errors_are_clear(workdir, cli, tmp_path):
  _assert_clean_error(cli["bad_step"], "error: No checkpoint for step 3", "available steps: [2, 4]")
  # The other failures take the same path through the script (WorkdirError → "error: ...", exit 1).
  with pytest.raises(inference.WorkdirError, match="does not exist"):
    inference.load_run_config(tmp_path / "missing")
  with pytest.raises(inference.WorkdirError, match="config.json not found"):
    inference.load_run_config(tmp_path)
  # A checkpoint's step directory (what one sees in the run's tree): the flags that select it.
  step = trained_run.STEPS[-1]
  with pytest.raises(inference.WorkdirError,
                     match=rf"step {step}.*--workdir {re.escape(str(workdir))} --checkpoint {step}$"):
    inference.load_run_config(workdir / checkpoint.LATEST_DIR / str(step))
  no_checkpoints = tmp_path / "no_checkpoints"
  no_checkpoints.mkdir()
  shutil.copy(workdir / checkpoint.CONFIG_FILE, no_checkpoints)
  config = inference.load_run_config(no_checkpoints)
  with pytest.raises(inference.WorkdirError, match="No checkpoint in"):
    inference.restore_model(config, no_checkpoints, "latest")
  # An image size the U-Net cannot take (--config.data.image_size=100 to evaluate.py or predict.py): named.
  config.data.image_size = 100
  with pytest.raises(inference.WorkdirError, match=r"config.data.image_size=100 must be a positive multiple of 32"):
    inference.restore_model(config, workdir, "latest")
  config.data.image_size = trained_run.tiny_config().data.image_size
  config.model.decoder_filters = (8, 8, 8, 8)
  with pytest.raises(inference.WorkdirError, match="does not fit the model"):
    inference.restore_model(config, workdir, "latest")
  # A config.json of another version (a field missing) or hand-edited into something else: named, not a
  # traceback from ml_collections.
  saved = json.loads((workdir / checkpoint.CONFIG_FILE).read_text())
  del saved["model"]["conv_impl"], saved["train"]["warmup_steps"]
  (no_checkpoints / checkpoint.CONFIG_FILE).write_text(json.dumps(saved))
  with pytest.raises(inference.WorkdirError, match=r"lacks the config field\(s\) model\.conv_impl, "
                                                   r"train\.warmup_steps \(written by another version"):
    inference.load_run_config(no_checkpoints)
  (no_checkpoints / checkpoint.CONFIG_FILE).write_text("[]")
  with pytest.raises(inference.WorkdirError, match="holds a JSON list, not the run's configuration"):
    inference.load_run_config(no_checkpoints)
  with pytest.raises(checkpoint.CheckpointError, match="holds a JSON list"):  # What a resume reads.
    checkpoint.config_changes(no_checkpoints, config)
