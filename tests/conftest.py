"""Shared pytest fixtures (data). Append new fixtures; keep this file small."""

import os
from pathlib import Path

import pytest

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
PETS_SAMPLE_DIR = SHARED_DIR / "data" / "oxford_iiit_pet_sample"


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory):
  """A session-private TFDS_DATA_DIR: prepared datasets never land in (or come from) ~/tensorflow_datasets."""
  path = tmp_path_factory.mktemp("tensorflow_datasets")
  old = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = str(path)
  yield path
  if old is None:
    os.environ.pop("TFDS_DATA_DIR", None)
  else:
    os.environ["TFDS_DATA_DIR"] = old


@pytest.fixture(scope="session")
def pets_sample_dir() -> Path:
  """The shared real Oxford-IIIT Pet sample (593 pairs, official layout, read-only); skips if absent."""
  if not PETS_SAMPLE_DIR.is_dir():
    pytest.skip(f"shared Oxford-IIIT Pet sample not found beside the repo ({PETS_SAMPLE_DIR})")
  return PETS_SAMPLE_DIR
