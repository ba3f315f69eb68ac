"""The data settings' allowed values and their check, without TensorFlow.

``config.data`` is checked before a run writes anything, and by tools that run where TensorFlow is not
installed (an accelerator host benchmarking on synthetic data); so this module imports no TensorFlow.
``petseg_jax.input_pipeline`` re-exports these names.
"""

from __future__ import annotations

import ml_collections

from petseg_jax import config_files
from petseg_jax.data.errors import DataError

SOURCES = ("tfds", "folder", "synthetic")
INPUT_RANGES = ("[-1,1]", "[0,1]")
MASK_RESIZES = ("nearest", "bilinear")
# The U-Net's encoder halves the resolution five times, and each decoder stage meets a skip of its size.
IMAGE_SIZE_MULTIPLE = 32


def check_data_config(data_config: ml_collections.ConfigDict) -> None:
  """Raises DataError naming the config field if ``config.data`` has an invalid value."""
  if data_config.source not in SOURCES:
    raise DataError(f"config.data.source={data_config.source!r} is not one of {SOURCES}.")
  size = data_config.image_size
  if not isinstance(size, int) or size <= 0 or size % IMAGE_SIZE_MULTIPLE:
    raise DataError(f"config.data.image_size={size!r} must be a positive multiple of {IMAGE_SIZE_MULTIPLE} "
                    f"(the U-Net downsamples by {IMAGE_SIZE_MULTIPLE}).")
  if data_config.input_range not in INPUT_RANGES:
    raise DataError(f"config.data.input_range={data_config.input_range!r} is not one of {INPUT_RANGES}.")
  if data_config.mask_resize not in MASK_RESIZES:
    raise DataError(f"config.data.mask_resize={data_config.mask_resize!r} is not one of {MASK_RESIZES}.")
  for key in ("train_split", "eval_split"):
    if not isinstance(data_config[key], str) or not data_config[key].strip():
      raise DataError(f"config.data.{key}={data_config[key]!r} must name a split, e.g. 'train' or 'train[:80%]'.")
  problem = config_files.value_problem("data.shuffle_buffer", data_config.shuffle_buffer, "int", 0)
  for key in ("random_flip", "random_resized_crop", "color_jitter", "cache", "skip_bad_examples"):
    problem = problem or config_files.value_problem(f"data.{key}", data_config[key], "bool")
  if problem:
    raise DataError(problem)
