"""Ablation sweeps: expansion and overrides, a tiny sweep end to end, skipping, failures, the report."""

import csv
import json
import math
import os
import re
from pathlib import Path
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from petseg_jax import ablation
from petseg_jax import ablation_report

REPO_ROOT = Path(__file__).resolve().parents[1]
SYNTHETIC = str(REPO_ROOT / "configs" / "synthetic.py")

# A few steps on tiny synthetic images: 8 train examples, batch 4 → 2 steps, one epoch, one evaluation.
TINY = {
    "data.image_size": 32, "data.num_synthetic_train": 8, "data.num_synthetic_eval": 4,
    "train.batch_size": 4, "train.num_epochs": 1, "train.num_figure_examples": 0,
    "train.checkpoint_every_steps": 100, "train.log_every_steps": 1,
}


def write_sweep(path: Path, sweep: dict) -> str:
  path.write_text(f"def get_sweep():\n  return {sweep!r}\n")
  return str(path)


# --- planning (no training) ------------------------------------------------------------------------------

def test_expand_variants_grid_and_seeds():
  sweep = ablation.validate_sweep({
      "seeds": [0, 1], "overrides": {"train.num_epochs": 3},
      "variants": {"a": {"model.freeze_encoder": False}, "b": {}},
      "grid": {"data.image_size": [64, 96], "model.alpha": [0.35]}})
  runs = ablation.expand_runs(sweep)
  assert len(runs) == 2 * 2 * 2
  assert runs[0].variant == "a,image_size=64,alpha=0.35"
  assert runs[0].dirname == "a,image_size=64,alpha=0.35/seed_0"
  assert runs[0].overrides == {"train.num_epochs": 3, "model.freeze_encoder": False,
                               "data.image_size": 64, "model.alpha": 0.35, "seed": 0}
  assert runs[0].variant_overrides == {"model.freeze_encoder": False, "data.image_size": 64,
                                       "model.alpha": 0.35}
  assert [r.seed for r in runs[:2]] == [0, 1]
  grid_only = ablation.expand_runs(ablation.validate_sweep({"grid": {"data.input_range": ["[-1,1]", "[0,1]"]}}))
  assert [r.variant for r in grid_only] == ["input_range=[-1,1]", "input_range=[0,1]"]
  assert [r.dirname for r in grid_only] == ["input_range=_-1,1/seed_0", "input_range=_0,1/seed_0"]


@pytest.mark.parametrize("sweep, message", [
    ({"variants": {}}, "declare 'variants' and/or 'grid'"),
    ({"variants": {"a": {}}, "seeds": []}, "non-empty list of ints"),
    ({"variants": {"a": {}}, "sede": [0]}, "unknown top-level key"),
    ({"grid": {"model.alpha": []}}, "non-empty list"),
    ({"variants": {"a": {"seed": 3}}}, "list the seeds"),
    ({"variants": {"a b": {}, "a_b": {}}}, "same directory"),
])
def test_bad_sweeps_are_explained(sweep, message):
  with pytest.raises(ablation.SweepError, match=message):
    ablation.expand_runs(ablation.validate_sweep(sweep))


def test_apply_overrides_checks_keys_and_types():
  base = ablation.load_config(SYNTHETIC)
  config = ablation.apply_overrides(base, {"model.decoder_filters": [8, 8, 8, 8], "train.learning_rate": 1,
                                           "data.input_range": "[0,1]"})
  assert config.model.decoder_filters == (8, 8, 8, 8)
  assert config.train.learning_rate == 1.0 and isinstance(config.train.learning_rate, float)
  assert base.data.input_range == "[-1,1]"  # The base is not modified.
  with pytest.raises(ablation.SweepError, match=r"model has no field 'freeze_encodr'.*freeze_encoder"):
    ablation.apply_overrides(base, {"model.freeze_encodr": True})
  with pytest.raises(ablation.SweepError, match="override train.num_epochs='ten'"):
    ablation.apply_overrides(base, {"train.num_epochs": "ten"})
  with pytest.raises(ablation.SweepError, match="names a whole section"):
    ablation.apply_overrides(base, {"model": 1})
  # ConfigDict stores None in any field and a bool in an int one (a bool is an int): refused here for numbers,
  # bools and tuples; a string field may be None (documented: model.encoder_weights=None, a random encoder).
  for key, value in (("data.image_size", None), ("model.decoder_filters", None), ("model.freeze_encoder", None),
                     ("train.num_epochs", True), ("train.learning_rate", False)):
    with pytest.raises(ablation.SweepError, match=rf"override {key}={value}: the config's field holds"):
      ablation.apply_overrides(base, {key: value})
  assert ablation.apply_overrides(base, {"model.freeze_encoder": False}).model.freeze_encoder is False
  assert ablation.apply_overrides(base, {"model.encoder_weights": None}).model.encoder_weights is None


def test_unusable_model_values_fail_their_variant_at_planning():
  sweep = ablation.validate_sweep({"variants": {"ok": {}, "zero_width": {"model.alpha": 0.0},
                                                "three_blocks": {"model.decoder_filters": [8, 8, 8]},
                                                "no_such_loss": {"train.loss": "dice2"},
                                                "bad_range": {"data.input_range": "[0,255]"}}})
  errors = {run.variant: error for run, _, error in ablation.plan_runs(SYNTHETIC, sweep)}
  assert errors["ok"] == ""
  assert errors["zero_width"].startswith("variant 'zero_width': config.model.alpha=0.0 must be a positive")
  assert "config.model.decoder_filters=(8, 8, 8) must be 4 positive integers" in errors["three_blocks"]
  assert errors["no_such_loss"].startswith("variant 'no_such_loss': config.train.loss='dice2' is not one of")
  assert errors["bad_range"].startswith("variant 'bad_range': config.data.input_range='[0,255]' is not one of")


def test_an_override_that_changes_nothing_fails_its_variant_at_planning():
  """On a base whose length is num_train_steps, a variant of more epochs alone would train the same steps."""
  quickstart = str(REPO_ROOT / "configs" / "quickstart.py")
  sweep = ablation.validate_sweep({"variants": {
      "epochs": {"train.num_epochs": 30}, "steps": {"train.num_epochs": 30, "train.num_train_steps": -1}}})
  errors = {run.variant: error for run, _, error in ablation.plan_runs(quickstart, sweep)}
  assert errors["epochs"] == ("variant 'epochs': train.num_epochs=30 has no effect: the config sets "
                              "train.num_train_steps=440, which decides the run's length. Override "
                              "train.num_train_steps instead (-1 to train for num_epochs).")
  assert errors["steps"] == ""
  epochs_only = ablation.validate_sweep({"variants": {"epochs": {"train.num_epochs": 30}}})
  assert ablation.plan_runs(SYNTHETIC, epochs_only)[0][2] == ""  # synthetic.py trains for num_epochs.


def test_set_overrides_every_run_and_refuses_to_merge_variants_or_replace_seeds():
  """--set reaches every run, a variant's own value included (the docs' smoke run: --set train.num_epochs=2)."""
  sweep = ablation.validate_sweep({"seeds": [0, 1], "overrides": {"train.num_epochs": 4}, "variants": {
      "short": {"train.learning_rate": 0.01}, "long": {"train.num_epochs": 30, "train.learning_rate": 0.001}}})
  planned = ablation.plan_runs(SYNTHETIC, sweep, {"train.num_epochs": 1})
  assert [(run.variant, config.train.num_epochs, error) for run, config, error in planned] == [
      ("short", 1, ""), ("short", 1, ""), ("long", 1, ""), ("long", 1, "")]
  assert planned[2][0].variant_overrides == {"train.num_epochs": 1, "train.learning_rate": 0.001}  # As it runs.
  with pytest.raises(ablation.SweepError, match=r"Variants 'short' and 'long' resolve to the same configuration.*"
                                                r"--set train.learning_rate, train.num_epochs overrides what tells"):
    ablation.plan_runs(SYNTHETIC, sweep, {"train.learning_rate": 0.1, "train.num_epochs": 1})
  twins = ablation.validate_sweep({"variants": {"a": {"train.learning_rate": 0.01}, "b": {},
                                                "c": {"train.learning_rate": 0.01}}})
  with pytest.raises(ablation.SweepError, match=r"Variants 'a' and 'c' resolve to the same .*Make them differ"):
    ablation.plan_runs(SYNTHETIC, twins)
  with pytest.raises(ablation.SweepError, match=r"--set seed: .*'seeds'"):
    ablation.plan_runs(SYNTHETIC, sweep, {"seed": 5})


def test_only_picks_one_of_the_variants_set_made_the_same(tmp_path, monkeypatch):
  """What the refusal suggests works: --only one of them plans and runs (training stubbed out here)."""
  sweep_file = write_sweep(tmp_path / "sweep.py", {"variants": {
      "short": {"train.learning_rate": 0.01}, "long": {"train.learning_rate": 0.001}}})
  trained = []
  monkeypatch.setattr(ablation, "execute_run", lambda run, *args, **kwargs: trained.append(run.variant)
                      or ablation.RunResult(run, ablation.DONE))
  extra = {"train.learning_rate": 0.1}
  with pytest.raises(ablation.SweepError, match="resolve to the same configuration"):
    ablation.run_sweep(SYNTHETIC, sweep_file, tmp_path / "both", extra_overrides=extra)
  ablation.run_sweep(SYNTHETIC, sweep_file, tmp_path / "one", extra_overrides=extra, only=["long"])
  assert trained == ["long"]


def test_a_variant_that_would_never_unfreeze_fails_at_planning():
  sweep = ablation.validate_sweep({"variants": {"frozen": {}, "unfreeze_after_4": {
      "train.unfreeze_after_epochs": 4}}})
  errors = {run.variant: error for run, _, error in ablation.plan_runs(SYNTHETIC, sweep, {"train.num_epochs": 2})}
  assert errors["frozen"] == ""
  assert errors["unfreeze_after_4"] == (
      "variant 'unfreeze_after_4': train.unfreeze_after_epochs=4 unfreezes the encoder after the run's "
      "train.num_epochs=2: it would stay frozen throughout, a frozen run under another name. Lower "
      "unfreeze_after_epochs or train longer.")
  assert [error for _, _, error in ablation.plan_runs(SYNTHETIC, sweep, {"train.num_epochs": 5})] == ["", ""]


def test_the_encoder_counts_as_trainable_only_if_the_run_unfroze_it():
  config = ablation.apply_overrides(ablation.load_config(SYNTHETIC), {"train.unfreeze_after_epochs": 2})
  before_the_end, never = ablation_report.parameter_counts(config, 3.0), ablation_report.parameter_counts(config, 2.0)
  assert before_the_end["params_frozen"] == 0 and never["params_frozen"] > 0
  assert before_the_end["params_trainable"] == never["params_trainable"] + never["params_frozen"]
  assert ablation_report.parameter_counts(config) == before_the_end  # Length unknown: as planned.


def test_parse_override():
  assert ablation.parse_override("train.num_epochs=3") == ("train.num_epochs", 3)
  assert ablation.parse_override("data.train_split=train[:80%]") == ("data.train_split", "train[:80%]")
  assert ablation.parse_override("model.decoder_filters=(8,8,8,8)") == ("model.decoder_filters", (8, 8, 8, 8))
  with pytest.raises(ablation.SweepError, match="section.key=value"):
    ablation.parse_override("oops")


# --- a tiny sweep, trained -------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
  """2 variants × 2 seeds (+ an unknown key and a bad value), trained in-process; then the report."""
  root = tmp_path_factory.mktemp("sweep")
  sweep = write_sweep(root / "tiny_sweep.py", {
      "seeds": [0, 1], "overrides": TINY,
      "variants": {"flip": {}, "no_flip": {"data.random_flip": False},
                   "unknown_key": {"model.no_such_key": 1},
                   "bad_value": {"data.image_size": 33}}})
  workdir = root / "out"
  logs = []
  results = ablation.run_sweep(SYNTHETIC, sweep, workdir, in_process=True, log=logs.append)
  paths = ablation_report.write_report(workdir)
  return {"sweep": sweep, "workdir": workdir, "results": results, "paths": paths, "logs": logs}


def test_metrics_of_a_run_killed_while_appending_a_record(tmp_path):
  """The half-written last line of a SIGKILLed run is skipped (as train.read_metrics does), so that the
  sweep run again resumes it instead of failing on its status."""
  (tmp_path / ablation.METRICS_FILE).write_text('{"step": 4, "epoch": 1.0}\n{"step": 8, "ep')
  assert ablation.read_metrics(tmp_path) == [{"step": 4, "epoch": 1.0}]
  (tmp_path / ablation.CONFIG_FILE).write_text(json.dumps({"train": {"num_train_steps": 8, "num_epochs": 2}}))
  assert not ablation.training_complete(tmp_path)
  (tmp_path / ablation.METRICS_FILE).write_text('{"step": 4, "epoch": 1.0}\n{"step": 8, "epoch": 2.0}\n')
  assert ablation.training_complete(tmp_path)


def test_a_killed_attempts_time_counts_in_the_runs_wall_time(tmp_path):
  """A sweep process SIGKILLed during an attempt leaves "running" with its start: the attempt's time is its
  start to the last write to train.log (the training's output), added to the earlier attempts' time."""
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  started = time.time() - 100.0
  (tmp_path / ablation.STATUS_FILE).write_text(json.dumps(
      {"status": "running", "attempts": 2, "wall_time_sec": 30.0, "pid": gone.pid, "started": started}))
  (tmp_path / ablation.LOG_FILE).write_text("step 12\n")
  os.utime(tmp_path / ablation.LOG_FILE, (started + 40.0, started + 40.0))
  status = ablation.read_status(tmp_path)
  assert status["status"] == "interrupted" and status["wall_time_sec"] == pytest.approx(70.0)


def test_a_running_status_of_a_process_whose_pid_was_reused_is_no_longer_running(tmp_path):
  """After a restart another process may hold the recorded sweep's pid: its start time says it is not the
  sweep, so the run reads as interrupted (and is resumed) instead of "being trained by another sweep"."""
  mine = {"status": "running", "attempts": 1, "wall_time_sec": 0.0, "pid": os.getpid(), "started": time.time()}
  for pid_start, expected in ((ablation._process_start(os.getpid()), "running"), (1, "interrupted")):
    (tmp_path / ablation.STATUS_FILE).write_text(json.dumps({**mine, "pid_start": pid_start}))
    assert ablation.read_status(tmp_path)["status"] == expected
  assert ablation._process_start(os.getpid()) > 1


def test_a_new_attempt_waits_for_a_killed_sweeps_training_child(tmp_path, monkeypatch):
  """The killed sweep's child (recorded as child_pid) still stops, holding the workdir's lock: the next
  attempt waits for it, and says so if it outlives the wait, instead of failing on the lock."""
  (run, config, _), = ablation.plan_runs(SYNTHETIC, ablation.validate_sweep({"variants": {"a": TINY}}))
  workdir = tmp_path / run.dirname
  workdir.mkdir(parents=True)
  gone = subprocess.Popen([sys.executable, "-c", "pass"])
  gone.wait()
  # Looks like a training child of this run to /proc (the module and workdir in its command line).
  orphan = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)", "petseg_jax.ablation",
                             str(workdir.resolve())])
  unrelated = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
  (workdir / ablation.STATUS_FILE).write_text(json.dumps(
      {"status": "running", "attempts": 1, "wall_time_sec": 0.0, "pid": gone.pid, "started": time.time(),
       "child_pid": orphan.pid}))
  monkeypatch.setattr(ablation, "ORPHAN_WAIT_SEC", 2)
  start = time.monotonic()
  try:
    assert not ablation._trains(unrelated.pid, workdir)  # A reused pid is not waited for.
    result = ablation.execute_run(run, config, SYNTHETIC, tmp_path, in_process=True)
  finally:
    for process in (orphan, unrelated):
      process.kill()
      process.wait()
  assert time.monotonic() - start >= 2
  assert result.status == ablation.FAILED and result.error == (
      f"The training process (pid {orphan.pid}) of an earlier sweep still runs in {workdir} after 2 s; wait for "
      "it to finish or stop it, then run again.")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="prctl(PR_SET_PDEATHSIG) is Linux's")
def test_training_child_is_stopped_when_the_sweep_process_is_killed():
  """A SIGKILLed sweep process must not leave its training child running (it holds the workdir's lock)."""
  parent = subprocess.Popen([sys.executable, "-c", (
      "import subprocess, sys, time; from petseg_jax import ablation\n"
      "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'], "
      "preexec_fn=ablation._stop_with_parent)\n"
      "print(child.pid, flush=True); time.sleep(60)")], stdout=subprocess.PIPE, text=True, cwd=REPO_ROOT)
  child_pid = int(parent.stdout.readline())
  parent.kill()
  parent.wait()
  deadline = time.monotonic() + 10
  while time.monotonic() < deadline:
    try:
      os.kill(child_pid, 0)
    except ProcessLookupError:
      return
    time.sleep(0.1)
  os.kill(child_pid, signal.SIGKILL)
  pytest.fail("the child outlived its killed parent")


def test_a_failed_runs_error_is_its_last_attempts(tmp_path):
  log = tmp_path / ablation.LOG_FILE
  log.write_text(f"\n{ablation.ATTEMPT_HEADER}1 at t\nTraceback ...\nValueError: attempt one's\n"
                 f"\n{ablation.ATTEMPT_HEADER}2 at t\nI1127 train.py:700] epoch 1 (step 16): train loss 1.03\n")
  assert ablation._last_error_line(log) == "I1127 train.py:700] epoch 1 (step 16): train loss 1.03"
  log.write_text(log.read_text() + f"\n{ablation.ATTEMPT_HEADER}3 at t\n")  # Killed before any output.
  assert ablation._last_error_line(log) == ""
  assert ablation._how_it_ended(-signal.SIGKILL) == "killed by SIGKILL (out of memory?)"
  assert ablation._how_it_ended(-signal.SIGSEGV) == "killed by SIGSEGV"
  assert ablation._how_it_ended(1) == "exit code 1"


def _wait_for(predicate, what: str, timeout: float = 240) -> None:
  deadline = time.monotonic() + timeout
  while not predicate():
    if time.monotonic() > deadline:
      pytest.fail(f"timed out waiting for {what}")
    time.sleep(0.2)


def test_a_stopped_sweep_stops_its_training_child_gracefully(tmp_path):
  """A signal to the sweep alone (``kill``, a container runtime) is forwarded to the training child at once,
  which checkpoints and exits; a signal to both (a batch scheduler signalling the whole job) is one request
  (a second would abort the child without its checkpoint). Either way the run resumes from that checkpoint."""
  long_run = {**TINY, "data.num_synthetic_train": 64, "train.num_epochs": 40}
  sweep = write_sweep(tmp_path / "long.py", {"overrides": long_run, "variants": {"long": {}}})
  workdir = tmp_path / "out"
  run_dir = workdir / "long" / "seed_0"
  log = run_dir / ablation.LOG_FILE

  def start_and_signal(pids) -> subprocess.CompletedProcess:
    sweep_process = subprocess.Popen(
        [sys.executable, str(REPO_ROOT / "scripts" / "ablate.py"), f"--config={SYNTHETIC}", f"--sweep={sweep}",
         f"--workdir={workdir}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env={**os.environ, "JAX_PLATFORMS": "cpu"})
    epochs_before = log.read_text().count("train loss") if log.exists() else 0
    _wait_for(lambda: log.exists() and log.read_text().count("train loss") > epochs_before, "an epoch")
    child = ablation.read_status(run_dir)["child_pid"]
    started = time.monotonic()
    for pid, signum in pids(sweep_process.pid, child):
      os.kill(pid, signum)
      time.sleep(0.5)  # Two signals at once to one process may arrive as one.
    out, err = sweep_process.communicate(timeout=ablation.ORPHAN_WAIT_SEC + 60)
    assert time.monotonic() - started < 60, err[-3000:]  # Not the old 60 s before the child heard of it.
    assert not ablation._trains(child, run_dir)  # pylint: disable=protected-access
    return subprocess.CompletedProcess(sweep_process.args, sweep_process.returncode, out, err)

  stopped = start_and_signal(lambda sweep_pid, child: [(sweep_pid, signal.SIGINT)])
  assert stopped.returncode == 130, stopped.stderr[-3000:]
  assert "Stopped by SIGUSR1 after step" in log.read_text()  # stopping.STOP_SIGNAL, from the sweep.
  assert ablation.read_status(run_dir)["status"] == "interrupted"
  first_stop = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())

  stopped = start_and_signal(lambda sweep_pid, child: [(child, signal.SIGTERM), (sweep_pid, signal.SIGTERM)])
  assert stopped.returncode == 130, stopped.stderr[-3000:]
  text = log.read_text()
  assert f"at step {first_stop}." in text  # "Resuming from .../checkpoints at step N."
  assert text.count("Stopped by SIGTERM after step") == 1, text[-3000:]
  second_stop = max(int(p.name) for p in (run_dir / "checkpoints").iterdir() if p.name.isdigit())
  assert second_stop > first_stop
  assert ablation.read_status(run_dir)["status"] == "interrupted"

  # A second Ctrl-C: the sweep kills its child (no checkpoint) rather than leave it running when it exits.
  stopped = start_and_signal(lambda sweep_pid, child: [(sweep_pid, signal.SIGINT), (sweep_pid, signal.SIGINT)])
  assert stopped.returncode == 130, stopped.stderr[-3000:]
  assert ablation.read_status(run_dir)["status"] == "interrupted"


def test_sweep_runs_every_variant_and_reports_failures(tiny_sweep):
  status = {(r.run.variant, r.run.seed): r.status for r in tiny_sweep["results"]}
  assert status == {("flip", 0): "done", ("flip", 1): "done", ("no_flip", 0): "done", ("no_flip", 1): "done",
                    ("unknown_key", 0): "failed", ("unknown_key", 1): "failed",
                    ("bad_value", 0): "failed", ("bad_value", 1): "failed"}
  errors = {r.run.variant: r.error for r in tiny_sweep["results"] if r.status == "failed"}
  assert "model has no field 'no_such_key'" in errors["unknown_key"]
  assert "image_size=33" in errors["bad_value"]  # Failed inside training; the sweep went on.
  workdir = tiny_sweep["workdir"]
  for variant in ("flip", "no_flip"):
    for seed in (0, 1):
      run_dir = workdir / variant / f"seed_{seed}"
      config = json.loads((run_dir / "config.json").read_text())
      assert config["seed"] == seed
      assert config["data"]["random_flip"] == (variant == "flip")
      assert ablation.read_status(run_dir)["status"] == "done"
  # Seeds and flips really change the training.
  losses = {ablation.read_metrics(workdir / v / f"seed_{s}")[-1]["train_loss"]
            for v in ("flip", "no_flip") for s in (0, 1)}
  assert len(losses) == 4
  md = tiny_sweep["paths"]["md"].read_text()
  assert "unknown_key" in md and "no_such_key" in md and "image_size=33" in md
  assert tiny_sweep["paths"]["png"].stat().st_size > 10_000


def test_report_numbers_equal_the_runs_metrics(tiny_sweep):
  workdir = tiny_sweep["workdir"]
  rows = {row["variant"]: row for row in csv.DictReader(open(tiny_sweep["paths"]["csv"]))}
  assert list(rows) == ["flip", "no_flip", "unknown_key", "bad_value"]
  md = tiny_sweep["paths"]["md"].read_text()
  assert "| params trainable / frozen / BatchNorm stats |" in md
  for variant in ("flip", "no_flip"):
    finals = [ablation.read_metrics(workdir / variant / f"seed_{s}")[-1] for s in (0, 1)]
    assert finals[0]["step"] == 2
    for key in ("eval_miou", "eval_iou_pet", "eval_iou_background", "eval_iou_border", "eval_pixel_accuracy"):
      values = [f[key] for f in finals]
      assert float(rows[variant][f"{key}_mean"]) == pytest.approx(np.mean(values), abs=1e-12)
      assert float(rows[variant][f"{key}_std"]) == pytest.approx(np.std(values, ddof=1), abs=1e-12)
    assert rows[variant]["seeds_done"] == "2"
    assert rows[variant]["overrides"] == ("(base)" if variant == "flip" else "data.random_flip=False")
    # Frozen encoder (synthetic.py): the encoder's parameters are frozen; totals as Keras counts them.
    total, trainable, frozen, stats = (int(rows[variant][k]) for k in (
        "params_total", "params_trainable", "params_frozen", "params_batch_stats"))
    assert frozen > 0 and trainable > 0 and stats > 0 and trainable + frozen + stats == total
    # summary.md shows the same three counts.
    (md_row,) = [line for line in md.splitlines() if line.startswith(f"| {variant} |")]
    assert f"| {trainable / 1e6:.2f}M / {frozen / 1e6:.2f}M / {stats / 1e3:.1f}k |" in md_row
    # One evaluation interval (1 epoch): its rate would be mostly compilation; none is shown.
    assert rows[variant]["images_per_sec_mean"] == "" and f"| – | {trainable / 1e6:.2f}M" in md_row
    walls = [ablation.read_status(workdir / variant / f"seed_{s}")["wall_time_sec"] for s in (0, 1)]
    assert float(rows[variant]["wall_time_sec_mean"]) == pytest.approx(np.mean(walls)) and min(walls) > 0
    assert float(rows[variant]["wall_time_sec_total"]) == pytest.approx(sum(walls))
  assert rows["unknown_key"]["seeds_done"] == "0" and rows["unknown_key"]["eval_miou_mean"] == ""
  assert "no_such_key" in rows["unknown_key"]["errors"]


def test_throughput_leaves_out_the_interval_that_compiled():
  records = [{"images_per_sec": 5.0}, {"images_per_sec": 100.0}, {"images_per_sec": None},
             {"images_per_sec": 110.0}]
  assert ablation_report.run_throughput(records) == 105.0
  assert ablation_report.run_throughput(records[:1]) is None and ablation_report.run_throughput([]) is None


def test_rerun_skips_finished_runs(tiny_sweep):
  workdir = tiny_sweep["workdir"]
  metrics = workdir / "flip" / "seed_0" / "metrics.jsonl"
  before = (metrics.read_text(), metrics.stat().st_mtime_ns)
  results = ablation.run_sweep(SYNTHETIC, tiny_sweep["sweep"], workdir, in_process=True, log=lambda _: None)
  assert [r.status for r in results] == ["skipped"] * 4 + ["failed"] * 4
  assert (metrics.read_text(), metrics.stat().st_mtime_ns) == before
  assert ablation.read_status(workdir / "flip" / "seed_0")["attempts"] == 1
  # --only trains a subset; the plan (and so the report) still lists every run.
  results = ablation.run_sweep(SYNTHETIC, tiny_sweep["sweep"], workdir, only=["no_flip"], in_process=True,
                               log=lambda _: None)
  assert [(r.run.variant, r.status) for r in results] == [("no_flip", "skipped")] * 2
  assert len(json.loads((workdir / "sweep.json").read_text())["runs"]) == 8
  with pytest.raises(ablation.SweepError, match="no variant"):
    ablation.run_sweep(SYNTHETIC, tiny_sweep["sweep"], workdir, only=["nope"], in_process=True)


def test_a_resumed_runs_wall_time_adds_its_earlier_attempts(tiny_sweep, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(tiny_sweep["workdir"], workdir)
  run = workdir / "flip" / "seed_0"
  (run / ablation.STATUS_FILE).write_text(json.dumps({"status": "interrupted", "attempts": 1,
                                                      "wall_time_sec": 1000.0}))
  results = ablation.run_sweep(SYNTHETIC, tiny_sweep["sweep"], workdir, only=["flip"], in_process=True,
                               log=lambda _: None)
  assert [r.status for r in results] == ["done", "skipped"]
  status = ablation.read_status(run)
  assert status["attempts"] == 2 and 1000.0 < status["wall_time_sec"] == pytest.approx(results[0].wall_time_sec)


def test_changed_variant_is_not_mixed_with_old_runs(tiny_sweep, tmp_path):
  """A sweep run again with other settings for runs it has trained is refused before anything is written:
  its plan (and so its report) stays the one its runs were trained with."""
  workdir = tmp_path / "copy"
  shutil.copytree(tiny_sweep["workdir"], workdir)
  plan = (workdir / "sweep.json").read_bytes()
  sweep = write_sweep(tmp_path / "changed.py", {
      "seeds": [0], "overrides": {**TINY, "train.learning_rate": 0.01}, "variants": {"flip": {}}})
  with pytest.raises(ablation.SweepError, match=re.escape(
      f"{workdir} holds 1 run(s) of other settings than this command plans, e.g. flip/seed_0 "
      "(train.learning_rate: 0.003 -> 0.01). A sweep's runs keep their settings")):
    ablation.run_sweep(SYNTHETIC, sweep, workdir, in_process=True, log=lambda _: None)
  assert (workdir / "sweep.json").read_bytes() == plan
  # A dry run says so too (it plans what the sweep would run).
  proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ablate.py"), f"--config={SYNTHETIC}",
                         f"--sweep={sweep}", f"--workdir={workdir}", "--dry-run"], capture_output=True, text=True,
                        env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300, check=False)
  assert proc.returncode == 1 and "holds 1 run(s) of other settings" in proc.stderr, proc.stderr[-2000:]
  _, runs = ablation_report.collect_runs(workdir)
  assert [run["status"] for run in runs if run["variant"] == "flip"] == ["done", "done"]
  # Were the settings changed behind the sweep's back (a run directory copied in), the run is still refused.
  other = tmp_path / "other"
  shutil.copytree(tiny_sweep["workdir"] / "flip", other / "flip")
  run, config, _ = ablation.plan_runs(SYNTHETIC, ablation.load_sweep(sweep))[0]
  result = ablation.execute_run(run, config, SYNTHETIC, other, in_process=True)
  assert result.status == "failed" and "different configuration" in result.error


def test_a_finished_run_without_its_spec_is_reported_not_a_traceback(tiny_sweep, tmp_path):
  workdir = tmp_path / "copy"
  shutil.copytree(tiny_sweep["workdir"], workdir)
  (workdir / "flip" / "seed_1" / ablation.RUN_SPEC_FILE).unlink()
  _, runs = ablation_report.collect_runs(workdir)
  run = next(r for r in runs if r["dir"] == "flip/seed_1")
  assert run["status"] == "failed" and f"{workdir / 'flip' / 'seed_1'} and run the sweep again" in run["error"]
  rows = ablation_report.summarize(runs)
  assert rows[0]["seeds_done"] == 1 and "ablation_run.json is missing" in rows[0]["errors"]


def test_cli_subprocess_failure_and_report_only(tiny_sweep, tmp_path):
  """The CLI trains each run in a subprocess: a crashing run is reported, and the exit code says so."""
  # A folder that is not there: planning checks values, not files, so the run's own process fails.
  sweep = write_sweep(tmp_path / "crash.py", {"overrides": TINY, "variants": {
      "crash": {"data.source": "folder", "data.data_dir": "/nonexistent/pets_folder"}}})
  workdir = tmp_path / "out"
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ablate.py"), f"--config={SYNTHETIC}",
                         f"--sweep={sweep}", f"--workdir={workdir}"],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode != 0
  assert "1 of 1 runs failed" in proc.stderr
  status = ablation.read_status(workdir / "crash" / "seed_0")
  assert status["status"] == "failed" and "exit code 1" in status["error"]
  assert "/nonexistent/pets_folder" in status["error"]
  assert "pets_folder" in (workdir / "summary.md").read_text()
  # --report-only rebuilds the report of the trained tiny sweep without training anything.
  (tiny_sweep["workdir"] / "summary.csv").unlink()
  proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ablate.py"), "--report-only",
                         f"--workdir={tiny_sweep['workdir']}"],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 0, proc.stderr[-2000:]
  rows = list(csv.DictReader(open(tiny_sweep["workdir"] / "summary.csv")))
  assert [row["seeds_done"] for row in rows] == ["2", "2", "0", "0"]
  assert not math.isnan(float(rows[0]["eval_miou_mean"]))
  # Planning flags with it would change nothing: refused, not silently ignored.
  proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ablate.py"), "--report-only",
                         f"--workdir={tiny_sweep['workdir']}", "--set", "train.num_epochs=9"],
                        capture_output=True, text=True, env=env, timeout=300, check=False)
  assert proc.returncode == 1 and "drop --set" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr


def test_cli_dry_run_prints_the_plan_and_fails_on_a_run_that_cannot_start(tmp_path):
  sweep = write_sweep(tmp_path / "dry.py", {"overrides": TINY, "variants": {
      "ok": {"data.random_flip": False}, "typo": {"train.learnin_rate": 0.1}}})
  proc = subprocess.run([sys.executable, str(REPO_ROOT / "scripts" / "ablate.py"), f"--config={SYNTHETIC}",
                         f"--sweep={sweep}", f"--workdir={tmp_path / 'out'}", "--dry-run"],
                        capture_output=True, text=True, env={**os.environ, "JAX_PLATFORMS": "cpu"}, timeout=300,
                        check=False)
  assert proc.returncode == 1, proc.stderr[-3000:]
  assert "ok/seed_0: " in proc.stdout and "ERROR: variant 'typo'" in proc.stdout
  assert "1 of 2 planned runs cannot start" in proc.stderr
  assert not (tmp_path / "out").exists()  # Nothing trained or written.
