"""Atomic file writes: whoever reads the file (or a crash interrupts the write) sees the old file or the new;
output-folder checks and file-name parts.

Used for config.json, metrics.jsonl rewrites, a sweep's JSON status files, converted weights and exported
Keras models. Imports neither JAX nor TensorFlow: the sweep driver (``ablation``) uses it too.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path
import re
import secrets
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
  """Yields a temporary file name beside ``path`` that replaces ``path`` when the block ends without an exception.

  For writers that take a file name (Keras' ``model.save`` picks the format by the name's ending, so the
  temporary name ends as ``path`` does). The same file system, so the rename is atomic; the file is fsynced
  first. If the block raises, the temporary file is removed and ``path`` is left as it was.
  """
  path = Path(path)
  # A name of its own per write: two processes writing the same file never write into each other's temporary.
  temporary = path.with_name(f".{secrets.token_hex(4)}.tmp.{path.name}")
  try:
    yield temporary
    with open(temporary, "rb") as f:
      os.fsync(f.fileno())  # The data is on disk before the rename makes it the file.
    os.replace(temporary, path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
  """Yields a binary file whose content replaces ``path`` when the block ends without an exception.

  The file is a temporary one beside ``path`` (``atomic_path``): whoever reads ``path`` meanwhile, or after a
  crash, sees the old file or the new one. If the block raises, ``path`` is left as it was.

  Args:
    path: the file to write; its directory must exist.

  Yields:
    The temporary file, open for writing in binary mode.
  """
  with atomic_path(path) as temporary:
    # Mode "x" creates it with the usual permissions (tempfile.mkstemp would make it 0600).
    with open(temporary, "xb") as f:
      yield f


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
  """Replaces ``path`` by ``data`` (text is UTF-8 encoded) through ``atomic_output``."""
  with atomic_output(path) as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)


def folder_problem(folder: str | os.PathLike, flag: str) -> str:
  """"" if ``folder`` is a directory or can be made one, else why not, naming ``flag`` (e.g. "--output")."""
  path = Path(folder)
  blocking = next((p for p in (path, *path.parents) if p.exists() and not p.is_dir()), None)
  if blocking is None:
    return ""
  where = "is a file" if blocking == path else f"lies under {blocking}, which is a file"
  return f"{flag} {folder} {where}; give a folder (made if missing)."


def file_name_part(text: str) -> str:
  """``text`` (e.g. a split) as a file-name part: as it is where it has only letters, digits, ``_ . -``; else
  readable, with a short hash of the exact text: ``train[:80%]`` → ``train-80-_77688a``, ``train[80%:]`` →
  ``train-80-_d27bf5`` (the characters alone would give both the same name)."""
  name = re.sub(r"[^A-Za-z0-9_.-]+", "-", text)
  return name if name == text else f"{name}_{hashlib.sha1(text.encode()).hexdigest()[:6]}"
