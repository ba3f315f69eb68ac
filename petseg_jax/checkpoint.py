"""Orbax checkpoints of a training workdir: the last K, the best by mIoU on the eval split, resume, init-from.

Layout of a workdir::

  config.json              the run's configuration (resume refuses an incompatible one)
  config_before_step_<S>.json  the earlier configuration, when a run resumed at step S with other settings
  checkpoints/<step>/      the last ``train.keep_checkpoints`` checkpoints (periodic + final)
  checkpoints_best/<step>/ the checkpoint with the best mIoU on config.data.eval_split so far
  lock                     held (flock) by the training process using the workdir

A checkpoint holds the host copy of ``{"step", "params", "batch_stats", "opt_state"}``. Orbax writes each
one into a temporary directory and renames it when complete, and lists only completed steps, so a
checkpoint interrupted while being written is never restored (its temporary directory is removed when the
next training process opens the workdir, in ``Checkpointer``; readers leave it). Old checkpoints leave the
same way: renamed into ``trash/`` first, then deleted, so a listed step is always complete.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import logging as std_logging
import os
import shutil
import sys
import traceback
from pathlib import Path
from typing import Any, Iterator

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from petseg_jax import config_files
from petseg_jax import files
from petseg_jax.config_files import CONFIG_FILE

LATEST_DIR = "checkpoints"
BEST_DIR = "checkpoints_best"
LOCK_FILE = "lock"
# Old checkpoints are first renamed into this subdirectory (atomic: a step directory is complete or gone),
# then deleted; a process killed in between leaves only trash, which the next save clears.
TRASH_DIR = "trash"
BEST_METRIC = "eval_miou"

# Config keys that must agree between a run and the checkpoints it resumes: they fix the parameter and
# optimizer-state shapes, or the data order and its batch layout (a resume mid-epoch goes on with the rest of
# the epoch's order: with another example list or shuffle, some images would come twice and others never).
# The seed fixes the initialization, the data order and the dropout masks: resumed with another, a run would
# be neither seed's (and config.json, rewritten on resume, would claim the new one). data.data_dir and
# data.manual_dir may change (the same data moved); so may augmentation, the schedule and the loss (the log
# and config_before_step_<S>.json say so).
RESUME_KEYS = (
    "seed", "model.num_classes", "model.alpha", "model.decoder_filters", "model.freeze_encoder",
    "data.image_size", "data.source", "data.tfds_name", "data.train_split", "data.shuffle_buffer",
    "data.num_synthetic_train", "train.batch_size", "train.frozen_params", "train.unfreeze_after_epochs",
)
# The RESUME_KEYS that fix the parameters' shapes (model.init_from needs them equal too).
PARAMETER_SHAPE_KEYS = ("model.num_classes", "model.alpha", "model.decoder_filters")
# Config keys whose value may change on resume but not cross zero: weight decay switched on or off changes the
# optimizer state's structure (``optax.adamw``'s state has a decay entry that ``optax.adam``'s lacks).
RESUME_SIGN_KEYS = ("train.weight_decay",)


class CheckpointError(ValueError):
  """A checkpoint or workdir that cannot be used; the message says which and what to do."""


def _checkpointed(state: Any) -> dict[str, Any]:
  """The checkpointed part of a TrainState."""
  return {"step": state.step, "params": state.params, "batch_stats": state.batch_stats,
          "opt_state": state.opt_state}


def _state_dict(state: Any) -> dict[str, Any]:
  """The checkpointed part of a TrainState, as host NumPy copies (never views of donated buffers)."""
  return jax.tree.map(lambda x: np.array(x, copy=True), jax.device_get(_checkpointed(state)))


def _check_finite(tree: dict[str, Any], step: int) -> None:
  """Never write a diverged state: a NaN checkpoint would poison every resume."""
  for collection in ("params", "batch_stats"):
    if not all(np.all(np.isfinite(x)) for x in jax.tree.leaves(tree[collection])):
      raise FloatingPointError(
          f"The {collection} at step {step} contain NaN/inf; not saving them. Lower "
          "config.train.learning_rate and resume from the last checkpoint.")


def _manager(directory: Path, *, best: bool, keep: int = 1, read_only: bool = False
             ) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      max_to_keep=None if read_only else 1 if best else keep,
      best_fn=(lambda metrics: metrics[BEST_METRIC]) if best else None,
      best_mode="max",
      keep_checkpoints_without_metrics=not best,
      # Readers neither create nor clean up: evaluating a workdir must not change it. (Orbax's read_only
      # mode does the same but warns on every open.) Writers clean up synchronously first
      # (_remove_leftovers) rather than in Orbax's background thread.
      create=not read_only,
      todelete_subdir=None if read_only else TRASH_DIR,
      # Synchronous writes: the train step donates the state buffers, and a save costs little next to
      # an epoch; the checkpoint is complete when save() returns.
      enable_async_checkpointing=False)
  return ocp.CheckpointManager(directory.absolute(), options=options)


def _empty_trash(directory: Path) -> None:
  shutil.rmtree(directory / TRASH_DIR, ignore_errors=True)


def _remove_leftovers(directory: Path) -> None:
  """Deletes what a killed process left: unfinished saves (never restorable) and unfinished deletions."""
  if directory.is_dir():
    for temporary in ocp.utils.tmp_checkpoints(directory.absolute()):
      shutil.rmtree(temporary.get(), ignore_errors=True)
    _empty_trash(directory)


class Checkpointer:
  """The two managers of a training run: periodic/final (last K) and best by ``eval_miou``."""

  def __init__(self, workdir: str | os.PathLike, keep: int):
    if keep < 1:
      raise CheckpointError(f"config.train.keep_checkpoints={keep}; it must be >= 1.")
    self.workdir = Path(workdir)
    for directory in (LATEST_DIR, BEST_DIR):
      _remove_leftovers(self.workdir / directory)
    self.latest = _manager(self.workdir / LATEST_DIR, best=False, keep=keep)
    self.best = _manager(self.workdir / BEST_DIR, best=True)

  def latest_step(self) -> int | None:
    """The newest completed periodic/final checkpoint's step, or None."""
    return self.latest.latest_step()

  def best_metric(self) -> float | None:
    """The best ``eval_miou`` saved so far, or None."""
    step = self.best.best_step()
    return None if step is None else float(self.best.metrics(step)[BEST_METRIC])

  def save(self, state: Any) -> int:
    """Saves ``state`` (unreplicated) as a periodic/final checkpoint; returns its step."""
    tree = _state_dict(state)
    step = int(tree["step"])
    _check_finite(tree, step)
    if step not in self.latest.all_steps():
      self.latest.save(step, args=ocp.args.StandardSave(tree), force=True)
      _empty_trash(self.workdir / LATEST_DIR)
    return step

  def save_best(self, state: Any, miou: float) -> None:
    """Saves ``state`` as the best checkpoint (call only when ``miou`` beats ``best_metric()``)."""
    tree = _state_dict(state)
    step = int(tree["step"])
    _check_finite(tree, step)
    if step not in self.best.all_steps():
      self.best.save(step, args=ocp.args.StandardSave(tree), metrics={BEST_METRIC: float(miou)},
                     force=True)
      _empty_trash(self.workdir / BEST_DIR)

  def discard_best_after(self, step: int) -> int | None:
    """Deletes a best checkpoint of a step after ``step`` (where a run starts); returns its step or None.

    Such a checkpoint belongs to an attempt that was killed before its next periodic checkpoint (or to an
    earlier run in this workdir, when starting afresh at step 0): the steps after ``step`` are trained
    again, and its mIoU, possibly of another config, must neither stay the bar they have to beat nor be
    what ``--checkpoint best`` restores.
    """
    best = self.best.best_step()
    if best is None or best <= step:
      return None
    for stale in self.best.all_steps():  # At most one (max_to_keep=1); all, to be sure none is left.
      self.best.delete(stale)
    _empty_trash(self.workdir / BEST_DIR)
    return best

  def restore_latest(self, target_state: Any) -> Any:
    """``target_state`` (a TrainState, or its abstract shapes) with the latest checkpoint's values."""
    return _restore_into(self.latest, self.latest.latest_step(), target_state)

  def close(self) -> None:
    """Waits for pending writes and closes both managers."""
    self.latest.close()
    self.best.close()


# What Orbax raises for a checkpoint whose files are missing, truncated or corrupt (from deep inside
# TensorStore), and for one whose tree does not fit the target.
_RESTORE_ERRORS = (ValueError, KeyError, TypeError, OSError)


# Orbax runs a restore's TensorStore reads on an event loop of its own (asyncio_utils.run_sync), and closes it
# as soon as one read fails (asyncio.gather), while TensorStore still runs the others. Each read that ends after
# the loop closed has a TensorStore thread call call_soon_threadsafe on it, and Python reports the
# RuntimeError("Event loop is closed") through sys.unraisablehook; each read that failed too, before, leaves a
# task whose error asyncio logs as "Task exception was never retrieved" when the task is collected. Both are
# tracebacks on stderr after our one-line CheckpointError, until the process exits (closing the manager does not
# stop them), and say nothing more: the restore has failed already. So these two reports, and only these, are
# dropped.
class _DropReadsEndingAfterTheLoop:
  """A ``sys.unraisablehook`` without the reports of reads that end after Orbax closed their loop."""

  def __init__(self, previous: Any):
    self.previous = previous

  def __call__(self, unraisable: Any) -> None:
    late_read = (unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed"
                 and any(frame.name == "call_soon_threadsafe"
                         for frame in traceback.extract_tb(unraisable.exc_traceback)))
    if not late_read:
      self.previous(unraisable)


class _DropUnretrievedReadErrors(std_logging.Filter):
  """Drops asyncio's "Task exception was never retrieved" for a failed TensorStore read (an awaited future)."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    error = record.exc_info[1] if record.exc_info else None
    frames = traceback.extract_tb(error.__traceback__) if error is not None else []
    return not (record.getMessage().startswith("Task exception was never retrieved")
                and bool(frames) and frames[-1].name == "_wrap_awaitable")


def _quiet_failed_reads() -> None:
  """Installs the two filters above (once); called before a restore, as its reads may outlive it."""
  if not isinstance(sys.unraisablehook, _DropReadsEndingAfterTheLoop):
    sys.unraisablehook = _DropReadsEndingAfterTheLoop(sys.unraisablehook)
  asyncio_logger = std_logging.getLogger("asyncio")
  if not any(isinstance(f, _DropUnretrievedReadErrors) for f in asyncio_logger.filters):
    asyncio_logger.addFilter(_DropUnretrievedReadErrors())


def _unreadable(manager: ocp.CheckpointManager, step: int, error: Exception) -> CheckpointError:
  directory = Path(manager.directory) / str(step)
  others = [s for s in manager.all_steps() if s != step]
  return CheckpointError(
      f"Checkpoint {directory} cannot be read: it is damaged or incompletely copied ({type(error).__name__}: "
      f"{error}). Delete that directory to use an earlier checkpoint (other steps here: {others or 'none'}), "
      "or copy it again.")


def _read_raw(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
  """The checkpoint's tree as saved, whatever the model; CheckpointError if its files cannot be read."""
  _quiet_failed_reads()
  try:
    return manager.restore(step, args=ocp.args.StandardRestore())
  except _RESTORE_ERRORS as e:
    raise _unreadable(manager, step, e) from e


def _restore_into(manager: ocp.CheckpointManager, step: int, target_state: Any) -> Any:
  # Only the target's structure, shapes and dtypes count: it may be abstract (``train.abstract_train_state``).
  target = jax.tree.map(lambda x: np.zeros(np.shape(x), getattr(x, "dtype", None) or np.asarray(x).dtype),
                        _checkpointed(target_state))  # (A new state's step is a Python int.)
  _quiet_failed_reads()
  try:
    tree = manager.restore(step, args=ocp.args.StandardRestore(target))
  except _RESTORE_ERRORS as e:
    _read_raw(manager, step)  # A damaged checkpoint is reported as such, not as another model's.
    raise CheckpointError(
        f"Checkpoint {manager.directory / str(step)} does not fit the model/optimizer of this config "
        f"(was it written with a different model.alpha, decoder_filters, freezing or weight_decay?): "
        f"{e}") from e
  # Orbax gives the saved arrays' shapes whatever the target's: another model's checkpoint must not slip in.
  shapes = lambda t: {jax.tree_util.keystr(path): np.shape(x) for path, x in jax.tree_util.tree_leaves_with_path(t)}
  expected, restored = shapes(target), shapes(tree)
  mismatched = sorted(key for key in expected.keys() | restored.keys() if expected.get(key) != restored.get(key))
  if mismatched:
    raise CheckpointError(
        f"Checkpoint {manager.directory / str(step)} does not fit the model/optimizer of this config: "
        + "; ".join(f"{key} is {restored.get(key)} there, {expected.get(key)} here" for key in mismatched[:2])
        + (f" (and {len(mismatched) - 2} more)" if len(mismatched) > 2 else "")
        + ". Was it written with a different model.alpha, decoder_filters or num_classes?")
  return target_state.replace(step=int(tree["step"]), params=tree["params"],
                              batch_stats=tree["batch_stats"], opt_state=tree["opt_state"])


def _checkpoint_root(path: Path) -> Path:
  """A workdir or its checkpoints/ dir → the workdir."""
  return path.parent if path.name in (LATEST_DIR, BEST_DIR) else path


def available_steps(workdir: str | os.PathLike) -> list[int]:
  """Completed periodic/final checkpoint steps of a workdir, ascending (empty if none)."""
  directory = _checkpoint_root(Path(workdir)) / LATEST_DIR
  if not directory.is_dir():
    return []
  with _manager(directory, best=False, read_only=True) as manager:
    return sorted(manager.all_steps())


def best_step(workdir: str | os.PathLike) -> int | None:
  """Step of the best-mIoU checkpoint of a workdir, or None."""
  directory = _checkpoint_root(Path(workdir)) / BEST_DIR
  if not directory.is_dir():
    return None
  with _manager(directory, best=True, read_only=True) as manager:
    return manager.best_step()


def _locate(workdir: str | os.PathLike, which: str | int) -> tuple[ocp.CheckpointManager, int]:
  """The (read-only) manager and step of ``which`` ("latest" | "best" | a step) in a workdir; close the manager.

  ``workdir`` may also be a workdir's checkpoints/ directory, its checkpoints_best/ directory (whose one
  checkpoint, the best, is then also its "latest": ``model.init_from=<run>/checkpoints_best`` means the best),
  or one step's directory (which then wins).
  """
  path = Path(workdir)
  if path.name.isdigit() and path.parent.name in (LATEST_DIR, BEST_DIR):
    path, which = path.parent, int(path.name)
  elif path.name == BEST_DIR and which == "latest":
    which = "best"
  root = _checkpoint_root(path)
  if not root.is_dir():
    raise CheckpointError(f"{root} does not exist; expected the --workdir of a training run.")
  steps, best = available_steps(root), best_step(root)
  have = f"available steps: {steps or 'none'}; best: {best if best is not None else 'none'}"
  if which == "best":
    if best is None:
      way_out = "use --checkpoint latest" if steps else "train the run first"
      raise CheckpointError(f"No best checkpoint in {root / BEST_DIR} (no evaluation finished yet); "
                            f"{way_out}. ({have})")
    return _manager(root / BEST_DIR, best=True, read_only=True), best
  if which == "latest":
    if not steps:
      raise CheckpointError(f"No checkpoint in {root / LATEST_DIR}; is {root} a training workdir? ({have})")
    return _manager(root / LATEST_DIR, best=False, read_only=True), steps[-1]
  try:
    step = int(which)
  except (TypeError, ValueError):
    raise CheckpointError(f"Checkpoint {which!r}: expected 'latest', 'best' or a step number.") from None
  if step in steps:
    return _manager(root / LATEST_DIR, best=False, read_only=True), step
  if step == best:
    return _manager(root / BEST_DIR, best=True, read_only=True), step
  raise CheckpointError(f"No checkpoint for step {step} in {root} ({have}).")


def restore(workdir: str | os.PathLike, which: str | int = "latest", target_state: Any = None) -> Any:
  """Restores checkpoint ``which`` ("latest" | "best" | step) of a workdir into ``target_state``.

  ``target_state`` is a TrainState built for the run's config (``train.create_train_state``, or its shapes:
  ``train.abstract_train_state``); the result is that state with step, params, batch_stats and opt_state from
  the checkpoint.
  """
  manager, step = _locate(workdir, which)
  with manager:
    return _restore_into(manager, step, target_state)


def restore_variables(workdir: str | os.PathLike, which: str | int = "latest"
                      ) -> tuple[dict[str, Any], int]:
  """``({"params", "batch_stats"}, step)`` of a checkpoint, without needing the optimizer.

  For evaluation, prediction and ``model.init_from``: the optimizer state is read raw and dropped, so a
  checkpoint of any freezing/optimizer setting works.
  """
  manager, step = _locate(workdir, which)
  with manager:
    tree = _read_raw(manager, step)
  return {"params": tree["params"], "batch_stats": tree["batch_stats"]}, step


# --- workdir bookkeeping ---------------------------------------------------------------------------------

def config_changes(workdir: str | os.PathLike, config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """``{key: (saved, now)}`` for each config field where ``config`` differs from ``workdir/config.json``.

  Empty if the workdir has no config.json yet. Raises CheckpointError if that file is not valid JSON.
  """
  path = Path(workdir) / CONFIG_FILE
  if not path.exists():
    return {}
  return config_files.differences(config_files.flat_config(_read_config_json(path)),
                                  config_files.flat_config(config_files.config_to_dict(config)))


def _read_config_json(path: Path) -> dict[str, Any]:
  """A run's config.json as a dict; CheckpointError if it is not a JSON object (damaged or hand-edited)."""
  try:
    saved = json.loads(path.read_text())
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise CheckpointError(f"{path} is not valid JSON ({e}); restore it or use a new --workdir.") from e
  if not isinstance(saved, dict):
    raise CheckpointError(f"{path} holds a JSON {type(saved).__name__}, not the run's configuration (an object "
                          "of sections); restore it or use a new --workdir.")
  return saved


def check_resume_config(workdir: str | os.PathLike,
                        config: ml_collections.ConfigDict) -> dict[str, tuple[Any, Any]]:
  """Raises CheckpointError if ``workdir/config.json`` differs from ``config`` in a RESUME_KEYS key, or a
  RESUME_SIGN_KEYS key crosses zero.

  Returns the other differences (``config_changes``): a resume may change them. A workdir with checkpoints
  but no config.json (deleted) is refused too: nothing would say which settings trained them.
  """
  if not (Path(workdir) / CONFIG_FILE).exists():
    raise CheckpointError(
        f"Cannot resume in {workdir}: it holds checkpoints but no {CONFIG_FILE}, so nothing says which "
        f"configuration trained them. Put the run's {CONFIG_FILE} back, or start a new run in another --workdir "
        f"(with --config.model.init_from={workdir} to start from its parameters).")
  changes = config_changes(workdir, config)
  differing = [f"{key}: saved {changes[key][0]!r}, now {changes[key][1]!r}" for key in RESUME_KEYS
               if key in changes]
  positive = lambda value: isinstance(value, (int, float)) and value > 0  # A hand-edited null or "1e-4": not.
  differing += [f"{key}: saved {changes[key][0]!r}, now {changes[key][1]!r} (switched "
                f"{'off' if positive(changes[key][0]) else 'on'}: another optimizer state)"
                for key in RESUME_SIGN_KEYS
                if key in changes and positive(changes[key][0]) != positive(changes[key][1])]
  if differing:
    # model.init_from=<workdir> starts a new run from the parameters only where they fit the new model.
    reshaped = [key for key in PARAMETER_SHAPE_KEYS if key in changes]
    way_out = (f"Use a new --workdir (its parameters do not fit the new {', '.join(reshaped)}, so "
               "model.init_from cannot start from them)." if reshaped else
               f"Use a new --workdir, or --config.model.init_from={workdir} to start a new run from its parameters.")
    raise CheckpointError(
        f"Cannot resume in {workdir}: its checkpoints were trained with a different configuration ("
        + "; ".join(differing) + "). " + way_out)
  return changes


def write_config(workdir: str | os.PathLike, config: ml_collections.ConfigDict,
                 keep_previous_at: int | None = None) -> Path:
  """Writes the run's configuration to ``workdir/config.json`` (human-readable).

  With ``keep_previous_at=S`` (a run resuming at step S with changed settings) the file it replaces is kept
  as ``config_before_step_<S>.json``: config.json alone would claim that the whole run used the new settings.
  """
  path = Path(workdir) / CONFIG_FILE
  kept = path.with_name(f"config_before_step_{keep_previous_at}.json")
  # An existing copy for this step stays: it holds the settings that trained up to the step (a later attempt
  # resumed here too, and what it trained beyond was discarded).
  if keep_previous_at is not None and not kept.exists():
    files.write_atomically(kept, path.read_text())
  files.write_atomically(path, json.dumps(config_files.config_to_dict(config), indent=2, sort_keys=True) + "\n")
  return path


def read_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The configuration a run saved in its workdir (or the workdir above a checkpoints/ dir)."""
  path = _checkpoint_root(Path(workdir)) / CONFIG_FILE
  if not path.exists():
    raise CheckpointError(f"{path} not found: is {workdir} a training workdir?")
  return ml_collections.ConfigDict(_read_config_json(path))


@contextlib.contextmanager
def lock_workdir(workdir: str | os.PathLike) -> Iterator[None]:
  """Holds an exclusive lock on the workdir; a second process using the same workdir gets a clear error.

  flock is released by the kernel when the process dies, so a crashed run leaves no stale lock.
  """
  path = Path(workdir) / LOCK_FILE
  with open(path, "a+") as f:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as e:
      if e.errno not in (errno.EAGAIN, errno.EACCES):
        raise
      f.seek(0)
      owner = f.read().strip() or "unknown"
      raise CheckpointError(
          f"Workdir {workdir} is in use by another training process (pid {owner}). Wait for it to finish, "
          "stop it, or use a different --workdir.") from None
    f.seek(0)
    f.truncate()
    f.write(f"{os.getpid()}\n")
    f.flush()
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)
