"""Synthetic data: a small, fast, offline configuration for smoke runs, tests and benchmarks.

64x64 synthetic shapes, MobileNetV2 alpha 0.35 with random weights (no download, no weight file), the
tutorial's frozen encoder and optimizer otherwise.
"""

import ml_collections

from configs import default


def get_config() -> ml_collections.ConfigDict:
  """Returns the synthetic-data configuration."""
  config = default.get_config()
  config.data.source = "synthetic"
  config.data.data_dir = ""
  config.data.image_size = 64
  config.data.input_range = "[-1,1]"
  config.data.num_synthetic_train = 256
  config.data.num_synthetic_eval = 64

  config.model.alpha = 0.35
  config.model.encoder_weights = ""  # Random init: nothing to load.
  config.model.freeze_encoder = True
  config.model.decoder_filters = (64, 32, 32, 16)

  config.train.batch_size = 32
  config.train.num_epochs = 4
  config.train.num_train_steps = -1
  config.train.learning_rate = 1e-3
  config.train.log_every_steps = 4
  config.train.checkpoint_every_steps = 16
  config.train.num_figure_examples = 2
  config.seed = 0
  return config
