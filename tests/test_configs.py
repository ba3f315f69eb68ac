"""The config files: every one defines the public keys; configs/best.py keeps the tutorial's model and data
and stays within 3x its training compute."""

from __future__ import annotations

import importlib
from pathlib import Path

import pytest

CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
PUBLIC_KEYS = ("data.source", "data.data_dir", "data.image_size", "data.input_range", "model.alpha",
               "model.encoder_weights", "model.freeze_encoder", "train.batch_size", "train.num_epochs",
               "train.num_train_steps", "train.learning_rate", "seed")
# Training images of the full data set's train split (tfds oxford_iiit_pet) and of the shared sample's.
TRAIN_IMAGES = {"tfds": 3680, "sample trainval": 356}
# Multiply-accumulates per training image at 128x128, alpha 1.0 (docs/ablations.md): the encoder frozen,
# and fine-tuned (its backward pass added).
MACS_FROZEN, MACS_FINETUNED = 6.03e9, 6.24e9


def _config(name: str):
  return importlib.import_module(f"configs.{name}").get_config()


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__"))
def test_every_config_defines_the_public_keys(name):
  config = _config(name)
  for key in PUBLIC_KEYS:
    node = config
    for part in key.split("."):
      assert part in node, f"configs/{name}.py lacks {key}"
      node = node[part]


def _training_macs(config, num_images: int) -> float:
  """Multiply-accumulates of a whole run (batches drop the remainder, as the input pipeline does)."""
  steps_per_epoch = num_images // config.train.batch_size
  steps = (config.train.num_train_steps if config.train.num_train_steps > 0
           else steps_per_epoch * config.train.num_epochs)
  if config.model.freeze_encoder and config.train.unfreeze_after_epochs >= 0:
    frozen_steps = min(steps, steps_per_epoch * config.train.unfreeze_after_epochs)
  else:
    frozen_steps = steps if config.model.freeze_encoder else 0
  batch = config.train.batch_size
  return batch * (frozen_steps * MACS_FROZEN + (steps - frozen_steps) * MACS_FINETUNED)


def test_best_keeps_the_tutorial_model_and_data_within_3x_its_compute():
  tutorial, best = _config("default"), _config("best")
  for key in ("data.source", "data.tfds_name", "data.image_size", "data.train_split", "data.eval_split",
              "model.alpha", "model.encoder_weights", "model.decoder_filters", "model.num_classes"):
    section, name = key.split(".")
    assert best[section][name] == tutorial[section][name], key
  for where, num_images in TRAIN_IMAGES.items():
    ratio = _training_macs(best, num_images) / _training_macs(tutorial, num_images)
    assert ratio <= 3.0, (where, ratio)


@pytest.mark.parametrize("body, spec_suffix, message", [
    ("def get_config():\n  return len(3)\n", "", r"get_config\(\) raised TypeError: object of type 'int'"),
    ("def get_config():\n  return {}['x']\n", "", r"get_config\(\) raised KeyError"),
    ("def get_config():\n  return {}\n", ":small", r"get_config\('small'\) raised TypeError.*take an argument"),
])
def test_a_config_function_that_raises_is_one_config_error(tmp_path, body, spec_suffix, message):
  """Whatever get_config() raises (a TypeError too) becomes the caller's one error type: the scripts print
  it as one line, and the ablation runner reports it as a SweepError."""
  from petseg_jax import ablation, config_files  # pylint: disable=g-import-not-at-top
  path = tmp_path / "broken_config.py"
  path.write_text(body)
  with pytest.raises(config_files.ConfigFileError, match=message):
    config_files.load_config(f"{path}{spec_suffix}")
  with pytest.raises(ablation.SweepError, match=message):
    ablation.load_config(f"{path}{spec_suffix}")
