"""Atomic file writes: whoever reads the file (or a crash interrupts the write) sees the old file or the new.

Used for config.json, metrics.jsonl rewrites, a sweep's JSON status files and converted weights. Imports
neither JAX nor TensorFlow: the sweep driver (``ablation``) uses it too.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
import secrets
from typing import BinaryIO, Iterator


@contextlib.contextmanager
def atomic_output(path: str | os.PathLike) -> Iterator[BinaryIO]:
  """Yields a binary file whose content replaces ``path`` when the block ends without an exception.

  The file is a temporary one beside ``path`` (the same file system, so the rename is atomic); it is
  flushed and fsynced, then renamed over ``path``. If the block raises, it is removed and ``path`` is left
  as it was.

  Args:
    path: the file to write; its directory must exist.

  Yields:
    The temporary file, open for writing in binary mode.
  """
  path = Path(path)
  # A name of its own per write: two processes writing the same file never write into each other's
  # temporary. Mode "x" creates it with the usual permissions (tempfile.mkstemp would make it 0600).
  temporary = path.with_name(f".{path.name}.{secrets.token_hex(4)}.tmp")
  try:
    with open(temporary, "xb") as f:
      yield f
      f.flush()
      os.fsync(f.fileno())  # The data is on disk before the rename makes it the file.
    os.replace(temporary, path)
  except BaseException:
    temporary.unlink(missing_ok=True)
    raise


def write_atomically(path: str | os.PathLike, data: str | bytes) -> None:
  """Replaces ``path`` by ``data`` (text is UTF-8 encoded) through ``atomic_output``."""
  with atomic_output(path) as f:
    f.write(data.encode("utf-8") if isinstance(data, str) else data)
