"""Quickstart: train on real pet photos in a few minutes on a laptop CPU, offline.

The tutorial's model and recipe, made small: the pretrained ImageNet MobileNetV2 alpha-0.35 encoder shipped
with the package (frozen), 128x128 images, the Oxford-IIIT Pet sample in ../shared/data when it sits beside
the repository, else the small sample bundled with the package. The default of scripts/train.py.
"""

from pathlib import Path

import ml_collections

from configs import default
from petseg_jax import weights

# The fuller real sample, when this checkout sits beside the project's shared/ folder.
SHARED_SAMPLE_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "oxford_iiit_pet_sample"


def sample_dir() -> str:
  """The shared sample if present, else the one bundled with the package."""
  if SHARED_SAMPLE_DIR.is_dir():
    return str(SHARED_SAMPLE_DIR)
  from petseg_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  return input_pipeline.BUNDLED_SAMPLE_DIR


def get_config() -> ml_collections.ConfigDict:
  """Returns the quickstart configuration."""
  config = default.get_config()
  config.data.source = "folder"
  config.data.data_dir = sample_dir()
  config.data.image_size = 128
  config.data.input_range = "[-1,1]"

  config.model.alpha = 0.35
  config.model.encoder_weights = weights.BUNDLED_ENCODER_WEIGHTS
  config.model.freeze_encoder = True

  config.train.batch_size = 16
  config.train.num_epochs = 20
  config.train.num_train_steps = -1
  config.train.learning_rate = 1e-3
  config.train.log_every_steps = 5
  config.train.checkpoint_every_steps = 100
  config.seed = 0
  return config
