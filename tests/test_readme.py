"""Every command and code example in README.md runs, so the README cannot rot.

The set-up block's install and test commands are what CI runs (.ci/run, checked here verbatim). Every
other `python ...` command of the README's bash blocks is run here (the main training command first, so
that evaluate/predict find its workdir; independent commands alongside), with `runs/` moved to a
temporary folder and with shortening options appended (fewer steps, smaller batches): the same command
line, made cheap. Commands that need the
network (tfds download, archives placed by hand) are run too and must fail fast with the clear offline
error. The Python example is executed as it stands.
"""

from __future__ import annotations

import concurrent.futures
import functools
import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from petseg_jax import ablation
from petseg_jax import checkpoint
from petseg_jax import train

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
SHARED = REPO.parent / "shared"

# Appended to a command to make it cheap; the command line itself is the README's.
SHORTEN = {
    "scripts/train.py": ["--config.train.num_train_steps=2", "--config.train.batch_size=4",
                         "--config.train.num_figure_examples=1"],
    "scripts/benchmark.py": ["--batch-size", "2", "--steps", "1", "--warmup", "0", "--skip-finetune",
                             "--set", "data.image_size=64"],
    "scripts/benchmark_suite.py": ["--only", "^infer_fp32$", "--no-keras", "--", "--batch-size", "2",
                                   "--steps", "1", "--warmup", "0", "--set", "data.image_size=64"],
    "scripts/ablate.py": ["--set", "train.num_train_steps=1", "--set", "train.batch_size=4",
                          "--set", "data.image_size=64", "--in-process"],  # And --only its first variant.
}
# README commands that need the network or hand-placed archives: they must fail with this message.
OFFLINE_ERRORS = {
    "--config.data.manual_dir=/path/to/archives": r"images\.tar\.gz",
}


def blocks(language: str) -> list[str]:
  return re.findall(rf"```{language}\n(.*?)```", README.read_text(), flags=re.S)


def readme_commands() -> list[str]:
  lines = [line.strip() for block in blocks("bash") for line in block.splitlines()]
  return [line for line in lines if line.startswith("python scripts/")]


def test_ci_runs_the_readme_setup_and_test_commands():
  setup = blocks("bash")[0].strip().splitlines()
  install, main, test = setup
  ci = (REPO / ".ci" / "run").read_text().splitlines()
  assert install in ci and test in ci
  assert main == "python scripts/train.py --workdir runs/quick"


def test_python_example_runs():
  (snippet,) = blocks("python")
  exec(compile(snippet, "README.md", "exec"), {})


def _run_readme_command(command: str, tmp_path: Path, env: dict[str, str]) -> str | None:
  """Runs one README command made cheap; returns a failure report, or None if it did what it should."""
  argv = shlex.split(command.replace("runs/", f"{tmp_path}/runs/"))
  script = argv[1]
  argv = [sys.executable, *argv[1:], *SHORTEN.get(script, [])]
  if script == "scripts/ablate.py":
    sweep = ablation.load_sweep(REPO / argv[argv.index("--sweep") + 1])
    argv += ["--only", ablation.expand_variants(sweep)[0][0]]
  offline = next((pattern for key, pattern in OFFLINE_ERRORS.items() if key in command), None)
  # The tutorial config trains on tfds' download: offline, that must be the clear error.
  if (script == "scripts/train.py" and "configs/default.py" in command and "data.source" not in command
      and offline is None):
    offline = r"error: tfds dataset \S+ is not prepared in .*cannot be reached"
  result = subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
  output = result.stdout + result.stderr
  if offline is not None:
    ok = result.returncode != 0 and re.search(offline, output) and "Traceback" not in output
  else:
    ok = result.returncode == 0
  return None if ok else f"$ {command}\n(exit {result.returncode})\n{output[-3000:]}"


def test_every_readme_command_runs(tmp_path):
  """Two at a time: the main command (it prepares the bundled sample and trains runs/quick) followed, one by
  one, by those that read and write into runs/quick, alongside the commands that do not use it."""
  if not SHARED.is_dir():
    pytest.skip(f"the README's commands use {SHARED}")
  commands = readme_commands()
  assert len(commands) >= 10, commands
  main = "python scripts/train.py --workdir runs/quick"
  assert commands.count(main) == 1, commands
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2")
  run = functools.partial(_run_readme_command, tmp_path=tmp_path, env=env)
  independent = [c for c in commands if c != main and "runs/quick" not in c]
  dependent = [c for c in commands if c != main and "runs/quick" in c]
  with concurrent.futures.ThreadPoolExecutor(max_workers=2) as pool:
    # One worker runs the main command and then, one by one, those that use its workdir; the other starts
    # on the independent commands at once, and both share what is left of them.
    chain = pool.submit(lambda: [run(main)] + [run(c) for c in dependent])
    failures = list(pool.map(run, independent)) + chain.result()
  failures = [failure for failure in failures if failure]
  assert not failures, "\n\n".join(failures)
  # The quickstart trained what the README says: the bundled real pets, the alpha-0.35 encoder, its step-2
  # checkpoint and evaluation, and both figures (the later commands only add to its workdir).
  quick = tmp_path / "runs" / "quick"
  saved = json.loads((quick / "config.json").read_text())
  assert saved["data"]["source"] == "folder" and saved["model"]["alpha"] == 0.35
  assert checkpoint.available_steps(quick) == [2]
  (record,) = train.read_metrics(quick)
  assert record["step"] == 2 and 0 <= record["eval_miou"] <= 1
  assert (quick / train.FIGURES_DIR / "predictions_step_0000002.png").exists()
  assert (quick / train.FIGURES_DIR / "training_curves.png").exists()
