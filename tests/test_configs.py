"""The config files: every one defines the public keys; configs/best.py keeps the tutorial's model and data
and stays within 3x its training compute."""

from __future__ import annotations

import importlib
from pathlib import Path

import numpy as np
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


@pytest.mark.parametrize("name", sorted(p.stem for p in CONFIG_DIR.glob("*.py") if p.stem != "__init__"))
def test_configs_with_pretrained_weights_scale_images_as_the_encoder_was_trained(name):
  """Keras' MobileNetV2 ImageNet weights were trained on images in [-1, 1] (its preprocess_input); "[0,1]",
  what the tutorial did, stays a config choice, not a shipped default."""
  config = _config(name)
  if config.model.encoder_weights or config.model.init_from:
    assert config.data.input_range == "[-1,1]", f"configs/{name}.py"


def test_the_default_scaling_maps_black_and_white_to_minus_one_and_one():
  from petseg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  data = _config("default").data
  white_black = np.stack([np.full((4, 4, 3), 255, np.uint8), np.zeros((4, 4, 3), np.uint8)])
  images = input_pipeline.preprocess_images(list(white_black), data)
  np.testing.assert_array_equal(images[0], 1.0)
  np.testing.assert_array_equal(images[1], -1.0)


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


def test_a_tuple_field_given_twice_is_named_and_a_scalar_field_given_twice_is_not(tmp_path):
  """ml_collections joins a repeated tuple override's values (absl's flags take the last value): the scripts
  refuse it (cli_flags.parse_flags), wherever the repetitions come from, a --flagfile included."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top
  from petseg_jax import cli_flags  # pylint: disable=g-import-not-at-top
  flagfile = tmp_path / "more.flags"
  flagfile.write_text("--config.train.frozen_params=('encoder/bn_Conv1',)\n--config.train.learning_rate=0.2\n")
  for argv, repeated in (
      (["--config.train.frozen_params=('encoder/Conv1',)", "--config.train.frozen_params=('encoder/bn_Conv1',)"],
       True),
      (["-config.train.frozen_params=('encoder/Conv1',)", f"--flagfile={flagfile}"], True),
      (["--config.train.frozen_params=('encoder/Conv1','encoder/bn_Conv1')"], False),  # One, with two values.
      (["--config.train.learning_rate=0.1", f"--flagfile={flagfile}"], False)):  # A scalar: the last one.
    flag_values = flags.FlagValues()
    # Only the fields the arguments override become flags.
    config_flags.DEFINE_config_dict("config", _config("quickstart"), flag_values=flag_values,
                                    sys_argv=["prog", *argv])
    flag_values(["prog", *argv])
    messages = cli_flags.repeated_tuple_overrides(["prog", *argv], flag_values)
    if repeated:
      assert messages == ["--config.train.frozen_params is given 2 times, and a tuple field's values are joined, "
                          "not replaced: ('encoder/Conv1', 'encoder/bn_Conv1'). Give it once, with every value."]
    else:
      assert messages == [], argv
