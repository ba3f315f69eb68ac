"""Runs the benchmark set that BENCHMARKS.md reports, one ``scripts/benchmark.py`` process per row, into JSONL.

    python scripts/benchmark_suite.py --output runs/bench/cpu.jsonl [--suite auto|cpu|gpu] [--only REGEX]
        [--steps N] [--warmup N] [--no-keras] [--resume] [--list] [-- EXTRA BENCHMARK ARGS]

Each row is a fresh process (clean peak memory, compilation and Keras state) whose JSON line is appended to
``--output`` as soon as it finishes, with the row's ``name``, ``command``, ``run_s``, ``suite`` and
``git_commit`` added; a row that fails is recorded with its ``error`` and the suite goes on (exit code 1 at
the end). ``--resume`` skips rows already recorded without an error, so a killed suite picks up where it
stopped. Arguments after ``--`` are appended to every row's command (e.g. ``-- --compilation-cache DIR``).

Suites: ``cpu`` is the CPU table (float32 and bfloat16 training and inference against Keras, the machine's
matmul peak, the input pipeline); ``gpu`` the accelerator table (the same at 30 timed steps, against Keras
and against the plain ``lax`` convolutions (``--impl reference``), full-precision float32 matmuls, batch
256). Where TensorFlow is not installed (accelerator hosts with JAX alone), the Keras comparison runs
on Keras' JAX backend (``KERAS_BACKEND=jax``); each row's JSON says which backend ran.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import json
import os
from pathlib import Path
import re
import subprocess
import sys
import time
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))  # benchmark.py runs this checkout's petseg_jax: its commit is recorded.
BENCHMARK = REPO_ROOT / "scripts" / "benchmark.py"

from petseg_jax import provenance  # pylint: disable=g-import-not-at-top
BF16 = ("--set", "model.dtype=bfloat16")


@dataclasses.dataclass(frozen=True)
class Row:
  """One benchmark run: its name in the JSONL, ``benchmark.py`` arguments and extra environment."""
  name: str
  args: tuple[str, ...]
  env: tuple[tuple[str, str], ...] = ()
  keras: bool = True  # Whether the row compares against Keras (dropped by --no-keras).


def suite_rows(suite: str) -> list[Row]:
  """The rows of ``suite`` ("cpu" or "gpu"), as BENCHMARKS.md lists their commands."""
  if suite == "cpu":
    train = ("--mode", "train", "--matmul-peak")
    return [Row("train_fp32", train), Row("train_bf16", train + BF16),
            Row("infer_fp32", ("--mode", "infer")), Row("infer_bf16", ("--mode", "infer") + BF16),
            Row("input", ("--mode", "input", "--steps", "3"), keras=False)]
  if suite == "gpu":
    train = ("--mode", "train", "--steps", "30", "--warmup", "5")
    infer = ("--mode", "infer", "--steps", "30", "--warmup", "5")
    frozen = ("--skip-finetune",)
    reference = ("--impl", "reference")  # The plain lax (cuDNN) convolutions, against the default.
    return [Row("train_bf16", train + BF16), Row("train_fp32", train),
            Row("train_bf16_reference", train + frozen + reference + BF16, keras=False),
            Row("train_fp32_reference", train + frozen + reference, keras=False),
            Row("infer_bf16", infer + BF16), Row("infer_fp32", infer),
            Row("infer_bf16_reference", infer + reference + BF16, keras=False),
            Row("infer_fp32_reference", infer + reference, keras=False),
            # Full float32 matmuls (JAX's default on recent GPUs is TF32).
            Row("train_fp32_full_precision", train + frozen, env=(("JAX_DEFAULT_MATMUL_PRECISION", "float32"),),
                keras=False),
            Row("train_bf16_b256", train + frozen + BF16 + ("--batch-size", "256"), keras=False),
            Row("input", ("--mode", "input", "--steps", "3"), keras=False)]
  raise ValueError(f"unknown suite {suite!r}: use 'cpu' or 'gpu'")


def default_suite() -> str:
  """'gpu' when JAX's default backend is an accelerator, else 'cpu'."""
  import jax  # pylint: disable=g-import-not-at-top  # Only here: --suite cpu|gpu needs no JAX start-up.
  return "cpu" if jax.default_backend() == "cpu" else "gpu"


def row_command(row: Row, args: argparse.Namespace) -> list[str]:
  """The ``benchmark.py`` command line of ``row``; the suite-wide options come after the row's own."""
  command = [sys.executable, str(BENCHMARK), *row.args, "--json"]
  if row.keras and not args.no_keras:
    command.append("--compare-keras")
  if args.steps is not None:
    command += ["--steps", str(args.steps)]
  if args.warmup is not None:
    command += ["--warmup", str(args.warmup)]
  return command + args.extra


def shown(command: list[str]) -> str:
  """``command`` as a user would type it in the repo root."""
  return " ".join(["python", Path(command[1]).relative_to(REPO_ROOT).as_posix(), *command[2:]])


def recorded_names(path: Path) -> set[str]:
  """Names of the rows in ``path`` that finished without an error (for --resume)."""
  names = set()
  if path.exists():
    for number, line in enumerate(path.read_text().splitlines(), 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as error:
        raise SystemExit(f"{path}:{number} is not a JSON line ({error}); --resume needs the suite's own "
                         "output: move the file away or fix that line") from None
      if "error" not in record and "name" in record:
        names.add(record["name"])
  return names


def run_row(row: Row, command: list[str], timeout_s: float) -> dict[str, Any]:
  """Runs one row; its JSON result, or a record with ``error`` and ``returncode`` when it failed."""
  env = {**os.environ, **dict(row.env)}
  if row.keras and importlib.util.find_spec("tensorflow") is None:
    env.setdefault("KERAS_BACKEND", "jax")  # Keras' default backend, TensorFlow, is not installed here.
  start = time.perf_counter()
  try:
    proc = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=timeout_s)
  except subprocess.TimeoutExpired as error:
    stderr = error.stderr.decode(errors="replace") if isinstance(error.stderr, bytes) else error.stderr or ""
    return {"error": f"timed out after {timeout_s:.0f} s (--timeout)\n{stderr[-2000:]}", "returncode": None,
            "run_s": time.perf_counter() - start}
  run_s = time.perf_counter() - start
  lines = proc.stdout.strip().splitlines()
  if proc.returncode == 0 and lines:
    try:
      return {**json.loads(lines[-1]), "run_s": run_s}
    except json.JSONDecodeError:
      pass
  return {"error": proc.stderr[-2000:] or proc.stdout[-2000:], "returncode": proc.returncode, "run_s": run_s}


def summary_line(record: dict[str, Any]) -> str:
  """One human-readable line per row."""
  name = f"{record['name']:16s}"
  if "error" in record:
    last = record["error"].strip().splitlines()[-1:] or ["(no output)"]
    return f"{name} FAILED ({record['returncode']}): {last[0]}"
  text = f"{name} {record['images_per_sec']:9.1f} img/s"
  if record.get("keras_images_per_sec"):
    text += f"   Keras ({record['keras_backend']}) {record['keras_images_per_sec']:9.1f}   ratio {record['ratio']:.2f}"
  if record.get("mode") == "train":
    text += f"   first step {record['compile_s']:.1f} s"
  return text + f"   ({record['run_s']:.0f} s)"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  argv = list(sys.argv[1:] if argv is None else argv)
  extra = argv[argv.index("--") + 1:] if "--" in argv else []
  argv = argv[:argv.index("--")] if "--" in argv else argv
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--output", default="", help="JSONL file the rows are appended to (required unless --list)")
  parser.add_argument("--suite", choices=("auto", "cpu", "gpu"), default="auto",
                      help="auto: gpu when JAX's default backend is an accelerator, else cpu")
  parser.add_argument("--only", default="", metavar="REGEX", help="only rows whose name matches")
  parser.add_argument("--steps", type=int, default=None, help="timed steps of every row (default: the row's)")
  parser.add_argument("--warmup", type=int, default=None, help="warm-up steps of every row (default: the row's)")
  parser.add_argument("--no-keras", action="store_true", help="skip the Keras comparison")
  parser.add_argument("--resume", action="store_true", help="skip rows already in --output without an error")
  parser.add_argument("--timeout", type=float, default=1800, help="seconds per row before it is recorded as "
                      "failed (default 1800)")
  parser.add_argument("--list", action="store_true", help="print the rows' commands and exit")
  args = parser.parse_args(argv)
  args.extra = extra
  if not args.output and not args.list:
    parser.error("--output FILE.jsonl is required (or --list to see the commands)")
  try:
    args.only_pattern = re.compile(args.only)
  except re.error as error:
    parser.error(f"--only {args.only!r} is not a regular expression: {error}")
  return args


def main(argv: list[str] | None = None) -> int:
  args = parse_args(argv)
  suite = default_suite() if args.suite == "auto" else args.suite
  rows = [row for row in suite_rows(suite) if args.only_pattern.search(row.name)]
  if not rows:
    names = ", ".join(row.name for row in suite_rows(suite))
    raise SystemExit(f"--only {args.only!r} matches no row of the {suite} suite ({names})")
  if args.list:
    for row in rows:
      env = "".join(f"{key}={value} " for key, value in row.env)
      print(f"{row.name}: {env}{shown(row_command(row, args))}")
    return 0
  output = Path(args.output)
  done = recorded_names(output) if args.resume else set()
  output.parent.mkdir(parents=True, exist_ok=True)
  commit = provenance.git_commit(REPO_ROOT / "petseg_jax")
  failed = 0
  for row in rows:
    if row.name in done:
      print(f"{row.name:16s} already in {output}, skipped (--resume)", flush=True)
      continue
    command = row_command(row, args)
    print(f"{row.name:16s} running: {shown(command)}", flush=True)
    record = {"name": row.name, **run_row(row, command, args.timeout), "suite": suite,
              "command": [Path(command[1]).relative_to(REPO_ROOT).as_posix(), *command[2:]],
              "env": dict(row.env), "git_commit": commit}
    failed += "error" in record
    with output.open("a") as stream:  # One line per finished row: a killed suite keeps what it measured.
      stream.write(json.dumps(record, default=float) + "\n")
    print(summary_line(record), flush=True)
  print(f"{len(rows) - failed} of {len(rows)} rows measured into {output}" +
        (f"; {failed} failed (their 'error' is in the file)" if failed else ""))
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
