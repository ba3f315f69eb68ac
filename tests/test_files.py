"""Atomic writes (petseg_jax.files) and the writers that use them."""

import json
import os
from pathlib import Path
import re
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from petseg_jax import ablation
from petseg_jax import checkpoint
from petseg_jax import files
from petseg_jax import metrics_log
from petseg_jax import weights

REPO_ROOT = Path(__file__).resolve().parents[1]


def test_write_atomically_replaces_the_file_and_leaves_nothing_else(tmp_path):
  path = tmp_path / "out.json"
  files.write_atomically(path, "first\n")
  files.write_atomically(path, b"second\n")
  assert path.read_bytes() == b"second\n"
  assert os.listdir(tmp_path) == ["out.json"]
  plain = tmp_path / "plain"
  plain.write_text("")
  # The usual permissions (umask), not a temporary file's 0600.
  assert path.stat().st_mode == plain.stat().st_mode


def test_failed_write_keeps_the_old_file(tmp_path):
  path = tmp_path / "out.npz"
  path.write_bytes(b"old")
  with pytest.raises(RuntimeError, match="disk full"):
    with files.atomic_output(path) as f:
      f.write(b"half of the new")
      raise RuntimeError("disk full")
  assert path.read_bytes() == b"old"
  assert os.listdir(tmp_path) == ["out.npz"]


def _write_config(workdir, value):
  checkpoint.write_config(workdir, ml_collections.ConfigDict({"seed": value}))
  return workdir / checkpoint.CONFIG_FILE


def _write_status(workdir, value):
  ablation._write_json(workdir / ablation.STATUS_FILE, {"status": value})  # pylint: disable=protected-access
  return workdir / ablation.STATUS_FILE


def _write_encoder(workdir, value):
  weights.save_encoder_variables(workdir / "encoder.npz", {"params": {"w": np.full(3, value)}}, 0.35)
  return workdir / "encoder.npz"


def _truncate_metrics(workdir, value):
  path = workdir / metrics_log.METRICS_FILE
  if not path.exists():
    path.write_text("".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3)))
  metrics_log.truncate_metrics(workdir, value)
  return path


@pytest.mark.parametrize("write", [_write_config, _write_status, _write_encoder, _truncate_metrics])
def test_writers_are_atomic(tmp_path, monkeypatch, write):
  """A write that fails (here: the disk refuses the sync) leaves the file as it was, and no temporary."""
  path = write(tmp_path, 2)
  before = path.read_bytes()

  def fail(fd):
    raise OSError("no space left on device")

  monkeypatch.setattr(os, "fsync", fail)
  with pytest.raises(OSError, match="no space left"):
    write(tmp_path, 1)
  assert path.read_bytes() == before
  assert os.listdir(tmp_path) == [path.name]


def test_the_sweep_driver_modules_import_neither_jax_nor_tensorflow():
  code = ("import sys; import petseg_jax.files, petseg_jax.ablation; "
          "print(sorted({m.split('.')[0] for m in sys.modules} & {'jax', 'tensorflow', 'flax', 'orbax'}))")
  result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                          env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
  assert result.stdout.strip() == "[]"


def test_file_name_part_keeps_plain_names_and_tells_slices_apart():
  assert files.file_name_part("test") == "test" and files.file_name_part("train_2.x-y") == "train_2.x-y"
  slices = [files.file_name_part(split) for split in ("train[:80%]", "train[80%:]", "train[:50%]+test")]
  assert slices[0] == "train-80-_77688a" and slices[1].startswith("train-80-_") and len(set(slices)) == 3
  assert all(re.fullmatch(r"[A-Za-z0-9_.-]+", name) for name in slices)
