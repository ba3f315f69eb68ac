"""One tiny trained workdir shared by the evaluate and predict tests (trained once per pytest session).

Not a test module: ``test_evaluate.py`` and ``test_predict.py`` each wrap ``trained_workdir`` in a
session-scoped fixture; the run is trained under pytest's session temp dir the first time and reused after
(a module-level fixture would train once per test file).
"""

from __future__ import annotations

import fcntl
import os
from pathlib import Path
import subprocess
import sys

from configs import synthetic
from petseg_jax import train

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPTS = REPO_ROOT / "scripts"

# 8 synthetic 32x32 training images, batch 4 → 2 steps per epoch, 2 epochs: evaluations and checkpoints at
# steps 2 and 4. 6 eval images: the second eval batch is padded.
NUM_EVAL = 6
STEPS = (2, 4)


def tiny_config():
  config = synthetic.get_config()
  config.data.image_size = 32
  config.data.num_synthetic_train = 8
  config.data.num_synthetic_eval = NUM_EVAL
  config.train.batch_size = 4
  config.train.num_train_steps = STEPS[-1]
  config.train.checkpoint_every_steps = 2
  config.train.log_every_steps = 1
  config.train.num_figure_examples = 0
  return config


def trained_workdir(root: Path) -> Path:
  """The workdir of ``tiny_config()`` trained to its last step, in ``root`` (trained on first use).

  ``root`` is the session's temp folder shared by the pytest-xdist workers (conftest's ``workers_temp_dir``):
  the run is trained under a file lock there, so that the workers' test files share one run rather than
  train one each."""
  workdir = root / "tiny_trained_run"
  with open(root / "tiny_trained_run.lock", "a") as lock:
    fcntl.flock(lock, fcntl.LOCK_EX)  # Released when the file closes.
    if not (workdir / train.METRICS_FILE).exists() or len(train.read_metrics(workdir)) < len(STEPS):
      train.train_and_evaluate(tiny_config(), workdir)
  return workdir


def run_scripts(*commands: tuple, timeout: float = 300) -> list[subprocess.CompletedProcess]:
  """Runs each ``(script name, *args)`` of ``scripts/`` concurrently with this Python; text outputs."""
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  procs = [(subprocess.Popen([sys.executable, str(SCRIPTS / name), *map(str, args)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, cwd=REPO_ROOT, env=env), (name, *args))
           for name, *args in commands]
  results = []
  for proc, command in procs:
    stdout, stderr = proc.communicate(timeout=timeout)
    results.append(subprocess.CompletedProcess(command, proc.returncode, stdout, stderr))
  return results

