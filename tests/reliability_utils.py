"""Fault injection for the reliability tests: crash or pause ``scripts/train.py`` at an exact moment.

Not a test module. A child process started with ``cli_env(tmp, fault)`` imports a ``sitecustomize`` that
installs the fault before ``scripts/train.py`` runs, so the command under test is the real one, unchanged:
no test hook lives in the training code. A fault fires once, at the first event that matches:

  "batch"           the training loop takes the batch of step ``step`` (``step - 1`` steps are done);
  "ckpt_created"    Orbax created the temporary directory of checkpoint ``dir/step`` (nothing written yet);
  "ckpt_finalize"   every file of checkpoint ``dir/step`` is written, the atomic rename is next;
  "ckpt_delete"     an old checkpoint ``dir/step`` is being deleted: deleted in place, the files of its
                    arrays are gone; moved away first (Orbax's ``todelete_subdir``), the move is done;
  "metrics_write"   the metrics record of step ``step`` is being appended (half of its line is on disk).

``dir`` is "checkpoints" or "checkpoints_best". The action ``do`` is "kill" (SIGKILL: no handler, no
cleanup, what a preemption or the OOM killer does) or "pause" (write ``ready``, then wait for the file
``go``; the test meanwhile signals the process or starts a second one).
"""

from __future__ import annotations

import collections
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = REPO_ROOT / "scripts" / "train.py"
FAULT_ENV = "PETSEG_TEST_FAULT"
PAUSE_LIMIT_S = 900  # A paused child that is never released exits by itself.

_SITECUSTOMIZE = """\
import os
if os.environ.get({env!r}):
  from tests import reliability_utils
  reliability_utils.install_from_env()
"""


# --- in the child process ---------------------------------------------------------------------------------

class _Fault:
  """One planned fault; ``maybe_fire`` acts at the first matching event."""

  def __init__(self, spec: dict[str, Any]):
    self.spec = spec
    self.fired = False

  def matches(self, event: str, step: int, directory: str | None = None) -> bool:
    spec = self.spec
    return (not self.fired and spec["at"] == event and int(spec["step"]) == step
            and spec.get("dir") in (None, directory))

  def fire(self) -> None:
    self.fired = True
    if self.spec["do"] == "kill":
      sys.stderr.flush()
      os.kill(os.getpid(), signal.SIGKILL)
      time.sleep(60)  # Never reached: SIGKILL cannot be caught.
    elif self.spec["do"] == "pause":
      Path(self.spec["ready"]).write_text(str(os.getpid()))
      deadline = time.monotonic() + PAUSE_LIMIT_S
      while not Path(self.spec["go"]).exists():
        if time.monotonic() > deadline:
          os._exit(99)  # pylint: disable=protected-access
        time.sleep(0.05)  # Signal handlers run between these sleeps.
    else:
      raise ValueError(f"unknown fault action {self.spec['do']!r}")


def _step_of(path: Any) -> tuple[str, int] | None:
  """("checkpoints" | "checkpoints_best", step) of a checkpoint step directory, else None."""
  path = Path(str(path))
  if path.name.isdigit() and path.parent.name in ("checkpoints", "checkpoints_best"):
    return path.parent.name, int(path.name)
  return None


def install(spec: dict[str, Any]) -> None:
  """Patches the training code and Orbax so that ``spec`` fires at its event (see the module docstring)."""
  from orbax.checkpoint._src.path import atomicity  # pylint: disable=g-import-not-at-top
  from orbax.checkpoint._src.path import deleter  # pylint: disable=g-import-not-at-top

  from petseg_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from petseg_jax import metrics_log  # pylint: disable=g-import-not-at-top
  from petseg_jax import parallel  # pylint: disable=g-import-not-at-top

  fault = _Fault(spec)

  # The loop takes its batches from parallel.device_batches, which reads the input PREFETCH_BATCHES steps
  # ahead: the steps of the batches read but not yet taken wait here, in order.
  steps_read: collections.deque[int] = collections.deque()
  epoch_fn, device_batches_fn = input_pipeline.TrainInput.epoch, parallel.device_batches

  def epoch(self, epoch, start_step=0):
    for i, batch in enumerate(epoch_fn(self, epoch, start_step)):
      steps_read.append(epoch * self.steps_per_epoch + start_step + i + 1)
      yield batch

  def device_batches(batches, *args, **kwargs):
    for batch in device_batches_fn(batches, *args, **kwargs):
      if steps_read and fault.matches("batch", steps_read.popleft()):  # Not evaluation's batches.
        fault.fire()
      yield batch

  input_pipeline.TrainInput.epoch = epoch
  parallel.device_batches = device_batches

  rename_path = atomicity.AtomicRenameTemporaryPath
  create_fn, finalize_fn = rename_path.create, rename_path.finalize

  async def create(self):
    result = await create_fn(self)
    where = _step_of(self.get_final())
    if where and fault.matches("ckpt_created", where[1], where[0]):
      fault.fire()
    return result

  async def finalize(self):
    where = _step_of(self.get_final())
    if where and fault.matches("ckpt_finalize", where[1], where[0]):
      fault.fire()
    return await finalize_fn(self)

  rename_path.create, rename_path.finalize = create, finalize

  delete_fn = deleter.PathDeleter.delete

  def delete(self, path, **kwargs):
    where = _step_of(path)
    if not (where and fault.matches("ckpt_delete", where[1], where[0])):
      return delete_fn(self, path, **kwargs)
    if kwargs.get("destination") is not None:
      result = delete_fn(self, path, **kwargs)  # A rename out of the way: atomic; die right after it.
      fault.fire()
      return result
    # In-place deletion under way: the arrays ("default" item) are gone, the step directory is still there.
    for file in sorted(p for p in (Path(str(path)) / "default").rglob("*") if p.is_file()):
      file.unlink()
    fault.fire()

  deleter.PathDeleter.delete = delete

  append_fn = metrics_log.append_record

  def append_jsonl(path, record):
    if fault.matches("metrics_write", int(record["step"])):
      line = json.dumps(record) + "\n"
      with open(path, "a") as f:
        f.write(line[:len(line) // 2])
        f.flush()
        os.fsync(f.fileno())
      fault.fire()
    return append_fn(path, record)

  metrics_log.append_record = append_jsonl


def install_from_env() -> None:
  install(json.loads(os.environ[FAULT_ENV]))


# --- in the test process ----------------------------------------------------------------------------------

def cli_env(tmp_path: Path, fault: dict[str, Any] | None = None, **extra: str) -> dict[str, str]:
  """The environment of a ``scripts/train.py`` child: quiet TensorFlow, and ``fault`` installed if given."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", **extra)
  env.pop(FAULT_ENV, None)
  if fault is not None:
    site_dir = tmp_path / "fault_site"
    site_dir.mkdir(parents=True, exist_ok=True)
    (site_dir / "sitecustomize.py").write_text(_SITECUSTOMIZE.format(env=FAULT_ENV))
    env["PYTHONPATH"] = os.pathsep.join([str(site_dir), str(REPO_ROOT)] + (
        [env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env[FAULT_ENV] = json.dumps(fault)
  return env


def train_command(workdir: Path, *overrides: str, config: str = "configs/synthetic.py") -> list[str]:
  return [sys.executable, str(TRAIN_SCRIPT), "--config", str(REPO_ROOT / config), "--workdir", str(workdir),
          *overrides]


def start(command: list[str], env: dict[str, str], registry: list | None = None) -> subprocess.Popen:
  """Starts a child; ``registry`` (a test's list of children, killed at its end) records it."""
  proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT,
                          env=env)
  if registry is not None:
    registry.append(proc)
  return proc


def run(command: list[str], env: dict[str, str], timeout: float = 600) -> subprocess.CompletedProcess:
  return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env, timeout=timeout)


def finish(proc: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
  stdout, stderr = proc.communicate(timeout=timeout)
  return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, stderr)


def wait_for_file(path: Path, proc: subprocess.Popen, timeout: float = 600) -> None:
  """Waits until ``path`` exists; fails early (with the child's stderr) if the child exits first."""
  deadline = time.monotonic() + timeout
  while not path.exists():
    if proc.poll() is not None:
      _, stderr = proc.communicate()
      raise AssertionError(f"the child exited ({proc.returncode}) before {path.name}:\n{stderr[-4000:]}")
    if time.monotonic() > deadline:
      proc.kill()
      raise AssertionError(f"timed out waiting for {path}")
    time.sleep(0.1)
