"""Process settings of the scripts, made before JAX starts: glibc's malloc tunables (Linux), and an exit
without a last garbage collection.

XLA:CPU allocates a training step's buffers afresh in every step, hundreds of MB of them. With glibc's
defaults each large buffer is a new ``mmap`` of 4 KiB pages: the alpha-1.0 U-Net's float32 step at batch 64
took ~180,000 page faults. ``glibc.malloc.hugetlb=1`` makes malloc ask for transparent huge pages
(``madvise``): ~800 faults, less user time too (2.5 -> 2.1 CPU-seconds per step, likely fewer TLB misses),
and the step ran 0-22% faster on a 2-core CPU (9-22% in nine of ten alternating pairs; BENCHMARKS.md).
glibc reads ``GLIBC_TUNABLES`` only when a process starts, so the training, evaluation, prediction,
ablation and benchmark scripts call ``restart_with_tunables`` first, before JAX or TensorFlow is imported.

Opt out by setting the tunable yourself, e.g. ``GLIBC_TUNABLES=glibc.malloc.hugetlb=0``: a tunable the
environment already names is never changed. This module imports nothing heavy.

At exit CPython runs its cycle collector over every object the process holds, several times over while it
tears the modules down: with TensorFlow and JAX loaded (~4 million objects) that added ~2.3 s to every
script's run on a 2-core CPU. The scripts call ``skip_collection_at_exit`` to spare it.
"""

from __future__ import annotations

import atexit
import gc
import os
import sys
from collections.abc import Sequence
from pathlib import Path

HUGE_PAGES = "glibc.malloc.hugetlb=1"
# glibc 2.35 added glibc.malloc.hugetlb.
MIN_GLIBC = (2, 35)
THP_MODE_FILE = Path("/sys/kernel/mm/transparent_hugepage/enabled")


def transparent_huge_pages_mode(path: Path = THP_MODE_FILE) -> str | None:
  """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``); None if unknown."""
  try:
    text = path.read_text()
  except OSError:
    return None
  start, end = text.find("["), text.find("]")
  return text[start + 1:end] if 0 <= start < end else None


def missing_tunables(current: str, wanted: Sequence[str]) -> list[str]:
  """The ``name=value`` entries of ``wanted`` whose name ``current`` (a GLIBC_TUNABLES value) lacks."""
  named = {entry.split("=", 1)[0] for entry in current.split(":") if entry}
  return [entry for entry in wanted if entry.split("=", 1)[0] not in named]


def glibc_version() -> tuple[int, int] | None:
  """The running C library's glibc (major, minor); None on other C libraries and platforms."""
  try:
    name, version = os.confstr("CS_GNU_LIBC_VERSION").split()  # E.g. "glibc 2.36".
    major, minor = version.split(".")[:2]
    return (int(major), int(minor)) if name == "glibc" else None
  except (AttributeError, ValueError, OSError):  # No confstr, no such name, or another format.
    return None


def default_tunables() -> list[str]:
  """The tunables this machine benefits from: huge pages where the kernel gives them only when asked."""
  if transparent_huge_pages_mode() == "madvise" and (glibc_version() or (0, 0)) >= MIN_GLIBC:
    return [HUGE_PAGES]
  return []


def restart_with_tunables(tunables: Sequence[str] | None = None) -> None:
  """Re-executes this process (same interpreter and arguments) with ``tunables`` added to GLIBC_TUNABLES.

  Returns without restarting when the environment already names every tunable (as the restarted process'
  does), without glibc, or when the restart fails.

  Args:
    tunables: ``name=value`` entries; by default ``default_tunables()``.
  """
  if glibc_version() is None:
    return
  current = os.environ.get("GLIBC_TUNABLES", "")
  missing = missing_tunables(current, default_tunables() if tunables is None else tunables)
  if not missing:
    return
  env = {**os.environ, "GLIBC_TUNABLES": ":".join([entry for entry in current.split(":") if entry] + missing)}
  sys.stdout.flush()
  sys.stderr.flush()
  try:
    # sys.orig_argv keeps the interpreter's options (-m, -X ...); argv[0] is the interpreter itself, so that
    # a virtual environment's interpreter finds its environment again.
    os.execve(sys.executable, [sys.executable, *sys.orig_argv[1:]], env)
  except OSError as e:  # Carry on with the defaults: slower, not wrong.
    print(f"warning: could not restart with GLIBC_TUNABLES={env['GLIBC_TUNABLES']} ({e}); continuing "
          "without them.", file=sys.stderr)


def skip_collection_at_exit() -> None:
  """Freezes the garbage collector once this script's other exit handlers have run (scripts only).

  atexit runs its handlers last-registered first: registered at a script's start, ``gc.freeze`` runs after
  those of absl, Orbax and TensorFlow. Those handlers still run and the streams are still flushed; objects
  in reference cycles are then left to the operating system instead of being collected one by one.
  """
  atexit.register(gc.freeze)
