"""Checks of a training config, run before anything is written: a typo costs seconds and leaves no workdir.

``validate_config`` names the first value that cannot work and what would; the checks that need the model's
variables (``freezing.check_freezing``) or the workdir (``checkpoint.check_resume_config``) run later.
"""

from __future__ import annotations

import ml_collections

from petseg_jax import config_files
from petseg_jax import losses
from petseg_jax import metrics as metrics_lib
from petseg_jax import models
from petseg_jax import optim
from petseg_jax.data import settings as data_settings

LR_SCHEDULES = ("constant", "cosine")  # config.train.lr_schedule.


class ConfigError(ValueError):
  """A configuration value that cannot work; the message names the field and the accepted values."""


def validate_config(config: ml_collections.ConfigDict, num_devices: int) -> None:
  """Raises ConfigError (or DataError for config.data) naming the first unusable value.

  Run before anything is written, so that a typo costs seconds and leaves no workdir behind.
  """
  data_settings.check_data_config(config.data)
  model, tc = config.model, config.train
  if model.num_classes != len(metrics_lib.CLASS_NAMES):
    raise ConfigError(f"config.model.num_classes={model.num_classes!r}: the data has "
                      f"{len(metrics_lib.CLASS_NAMES)} classes {metrics_lib.CLASS_NAMES}.")
  try:
    models.check_model_config(model)  # dtype, alpha, decoder_filters, dropout...
  except ValueError as e:
    raise ConfigError(str(e)) from None
  # Values of the wrong type (None from a config file, True for a count) or not finite fail here, not deep in
  # a library; a NaN rate would otherwise surface as "the loss is nan", blaming the learning rate.
  for key in ("batch_size", "checkpoint_every_steps", "log_every_steps", "eval_every_epochs",
              "keep_checkpoints"):
    if config_files.value_problem(f"train.{key}", tc[key], "int", 1):
      raise ConfigError(f"config.train.{key}={tc[key]!r} must be a positive integer.")
  # JAX keeps a seed's low 32 bits (without jax_enable_x64): seeds 2**32 apart would be one run.
  problem = (config_files.value_problem("seed", config.seed, "int", 0, 2**32, below=True)
             or config_files.value_problem("model.decoder_bn_momentum", model.decoder_bn_momentum, "number", 0,
                                           1, below=True)  # 1 would never learn the decoder's statistics.
             or config_files.value_problem("train.learning_rate", tc.learning_rate, "number", 0, above=True)
             or config_files.value_problem("train.encoder_lr_multiplier", tc.encoder_lr_multiplier, "number", 0)
             or config_files.value_problem("train.weight_decay", tc.weight_decay, "number", 0)
             or config_files.value_problem("train.warmup_steps", tc.warmup_steps, "int", 0)
             or config_files.value_problem("train.num_epochs", tc.num_epochs, "int")
             or config_files.value_problem("train.num_train_steps", tc.num_train_steps, "int")
             or config_files.value_problem("train.unfreeze_after_epochs", tc.unfreeze_after_epochs, "int")
             or config_files.value_problem("train.num_figure_examples", tc.num_figure_examples, "int", 0))
  if problem:
    raise ConfigError(problem)
  if tc.batch_size % num_devices:
    raise ConfigError(f"config.train.batch_size={tc.batch_size} must be divisible by the number of devices "
                      f"({num_devices}): the global batch is split evenly over them.")
  if tc.num_train_steps <= 0 and tc.num_epochs <= 0:
    raise ConfigError(f"config.train.num_epochs={tc.num_epochs} and num_train_steps={tc.num_train_steps}: "
                      "one of them must be positive.")
  if tc.loss not in losses.LOSSES:
    raise ConfigError(f"config.train.loss={tc.loss!r} is not one of {losses.LOSSES}.")
  if tc.lr_schedule not in LR_SCHEDULES:
    raise ConfigError(f"config.train.lr_schedule={tc.lr_schedule!r} is not one of {LR_SCHEDULES}.")
  if not isinstance(tc.frozen_params, (list, tuple)) or not all(isinstance(p, str) for p in tc.frozen_params):
    raise ConfigError(f"config.train.frozen_params={tc.frozen_params!r} must be a tuple of regexes over "
                      "parameter paths, e.g. ('encoder/.*',), or () for none.")
  try:
    # The loss checks them too, but only when the first step is traced: after the workdir is made.
    losses.class_weight_array(tc.class_weights, model.num_classes)
  except ValueError as e:
    raise ConfigError(f"config.train.{e}") from e
  try:
    optim.compile_patterns(tc.frozen_params)
  except ValueError as e:
    raise ConfigError(str(e)) from e
  if model.freeze_encoder and not tc.frozen_params:  # Else the "frozen" encoder silently trains in full.
    raise ConfigError("config.model.freeze_encoder=True but config.train.frozen_params=() freezes nothing; "
                      "set frozen_params (e.g. ('encoder/.*',)), or model.freeze_encoder=False to train all.")
