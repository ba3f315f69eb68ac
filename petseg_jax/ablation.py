"""Ablation sweeps: named config variants × seeds, each trained in its own workdir, then one report.

A sweep file is a Python file whose ``get_sweep()`` returns::

    {"seeds": [0, 1, 2],                          # optional, default [0]
     "overrides": {"train.num_epochs": 10},       # optional, common to every run
     "variants": {"frozen": {"model.freeze_encoder": True}, ...},
     "grid": {"model.alpha": [0.35, 1.0], ...}}   # "variants" and/or "grid"

Keys are dotted paths into the base config (``configs/*.py``). A grid expands to the cartesian product of
its values; with both "variants" and "grid", every variant is crossed with every grid point. A variant's
overrides win over the common ones. ``get_sweep`` may take one string argument, given after a colon:
``sweeps/freeze.py:tfds`` calls ``get_sweep("tfds")`` (as ``config_flags`` does for config files).

Layout of a sweep directory::

    DIR/sweep.json                    the plan: base config, sweep file, every run and its overrides
    DIR/<variant>/seed_<s>/           a training workdir (``train.train_and_evaluate``) plus
        ablation_run.json             what this run is (variant, seed, overrides, resolved config)
        ablation_status.json          done | failed | running | interrupted, attempts, wall time, error
        train.log                     the training output (all attempts)
    DIR/jax_cache/                    the runs' XLA compilation cache (unless JAX_COMPILATION_CACHE_DIR is set)
    DIR/summary.csv, summary.md, summary.png   the report (``petseg_jax.ablation_report``)

Runs are trained one after another, each in a fresh Python process by default (a crash, an out-of-memory
kill or a bad value in one variant cannot take the sweep down). A finished run is skipped when the sweep is
run again; an interrupted one resumes from its latest checkpoint (training's own resume).
"""

from __future__ import annotations

import ast
import copy
import ctypes
import ctypes.util
import dataclasses
import datetime
import itertools
import json
import os
from pathlib import Path
import re
import signal
import subprocess
import sys
import time
import traceback
from typing import Any, Callable, Mapping, Sequence

import ml_collections

from petseg_jax import config_files
from petseg_jax import files
from petseg_jax.config_files import CONFIG_FILE
from petseg_jax.metrics_log import METRICS_FILE, read_metrics
from petseg_jax import stopping

PLAN_FILE = "sweep.json"
RUN_SPEC_FILE = "ablation_run.json"
STATUS_FILE = "ablation_status.json"
LOG_FILE = "train.log"
COMPILATION_CACHE_DIR = "jax_cache"
SWEEP_KEYS = ("seeds", "overrides", "variants", "grid")

DONE, FAILED, RUNNING, INTERRUPTED, SKIPPED = "done", "failed", "running", "interrupted", "skipped"


class SweepError(config_files.ConfigFileError):
  """A sweep file, an override or a sweep directory that cannot be used; the message says what to fix."""


@dataclasses.dataclass(frozen=True)
class Run:
  """One training run of a sweep."""
  variant: str
  seed: int
  variant_overrides: dict[str, Any]  # What distinguishes the variant (its own and its grid point's).
  overrides: dict[str, Any]  # Everything applied to the base config: common, then variant, then seed.
  dirname: str  # Relative to the sweep directory.


@dataclasses.dataclass
class RunResult:
  """What happened to a run in this invocation."""
  run: Run
  status: str  # DONE, FAILED or SKIPPED (already done); an interrupted run raises KeyboardInterrupt instead.
  error: str = ""
  wall_time_sec: float = 0.0


# ---------------------------------------------------------------------------------------------------------
# Loading config and sweep files.


def load_config(spec: str | os.PathLike) -> ml_collections.ConfigDict:
  """The ConfigDict of a config file (``configs/x.py`` or ``configs/x.py:arg``); SweepError if unusable."""
  return config_files.load_config(spec, SweepError)


def _check_overrides(overrides: Any, where: str) -> dict[str, Any]:
  if not isinstance(overrides, Mapping):
    raise SweepError(f"{where} must be a dict {{'section.key': value}}, got {type(overrides).__name__}.")
  for key in overrides:
    if not isinstance(key, str) or not key or any(not part for part in key.split(".")):
      raise SweepError(f"{where}: key {key!r} is not a dotted config path such as 'model.freeze_encoder'.")
  return dict(overrides)


def validate_sweep(sweep: Any, source: str = "sweep") -> dict[str, Any]:
  """Checks the structure of a ``get_sweep()`` result; returns it with defaults filled in."""
  if not isinstance(sweep, Mapping):
    raise SweepError(f"{source}: get_sweep() must return a dict, got {type(sweep).__name__}.")
  unknown = sorted(set(sweep) - set(SWEEP_KEYS))
  if unknown:
    raise SweepError(f"{source}: unknown top-level key(s) {unknown}; allowed: {list(SWEEP_KEYS)}.")
  seeds = sweep.get("seeds", [0])
  if (not isinstance(seeds, (list, tuple)) or not seeds
      or not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds)):
    raise SweepError(f"{source}: 'seeds' must be a non-empty list of ints, got {seeds!r}.")
  if len(set(seeds)) != len(seeds):
    raise SweepError(f"{source}: 'seeds' has duplicates: {list(seeds)}.")
  overrides = _check_overrides(sweep.get("overrides", {}), f"{source}: 'overrides'")
  variants = sweep.get("variants", {})
  if not isinstance(variants, Mapping):
    raise SweepError(f"{source}: 'variants' must be a dict {{name: {{key: value}}}}.")
  for name, variant in variants.items():
    if not isinstance(name, str) or not name.strip():
      raise SweepError(f"{source}: variant name {name!r} must be a non-empty string.")
    _check_overrides(variant, f"{source}: variant {name!r}")
  grid = sweep.get("grid", {})
  if not isinstance(grid, Mapping):
    raise SweepError(f"{source}: 'grid' must be a dict {{key: [values]}}.")
  _check_overrides(grid, f"{source}: 'grid'")
  for key, values in grid.items():
    if not isinstance(values, (list, tuple)) or not values:
      raise SweepError(f"{source}: grid key {key!r} needs a non-empty list of values, got {values!r}.")
  if not variants and not grid:
    raise SweepError(f"{source}: declare 'variants' and/or 'grid' (nothing to compare).")
  for key in itertools.chain(overrides, grid, *variants.values()):
    if key == "seed":
      raise SweepError(f"{source}: do not override 'seed'; list the seeds in 'seeds'.")
  return {"seeds": list(seeds), "overrides": overrides,
          "variants": {name: dict(v) for name, v in variants.items()},
          "grid": {key: list(values) for key, values in grid.items()}}


def load_sweep(spec: str | os.PathLike) -> dict[str, Any]:
  """The validated ``get_sweep()`` of a sweep file (``sweeps/x.py`` or ``sweeps/x.py:arg``)."""
  return validate_sweep(config_files.call_python_file(str(spec), "get_sweep", "sweep", SweepError), str(spec))


def parse_override(text: str) -> tuple[str, Any]:
  """'train.num_epochs=3' → ('train.num_epochs', 3); values are Python literals, else strings."""
  key, sep, value = text.partition("=")
  if not sep or not key.strip():
    raise SweepError(f"Override {text!r} must look like section.key=value.")
  try:
    parsed = ast.literal_eval(value)
  except (ValueError, SyntaxError):
    parsed = value  # A plain string, e.g. a path or "train[:80%]".
  return key.strip(), parsed


# ---------------------------------------------------------------------------------------------------------
# Expanding a sweep into runs.


def format_value(value: Any) -> str:
  """Short, readable text of an override value (for names and tables)."""
  if isinstance(value, str):
    if "/" in value and Path(value).suffix:
      return Path(value).name  # A weight file: its name says enough.
    return value if value else "''"
  if isinstance(value, float):
    return f"{value:g}"
  if isinstance(value, (list, tuple)):
    return "(" + ",".join(format_value(v) for v in value) + ")"
  return str(value)


def format_overrides(overrides: Mapping[str, Any]) -> str:
  """``{"model.alpha": 1.0}`` → ``"model.alpha=1"``."""
  return "; ".join(f"{key}={format_value(value)}" for key, value in overrides.items()) or "(base)"


def _grid_points(grid: Mapping[str, Sequence[Any]]) -> list[tuple[str, dict[str, Any]]]:
  if not grid:
    return []
  keys = list(grid)
  # Name grid points by the last key component unless two keys share it.
  last = [key.split(".")[-1] for key in keys]
  short = {key: (name if last.count(name) == 1 else key) for key, name in zip(keys, last)}
  points = []
  for values in itertools.product(*(grid[key] for key in keys)):
    overrides = dict(zip(keys, values))
    name = ",".join(f"{short[key]}={format_value(value)}" for key, value in overrides.items())
    points.append((name, overrides))
  return points


def slug(name: str) -> str:
  """A directory name for a variant name."""
  return re.sub(r"[^A-Za-z0-9._=,+-]+", "_", name).strip("._") or "variant"


def expand_variants(sweep: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
  """(name, variant overrides) in declaration order: variants × grid points."""
  variants = list(sweep["variants"].items())
  points = _grid_points(sweep["grid"])
  if variants and points:
    expanded = [(f"{vname},{pname}", {**voverrides, **poverrides})
                for vname, voverrides in variants for pname, poverrides in points]
  else:
    expanded = variants or points
  seen: dict[str, str] = {}
  for name, _ in expanded:
    if slug(name) in seen:
      raise SweepError(f"Variants {seen[slug(name)]!r} and {name!r} map to the same directory "
                       f"{slug(name)!r}; rename one.")
    seen[slug(name)] = name
  return expanded


def expand_runs(sweep: Mapping[str, Any], extra_overrides: Mapping[str, Any] | None = None) -> list[Run]:
  """Every (variant, seed) run, variant-major.

  A run's overrides are the sweep's common ones, then its variant's, then ``extra_overrides`` (``--set``:
  every run gets them, the variants' own values included; a variant's overrides then show the value it runs).
  """
  extra = dict(extra_overrides or {})
  if "seed" in extra:
    raise SweepError("--set seed: each run's seed comes from the sweep's 'seeds' list; override that instead "
                     "(e.g. a copy of the sweep file), or run train.py with --config.seed.")
  runs = []
  for name, variant_overrides in expand_variants(sweep):
    for seed in sweep["seeds"]:
      overrides = {**sweep["overrides"], **variant_overrides, **extra, "seed": seed}
      runs.append(Run(variant=name, seed=seed, variant_overrides={key: overrides[key] for key in variant_overrides},
                      overrides=overrides, dirname=f"{slug(name)}/seed_{seed}"))
  return runs


# ---------------------------------------------------------------------------------------------------------
# Applying overrides.


def apply_overrides(config: ml_collections.ConfigDict, overrides: Mapping[str, Any],
                    where: str = "") -> ml_collections.ConfigDict:
  """A copy of ``config`` with ``{"section.key": value}`` applied; unknown keys and wrong types raise.

  Lists given for tuple fields become tuples and ints for float fields become floats (what a sweep file
  naturally writes); any other type change is refused, None for a number, bool or tuple (``ConfigDict`` would
  store it; a string field may take None, e.g. ``model.encoder_weights=None``: a random encoder) and a bool
  for a number (a bool is an int to Python) included.
  """
  config = copy.deepcopy(config)
  prefix = f"{where}: " if where else ""
  for key, value in overrides.items():
    node, parts = config, key.split(".")
    for depth, part in enumerate(parts):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        parent = ".".join(parts[:depth]) or "the config"
        fields = sorted(node.keys()) if isinstance(node, ml_collections.ConfigDict) else []
        raise SweepError(f"{prefix}override {key!r}: {parent} has no field {part!r}"
                         + (f" (fields: {', '.join(fields)})" if fields else "") + ".")
      if depth < len(parts) - 1:
        node = node[part]
    field, old = parts[-1], node[parts[-1]]
    if isinstance(old, ml_collections.ConfigDict):
      raise SweepError(f"{prefix}override {key!r} names a whole section; override its fields instead.")
    if isinstance(old, tuple) and isinstance(value, list):
      value = tuple(value)
    elif isinstance(old, float) and isinstance(value, int) and not isinstance(value, bool):
      value = float(value)
    if (value is None and isinstance(old, (int, float, tuple))) or (
        isinstance(value, bool) and isinstance(old, (int, float)) and not isinstance(old, bool)):
      raise SweepError(f"{prefix}override {key}={value!r}: the config's field holds "
                       f"{type(old).__name__} {old!r}.")
    try:
      node[field] = value
    except (TypeError, ValueError) as e:
      raise SweepError(f"{prefix}override {key}={value!r}: the config's field holds "
                       f"{type(old).__name__} {old!r} ({e}).") from e
  return config


# ---------------------------------------------------------------------------------------------------------
# Running.


def read_json(path: Path) -> dict[str, Any] | None:
  """A sweep's JSON file (plan, run spec, status), or None if absent; SweepError saying what to do if damaged."""
  if not path.exists():
    return None
  try:
    return json.loads(path.read_text())
  except json.JSONDecodeError as e:
    way_out = ("run the sweep command again to write the plan anew" if path.name == PLAN_FILE
               else "delete it to re-run that run")
    raise SweepError(f"{path} is not valid JSON ({e}); {way_out}.") from e


def _write_json(path: Path, data: Any) -> None:
  path.parent.mkdir(parents=True, exist_ok=True)
  files.write_atomically(path, json.dumps(data, indent=2) + "\n")  # A killed sweep never leaves half a file.


def _trains(pid: Any, workdir: Path) -> bool:
  """Whether process ``pid`` is alive and is a sweep's training process of ``workdir`` (not a process that
  was given the pid later). Where /proc is not readable, alive is taken to mean so."""
  if not _pid_alive(pid):
    return False
  try:
    command = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
  except OSError:
    return True
  return b"petseg_jax.ablation" in command and str(workdir.resolve()).encode() in command


def _process_start(pid: int) -> int | None:
  """When process ``pid`` started (clock ticks after boot, /proc/<pid>/stat), or None where unreadable. With
  the pid it names a process: after a restart, another process may have the same pid."""
  try:
    fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    return int(fields[19])  # Field 22 of the whole line; the command name before ")" may hold spaces.
  except (OSError, IndexError, ValueError):
    return None


def _sweep_alive(status: Mapping[str, Any]) -> bool:
  """Whether the sweep process that wrote a "running" ``status`` still runs (the same process, not one given
  its pid later)."""
  pid = status.get("pid")
  if not _pid_alive(pid):
    return False
  recorded, now = status.get("pid_start"), _process_start(pid)
  return recorded is None or now is None or recorded == now


def _pid_alive(pid: Any) -> bool:
  if not isinstance(pid, int) or pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def training_complete(workdir: str | os.PathLike) -> bool:
  """Whether ``metrics.jsonl`` holds the evaluation at the run's last step (per its config.json)."""
  records = read_metrics(workdir)
  config = read_json(Path(workdir) / CONFIG_FILE)
  if not records or config is None:
    return False
  train_config = config["train"]
  if train_config["num_train_steps"] > 0:
    return records[-1]["step"] >= train_config["num_train_steps"]
  return records[-1].get("epoch", 0) >= train_config["num_epochs"] - 1e-6


def read_status(workdir: str | os.PathLike) -> dict[str, Any]:
  """``ablation_status.json`` of a run ({} if it never started).

  A "running" status whose sweep process is gone (killed without a chance to record the end) reads as
  "done" if training had completed (its wall time then from the last metrics record), else as
  "interrupted", the killed attempt's time (from its start to the last write to its ``train.log``) added.
  """
  status = read_json(Path(workdir) / STATUS_FILE) or {}
  if status.get("status") == RUNNING and not _sweep_alive(status):
    status = dict(status)
    if training_complete(workdir):
      status["status"] = DONE
      status["wall_time_sec"] = status.get("wall_time_sec", 0.0) + read_metrics(workdir)[-1].get(
          "elapsed_sec", 0.0)
    else:
      status["status"] = INTERRUPTED
      log_path, started = Path(workdir) / LOG_FILE, status.get("started")
      if isinstance(started, (int, float)) and log_path.is_file():
        status["wall_time_sec"] = status.get("wall_time_sec", 0.0) + max(0.0, log_path.stat().st_mtime - started)
  return status


def train_from_spec(workdir: str | os.PathLike) -> None:
  """Trains the run described by ``workdir/ablation_run.json`` in this process."""
  workdir = Path(workdir)
  spec = read_json(workdir / RUN_SPEC_FILE)
  if spec is None:
    raise SweepError(f"{workdir / RUN_SPEC_FILE} not found: is {workdir} a sweep run directory?")
  config = apply_overrides(load_config(spec["base_config"]), spec["overrides"], spec["variant"])
  if config_files.config_to_dict(config) != spec["config"]:
    raise SweepError(f"{spec['base_config']} changed since the sweep was planned; re-run the sweep.")
  from petseg_jax import train  # pylint: disable=g-import-not-at-top  (imports TensorFlow)
  train.train_and_evaluate(config, workdir)


ATTEMPT_HEADER = "=== attempt "  # Starts each attempt's output in train.log.


def _last_error_line(log_path: Path) -> str:
  """The most telling line of the last attempt's output in a failed run's log: its last exception line, else
  its last line."""
  if not log_path.exists():
    return ""
  # What follows the last attempt's header line.
  last_attempt = log_path.read_text(errors="replace").rpartition("\n" + ATTEMPT_HEADER)[2].partition("\n")[2]
  lines = [line.strip() for line in last_attempt.splitlines() if line.strip()]
  for line in reversed(lines):
    if re.match(r"^([A-Za-z_][\w.]*(Error|Exception|Interrupted)|KeyboardInterrupt)\b", line):
      return line[:500]
  return lines[-1][:500] if lines else ""


def _how_it_ended(returncode: int) -> str:
  """A failed training process's exit code, or the signal that killed it (a negative ``returncode``)."""
  if returncode >= 0:
    return f"exit code {returncode}"
  try:
    name = signal.Signals(-returncode).name
  except ValueError:
    name = f"signal {-returncode}"
  return f"killed by {name}" + (" (out of memory?)" if -returncode == signal.SIGKILL else "")


def _subprocess_env(sweep_dir: Path) -> dict[str, str]:
  env = dict(os.environ)
  paths = [str(config_files.REPO_ROOT)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
  env["PYTHONPATH"] = os.pathsep.join(paths)
  # Seeds of a variant, and variants that differ only in data, compile the same XLA programs: a
  # persistent compilation cache shared by the sweep's processes compiles them once.
  env.setdefault("JAX_COMPILATION_CACHE_DIR", str(sweep_dir / COMPILATION_CACHE_DIR))
  env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")
  return env


PR_SET_PDEATHSIG = 1  # From <sys/prctl.h>.
ORPHAN_WAIT_SEC = 300  # How long a new attempt waits for a killed sweep's training child to stop.
RESUME_HINT = "interrupted; run the sweep again to resume"  # An interrupted run's recorded error.


def _stop_with_parent() -> None:
  """In a training child (Linux): SIGTERM when the sweep process dies, even by SIGKILL.

  Else the child trains on, orphaned, and a re-run of the sweep finds its workdir locked. SIGTERM stops
  training gracefully (checkpoint, then exit), so the re-run resumes it. (Linux sends it when the thread
  that started the child ends: the sweep starts its children from its main thread.)
  """
  libc = ctypes.CDLL(ctypes.util.find_library("c"), use_errno=True)
  libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def _train_subprocess(workdir: Path, sweep_dir: Path, log_path: Path, attempt: int,
                      on_start: Callable[[int], None]) -> int:
  """Trains ``workdir``'s run in a fresh Python process, output appended to ``log_path``; its exit code.

  ``on_start`` gets the child's pid as soon as it runs.

  The child runs in a session of its own, so that a terminal's Ctrl-C reaches the sweep alone. On
  KeyboardInterrupt (Ctrl-C, or SIGTERM: see scripts/ablate.py) the sweep asks the child to stop at once with
  ``stopping.STOP_SIGNAL`` (training then writes its checkpoint and exits; a scheduler signalling the child as
  well does not make that a second request, which would abort), and waits up to ``ORPHAN_WAIT_SEC`` for it.
  A second Ctrl-C meanwhile, or that wait running out, kills the child (no checkpoint: the latest one stays).
  """
  with open(log_path, "a") as f:
    f.write(f"\n{ATTEMPT_HEADER}{attempt} at {datetime.datetime.now().isoformat(timespec='seconds')}\n")
    f.flush()
    process = subprocess.Popen([sys.executable, "-m", "petseg_jax.ablation", str(workdir.resolve())],
                               stdout=f, stderr=subprocess.STDOUT, env=_subprocess_env(sweep_dir),
                               start_new_session=True,
                               preexec_fn=_stop_with_parent if sys.platform.startswith("linux") else None)
    try:
      on_start(process.pid)
      return process.wait()
    except KeyboardInterrupt:
      try:
        process.send_signal(stopping.STOP_SIGNAL)
        process.wait(timeout=ORPHAN_WAIT_SEC)
      except (subprocess.TimeoutExpired, KeyboardInterrupt):
        process.kill()
        process.wait()
      raise


def settings_changed(workdir: Path, planned: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{key: (run's value, planned value)}`` where the run in ``workdir`` was configured otherwise than
  ``planned`` (``config_files.config_to_dict`` of its config); {} if it matches, or holds no run yet. A run
  spec without its config differs as a whole."""
  spec = read_json(workdir / RUN_SPEC_FILE)
  if spec is None:
    return {}
  saved = spec.get("config")
  if not isinstance(saved, dict):
    return {"config": (saved, "the planned config")}
  return config_files.differences(config_files.flat_config(saved), config_files.flat_config(planned))


def different_configuration(workdir: Path) -> str:
  """Why a run directory trained for another configuration is not this plan's run."""
  return (f"{workdir} holds a run of a different configuration (the sweep or base config changed); delete that "
          "directory or use a new --workdir.")


def execute_run(run: Run, config: ml_collections.ConfigDict, base_config: str, sweep_dir: Path, *,
                in_process: bool = False) -> RunResult:
  """Trains one planned run (``config`` = its resolved config) unless it is done; records its status.

  Raises:
    KeyboardInterrupt: the run was interrupted (Ctrl-C, SIGTERM); its status says so, and the sweep run again
      resumes it.
  """
  workdir = sweep_dir / run.dirname
  expected = config_files.config_to_dict(config)
  if settings_changed(workdir, expected):
    return RunResult(run, FAILED, different_configuration(workdir))
  status = read_status(workdir)
  if status.get("status") == RUNNING and status.get("pid") != os.getpid():
    return RunResult(run, FAILED, f"{workdir} is being trained by another sweep process "
                     f"(pid {status.get('pid')}).")
  if status.get("status") == DONE:
    _write_json(workdir / STATUS_FILE, status)  # Records a recovered status (see read_status).
    return RunResult(run, SKIPPED, wall_time_sec=status.get("wall_time_sec", 0.0))
  # A sweep process killed outright leaves its training child stopping (SIGTERM from the kernel: it writes a
  # checkpoint, holding the workdir's lock meanwhile); this attempt waits for it rather than fail on the lock.
  orphan = status.get("child_pid")
  deadline = time.time() + ORPHAN_WAIT_SEC
  while _trains(orphan, workdir) and time.time() < deadline:
    time.sleep(0.5)
  if _trains(orphan, workdir):
    return RunResult(run, FAILED, f"The training process (pid {orphan}) of an earlier sweep still runs in "
                     f"{workdir} after {ORPHAN_WAIT_SEC} s; wait for it to finish or stop it, then run again.")
  _write_json(workdir / RUN_SPEC_FILE, {
      "variant": run.variant, "seed": run.seed, "variant_overrides": run.variant_overrides,
      "overrides": run.overrides, "base_config": base_config, "config": expected})
  attempts = status.get("attempts", 0) + 1
  previous_time = status.get("wall_time_sec", 0.0)
  start = time.time()
  running = {"status": RUNNING, "attempts": attempts, "wall_time_sec": previous_time, "pid": os.getpid(),
             "pid_start": _process_start(os.getpid()),
             "started": start}
  _write_json(workdir / STATUS_FILE, running)
  log_path = workdir / LOG_FILE
  error, state = "", DONE
  try:
    if in_process:
      try:
        train_from_spec(workdir)
      except stopping.TrainingInterrupted:
        state, error = INTERRUPTED, RESUME_HINT
      except Exception as e:  # pylint: disable=broad-except  (any failure of one run is reported)
        with open(log_path, "a") as f:
          f.write(traceback.format_exc())
        error, state = f"{type(e).__name__}: {e}"[:1000], FAILED
    else:
      returncode = _train_subprocess(workdir, sweep_dir, log_path, attempts,
                                     lambda pid: _write_json(workdir / STATUS_FILE, {**running, "child_pid": pid}))
      if returncode in (128 + signal.SIGINT, 128 + signal.SIGTERM, 128 + stopping.STOP_SIGNAL):
        state, error = INTERRUPTED, RESUME_HINT
      elif returncode != 0:
        state = FAILED
        error = f"{_how_it_ended(returncode)}: {_last_error_line(log_path)} (see {log_path})"
  except KeyboardInterrupt:
    state, error = INTERRUPTED, RESUME_HINT
  wall = time.time() - start
  if state == DONE:
    saved = read_json(workdir / CONFIG_FILE)
    if saved != expected:
      state, error = FAILED, f"{workdir / CONFIG_FILE} differs from the planned config."
    elif not read_metrics(workdir):
      state, error = FAILED, f"training finished without writing {workdir / METRICS_FILE}."
  _write_json(workdir / STATUS_FILE, {"status": state, "attempts": attempts,
                                      "wall_time_sec": previous_time + wall, "error": error})
  if state == INTERRUPTED:  # Recorded above; the sweep stops here.
    raise KeyboardInterrupt(f"Sweep interrupted during {run.dirname}; run it again to resume.")
  return RunResult(run, state, error, previous_time + wall)


def plan_runs(base_config: str, sweep: Mapping[str, Any], extra_overrides: Mapping[str, Any] | None = None,
              only: Sequence[str] | None = None, check_duplicates: bool = True
              ) -> list[tuple[Run, ml_collections.ConfigDict | None, str]]:
  """(run, resolved config or None, planning error) for every run (of the ``only`` variants); a bad override
  fails its run only. SweepError if two of the planned variants are one configuration (``check_duplicates``)."""
  runs = expand_runs(sweep, extra_overrides)
  if only:
    names = {run.variant for run in runs}
    missing = sorted(set(only) - names)
    if missing:
      raise SweepError(f"--only: no variant(s) {missing}; the sweep has {sorted(names)}.")
    runs = [run for run in runs if run.variant in only]
  from petseg_jax import config_checks  # pylint: disable=g-import-not-at-top  (imports JAX)
  base = load_config(base_config)
  planned = []
  for run in runs:
    where = f"variant {run.variant!r}"
    try:
      config = apply_overrides(base, run.overrides, where)
      ignored = config_files.ignored_override(config, run.overrides)
      if ignored:
        raise SweepError(f"{where}: {ignored}")
      try:
        # A value of the right type that no run can use (alpha=0, three decoder_filters, an unknown loss, a
        # negative learning rate) fails here, in --dry-run and before any process starts, rather than in its
        # training process. One device: counting them would start the accelerator backend in this process,
        # which on a GPU would hold memory the runs need; each run checks its batch against its devices.
        config_checks.validate_config(config, num_devices=1)
      except ValueError as e:  # config_checks.ConfigError, DataError
        raise SweepError(f"{where}: {e}") from e
      never_unfrozen = _never_unfrozen(config)
      if never_unfrozen:
        raise SweepError(f"{where}: {never_unfrozen}")
      planned.append((run, config, ""))
    except SweepError as e:
      planned.append((run, None, str(e)))
  if check_duplicates:
    _check_variants_differ(planned, extra_overrides or {})
  return planned


def _never_unfrozen(config: ml_collections.ConfigDict) -> str:
  """Why a run that asks to unfreeze its encoder would train it frozen throughout, or "".

  Only runs measured in epochs are checked here (a length in steps needs the split's size, i.e. the data;
  training warns about those).
  """
  tc = config.train
  if config.model.freeze_encoder and 0 <= tc.num_epochs <= tc.unfreeze_after_epochs and tc.num_train_steps <= 0:
    return (f"train.unfreeze_after_epochs={tc.unfreeze_after_epochs} unfreezes the encoder after the run's "
            f"train.num_epochs={tc.num_epochs}: it would stay frozen throughout, a frozen run under another name. "
            "Lower unfreeze_after_epochs or train longer.")
  return ""


def _check_variants_differ(planned: Sequence[tuple[Run, ml_collections.ConfigDict | None, str]],
                           extra_overrides: Mapping[str, Any]) -> None:
  """Raises SweepError if two variants resolve to the same configuration (for the same seed)."""
  first_of: dict[str, Run] = {}
  for run, config, _ in planned:
    if config is None:
      continue
    key = json.dumps(config_files.config_to_dict(config), sort_keys=True, default=repr)
    other = first_of.setdefault(key, run)
    if other is run:
      continue
    told_apart = sorted(set(extra_overrides) & (set(other.variant_overrides) | set(run.variant_overrides)))
    raise SweepError(
        f"Variants {other.variant!r} and {run.variant!r} resolve to the same configuration: their runs would "
        "be one experiment under two names. "
        + (f"--set {', '.join(told_apart)} overrides what tells them apart; drop it or pick variants with "
           "--only." if told_apart else "Make them differ, or drop one."))


def refuse_changed_runs(planned: Sequence[tuple[Run, ml_collections.ConfigDict | None, str]],
                        sweep_dir: str | os.PathLike) -> None:
  """Raises SweepError if a planned run's directory holds a run of other settings (``execute_run`` would fail
  it): the sweep was started with another base config, sweep file or ``--set``. Reads only."""
  sweep_dir = Path(sweep_dir)
  changed = []
  for run, config, _ in planned:
    diff = (settings_changed(sweep_dir / run.dirname, config_files.config_to_dict(config))
            if config is not None else {})
    if diff:
      changed.append((run.dirname, diff))
  if changed:
    dirname, diff = changed[0]
    shown = "; ".join(f"{key}: {old!r} -> {new!r}" for key, (old, new) in list(diff.items())[:4])
    raise SweepError(
        f"{sweep_dir} holds {len(changed)} run(s) of other settings than this command plans, e.g. {dirname} "
        f"({shown}). A sweep's runs keep their settings: run it again with those it was started with "
        f"({sweep_dir / PLAN_FILE} records them), or give a new sweep directory.")


def run_sweep(base_config: str, sweep_spec: str, sweep_dir: str | os.PathLike, *,
              extra_overrides: Mapping[str, Any] | None = None, only: Sequence[str] | None = None,
              in_process: bool = False, log: Callable[[str], None] = print) -> list[RunResult]:
  """Plans, trains (skipping finished runs) and reports a sweep; returns what happened to each run."""
  sweep_dir = Path(sweep_dir)
  base_config, sweep_spec = config_files.absolute_spec(base_config), config_files.absolute_spec(sweep_spec)
  sweep = load_sweep(sweep_spec)
  # The plan (and report) cover every run; --only restricts what is trained now, and which variants must differ.
  planned = plan_runs(base_config, sweep, extra_overrides, check_duplicates=not only)
  if only:
    plan_runs(base_config, sweep, extra_overrides, only)  # Checks the names and the chosen variants.
  refuse_changed_runs(planned, sweep_dir)  # Before the plan is written: the sweep's record stays its own.
  sweep_dir.mkdir(parents=True, exist_ok=True)
  _write_json(sweep_dir / PLAN_FILE, {
      "base_config": str(base_config), "sweep": str(sweep_spec), "seeds": sweep["seeds"],
      "overrides": {**sweep["overrides"], **(extra_overrides or {})},
      "runs": [{"variant": run.variant, "seed": run.seed, "dir": run.dirname,
                "variant_overrides": run.variant_overrides, "error": error,
                "config": config_files.config_to_dict(config) if config is not None else None}
               for run, config, error in planned]})
  to_train = [item for item in planned if not only or item[0].variant in only]
  results = []
  for index, (run, config, error) in enumerate(to_train):
    prefix = f"[{index + 1}/{len(to_train)}] {run.dirname}"
    if config is None:
      log(f"{prefix}: FAILED before training: {error}")
      results.append(RunResult(run, FAILED, error))
      continue
    log(f"{prefix}: {format_overrides(run.variant_overrides)}")
    result = execute_run(run, config, str(base_config), sweep_dir, in_process=in_process)
    if result.status == SKIPPED:
      log(f"{prefix}: already done, skipped.")
    elif result.status == DONE:
      log(f"{prefix}: done in {result.wall_time_sec:.0f} s.")
    else:
      log(f"{prefix}: FAILED: {result.error}")
    results.append(result)
  return results


def _worker_main(argv: Sequence[str]) -> int:
  """``python -m petseg_jax.ablation RUN_DIR``: trains one planned run (what a sweep runs per process)."""
  if len(argv) != 2:
    print(f"usage: python -m petseg_jax.ablation RUN_DIR (got {list(argv[1:])})", file=sys.stderr)
    return 2
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  flags.FLAGS(argv[:1])  # Parse no flags: absl logging then works as under app.run.
  logging.set_verbosity(logging.INFO)
  import tensorflow as tf  # pylint: disable=g-import-not-at-top
  tf.config.set_visible_devices([], "GPU")  # TF is for data only; leave the accelerators to JAX.
  try:
    train_from_spec(argv[1])
  except stopping.TrainingInterrupted as e:
    logging.error("%s", e)
    return 128 + e.signum
  return 0


if __name__ == "__main__":
  sys.exit(_worker_main(sys.argv))
