"""``provenance.jsonl``: which code, libraries, devices and data size each attempt of a run trained with.

config.json says what a run trained; it cannot say with which code. A run resumed after a ``git pull`` or a
library upgrade trains its later steps with other code, and nothing in its metrics would show it. So each
attempt (a start, and every resume) appends one record: the step it starts from, the petseg_jax version, the
git commit of the checkout it runs from (``-dirty`` with uncommitted changes), a fingerprint of the package's
source (which tells two different uncommitted states apart, and works without git), the versions of the libraries
that compute the numbers, the devices, the command line and the number of training examples. A resume with
other code than the attempt before it is logged as a warning that names what changed; one with another number
of training examples is refused by ``train`` (``recorded_train_examples``).

Imports neither JAX nor TensorFlow at import time (the library versions come from the installed packages'
metadata; JAX is imported to describe the devices). ``scripts/benchmark.py`` describes its device with it too.
"""

from __future__ import annotations

import hashlib
from importlib import metadata
import json
import os
from pathlib import Path
import platform
import socket
import subprocess
import sys
import time
from typing import Any, Sequence

import petseg_jax
from petseg_jax import files
from petseg_jax import metrics_log

PROVENANCE_FILE = "provenance.jsonl"
# The libraries whose versions change the numbers a run computes (and reads and writes).
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy", "tensorflow", "tensorflow-cpu")
# A record's fields that say which code computed the steps (the host and devices may change freely).
CODE_FIELDS = ("petseg_jax", "git_commit", "code_fingerprint", "packages")
GIT_TIMEOUT_SEC = 10  # Each git call; a hung file system must not hold a starting run for long.
_PACKAGE_DIR = Path(petseg_jax.__file__).resolve().parent


def git_commit(package_dir: Path = _PACKAGE_DIR) -> str | None:
  """The commit of the git checkout petseg_jax is imported from, with ``-dirty`` when its tracked files differ
  from that commit; None when petseg_jax is not imported from a git checkout (e.g. an installed wheel).
  """
  def git(*args: str) -> subprocess.CompletedProcess:
    # GIT_OPTIONAL_LOCKS=0: read only, never the index lock a user's concurrent `git commit` needs.
    return subprocess.run(["git", "-C", str(package_dir), *args], capture_output=True, text=True,
                          timeout=GIT_TIMEOUT_SEC, env={**os.environ, "GIT_OPTIONAL_LOCKS": "0"})

  try:
    top = git("rev-parse", "--show-toplevel")
    # A package installed into a folder of some other git repository is not that repository's code.
    if top.returncode != 0 or Path(top.stdout.strip()).resolve() != package_dir.parent:
      return None
    commit = git("rev-parse", "HEAD")
    if commit.returncode != 0:  # A repository without commits.
      return None
    status = git("status", "--porcelain", "--untracked-files=no")
    dirty = status.returncode != 0 or bool(status.stdout.strip())
  except (OSError, subprocess.TimeoutExpired):  # No git installed, or a hung file system.
    return None
  return commit.stdout.strip() + ("-dirty" if dirty else "")


def code_fingerprint(package_dir: Path = _PACKAGE_DIR) -> str:
  """A short hash of the package's Python source (every ``*.py`` under it, by path and content)."""
  digest = hashlib.sha256()
  for path in sorted(package_dir.rglob("*.py")):
    digest.update(path.relative_to(package_dir).as_posix().encode() + b"\0")
    digest.update(path.read_bytes() + b"\0")
  return digest.hexdigest()[:16]


def cpuinfo_field(name: str) -> str | None:
  """The first ``name`` line's value in /proc/cpuinfo (Linux), else None."""
  try:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
      if line.split(":", 1)[0].strip() == name:
        return line.split(":", 1)[1].strip()
  except OSError:
    pass
  return None


def cpu_name() -> str:
  """The CPU's model name (/proc/cpuinfo), else what ``platform`` knows."""
  return cpuinfo_field("model name") or platform.processor() or platform.machine()


def device_description() -> str:
  """JAX's devices in words: ``"cpu: <model name> (<n> cores)"`` or ``"gpu: NVIDIA H100 x1"``."""
  import jax  # pylint: disable=g-import-not-at-top  # Only here: the module itself needs no JAX.
  device = jax.devices()[0]
  if device.platform == "cpu":
    return f"cpu: {cpu_name()} ({os.cpu_count()} cores)"
  return f"{device.platform}: {device.device_kind} x{jax.local_device_count()}"


def package_versions() -> dict[str, str]:
  """The installed versions of ``PACKAGES`` (those not installed are left out)."""
  versions = {}
  for name in PACKAGES:
    try:
      versions[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
      pass
  return versions


def attempt_record(start_step: int, train_examples: int | None) -> dict[str, Any]:
  """The record of an attempt that trains from ``start_step`` on ``train_examples`` examples in this process
  (None: an attempt that writes a run's start without reading data, ``train.write_initial_run``)."""
  import jax  # pylint: disable=g-import-not-at-top
  return {"step": start_step, "wall_time": time.time(), "petseg_jax": petseg_jax.__version__,
          "git_commit": git_commit(), "code_fingerprint": code_fingerprint(), "packages": package_versions(),
          "python": platform.python_version(), "device": device_description(),
          "num_devices": jax.local_device_count(), "host": socket.gethostname(), "argv": sys.argv,
          "train_examples": train_examples}


def read_provenance(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of ``workdir/provenance.jsonl``, oldest first; [] for a run started before it existed.

  Raises:
    metrics_log.MetricsFileError: a line other than a torn last one is not valid JSON.
  """
  return metrics_log.read_records(Path(workdir) / PROVENANCE_FILE)


def recorded_train_examples(records: Sequence[dict[str, Any]]) -> int | None:
  """How many training examples the latest attempt of ``records`` (``read_provenance``) that read data trained
  on; None if none recorded it."""
  counts = [r["train_examples"] for r in records if r.get("train_examples") is not None]
  return counts[-1] if counts else None


def code_changes(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
  """What differs in the code that computes a run between two records: ``["git_commit a -> b", ...]``."""
  changes = []
  for field in CODE_FIELDS:
    old, new = before.get(field), now.get(field)
    if field == "packages":
      old, new = old or {}, new or {}
      changes += [f"{name} {old.get(name)} -> {new.get(name)}" for name in sorted({*old, *new})
                  if old.get(name) != new.get(name)]
    elif old != new:
      changes.append(f"{field} {old} -> {new}")
  return changes


def record_attempt(workdir: str | os.PathLike, earlier: Sequence[dict[str, Any]], start_step: int,
                   train_examples: int | None) -> list[str]:
  """Writes ``workdir/provenance.jsonl`` as ``earlier`` (its records, ``read_provenance``, read holding the run's
  lock) and this attempt's record (``attempt_record``).

  Returns:
    What changed in the code since the attempt before (``code_changes``); [] for the first attempt, or one
    with the same code.
  """
  path = Path(workdir) / PROVENANCE_FILE
  record = attempt_record(start_step, train_examples)
  # Rewritten whole, atomically (a few records): a killed process leaves no torn line to append after.
  files.write_atomically(path, "".join(json.dumps(r) + "\n" for r in [*earlier, record]))
  return code_changes(earlier[-1], record) if earlier else []
