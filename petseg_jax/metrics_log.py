"""``metrics.jsonl``: a run's log of evaluation records, one JSON object per line.

Written by ``train`` (append-only, each record fsynced; truncated to the starting step when a run resumes),
read by ``train`` (to resume and for the curves) and ``ablation`` (its reports). Imports neither JAX nor
TensorFlow, so that a sweep's driver process can read its runs' logs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from petseg_jax import files

METRICS_FILE = "metrics.jsonl"


class MetricsFileError(ValueError):
  """A line of ``metrics.jsonl`` that is not a JSON record (the message names the file and line)."""


def append_record(path: str | os.PathLike, record: dict[str, Any]) -> None:
  """Appends ``record`` as one line and syncs it to disk (a killed process leaves at most a torn last line)."""
  with open(path, "a") as f:
    f.write(json.dumps(record) + "\n")
    f.flush()
    os.fsync(f.fileno())


def read_metrics(workdir: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of ``workdir/metrics.jsonl`` (one per evaluation), oldest first; [] if there is none.

  A last line without its newline is the half-written record of a killed process: it is skipped (the
  evaluation it belonged to is redone on resume).

  Raises:
    MetricsFileError: another line is not valid JSON.
  """
  return read_records(Path(workdir) / METRICS_FILE)


def read_records(path: str | os.PathLike) -> list[dict[str, Any]]:
  """The records of the JSON-lines file ``path``, oldest first; [] if there is none (see ``read_metrics``).

  Raises:
    MetricsFileError: a line other than a torn last one is not valid JSON.
  """
  path = Path(path)
  return _parse(path, path.read_text()) if path.exists() else []


def _parse(path: Path, text: str) -> list[dict[str, Any]]:
  """The records of ``text``, the content of ``path`` (named in the error); see ``read_metrics``."""
  lines = text.split("\n")[:-1]  # What follows the last newline is empty or a torn append.
  records = []
  for number, line in enumerate(lines, 1):
    if not line.strip():
      continue
    try:
      records.append(json.loads(line))
    except json.JSONDecodeError as e:
      raise MetricsFileError(f"{path}, line {number}: not a JSON record ({e}). Remove or repair that line.") from e
  return records


def truncate_metrics(workdir: str | os.PathLike, last_step: int) -> list[dict[str, Any]]:
  """Keeps the records of ``workdir/metrics.jsonl`` up to ``last_step`` (the step a run starts from).

  Later records belong to an attempt that did not checkpoint that far: their evaluations are redone. A torn
  last line goes too. The file is rewritten atomically, and only if that changes it.

  Returns:
    The records kept, oldest first.

  Raises:
    MetricsFileError: a line other than the last is not valid JSON.
  """
  path = Path(workdir) / METRICS_FILE
  if not path.exists():
    return []
  old_text = path.read_text()
  kept = [record for record in _parse(path, old_text) if record["step"] <= last_step]
  text = "".join(json.dumps(record) + "\n" for record in kept)
  if text != old_text:
    files.write_atomically(path, text)  # The old records or the new, never half of them.
  return kept
