"""Shared pieces of the sweep files: where the data and the pretrained encoder weights come from.

Every sweep file's ``get_sweep(where="sample")`` takes where to run:

* ``"sample"`` (default, offline): the real Oxford-IIIT Pet sample in ``../shared/data`` (356 trainval /
  235 test pairs). Variants are compared on a validation split held out of trainval
  (``train[80%:]``, 71 pets; the folder builder stores examples in hashed order, so it is a random
  fifth), which keeps the test split untouched for the final check of ``configs/best.py``. Pretrained
  encoders come from files: alpha 0.35 = the bundled converted ImageNet weights, alpha 1.0 = the shared
  Keras file (ImageNet up to block 13, fine-tuned on dogs above; see ../shared/weights/README.md).
* ``"tfds"`` (online): the full data set from tfds, validation = the last 10% of its 3,680-image train
  split, ImageNet weights from ``keras.applications`` (downloaded).

Select it after a colon: ``--sweep sweeps/freeze.py:tfds``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
SAMPLE_DIR = SHARED_DIR / "data" / "oxford_iiit_pet_sample"
ALPHA_1_WEIGHTS = SHARED_DIR / "weights" / "mobilenet_v2_1.0_160_no_top_imagenet_dogs_finetuned.h5"
WHERE = ("sample", "tfds")


def check_where(where: str) -> str:
  if where not in WHERE:
    raise ValueError(f"get_sweep({where!r}): expected one of {WHERE} (e.g. --sweep sweeps/x.py:tfds).")
  return where


def data(where: str) -> dict[str, Any]:
  """Data-source overrides: train on part of trainval, validate on the held-out rest."""
  if check_where(where) == "sample":
    if not SAMPLE_DIR.is_dir():
      raise FileNotFoundError(f"The shared pet sample {SAMPLE_DIR} is missing; run with ':tfds' instead.")
    return {"data.source": "folder", "data.data_dir": str(SAMPLE_DIR),
            "data.train_split": "train[:80%]", "data.eval_split": "train[80%:]"}
  return {"data.source": "tfds", "data.data_dir": "",
          "data.train_split": "train[:90%]", "data.eval_split": "train[90%:]"}


def encoder_weights(alpha: float, where: str) -> str:
  """The pretrained encoder for ``alpha``: ImageNet online, the offline files for the sample."""
  if check_where(where) == "tfds":
    return "imagenet"
  from petseg_jax import weights  # pylint: disable=g-import-not-at-top
  if alpha == 0.35:
    return weights.BUNDLED_ENCODER_WEIGHTS
  if alpha == 1.0:
    if not ALPHA_1_WEIGHTS.is_file():
      raise FileNotFoundError(f"{ALPHA_1_WEIGHTS} is missing; run with ':tfds' instead.")
    return str(ALPHA_1_WEIGHTS)
  raise ValueError(f"No offline pretrained weights for alpha={alpha}; use 0.35 or 1.0, or ':tfds'.")


def encoder(alpha: float, where: str) -> dict[str, Any]:
  """Width and matching pretrained weights."""
  return {"model.alpha": alpha, "model.encoder_weights": encoder_weights(alpha, where)}


def schedule(where: str, sample_epochs: int = 8, tfds_epochs: int = 20) -> dict[str, Any]:
  """Training length and batch: short on the sample (CPU-sized), the tutorial's on the full data."""
  if check_where(where) == "sample":
    return {"train.num_epochs": sample_epochs, "train.batch_size": 16, "train.num_figure_examples": 0,
            "train.checkpoint_every_steps": 200}
  return {"train.num_epochs": tfds_epochs, "train.batch_size": 64}


def common(where: str, alpha: float = 0.35, **schedule_kwargs) -> dict[str, Any]:
  """The overrides every run of a sweep shares: data, encoder (alpha, pretrained, frozen), schedule.

  The baseline is the tutorial's recipe (frozen pretrained encoder, inputs in [-1, 1], nearest-neighbour
  masks, cross-entropy, random flips, Adam 1e-3 constant); each variant changes one thing.
  """
  return {**data(where), **encoder(alpha, where), **schedule(where, **schedule_kwargs),
          "model.freeze_encoder": True, "train.unfreeze_after_epochs": -1,
          "data.input_range": "[-1,1]", "data.mask_resize": "nearest", "data.random_flip": True,
          "data.random_resized_crop": False, "train.loss": "cross_entropy", "train.class_weights": (),
          "train.lr_schedule": "constant", "train.learning_rate": 1e-3}
