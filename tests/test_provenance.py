"""Which code each attempt of a run trained with (petseg_jax.provenance)."""

import json
from pathlib import Path
import subprocess

import jax
import pytest

import petseg_jax
from petseg_jax import metrics_log
from petseg_jax import provenance

REPO_ROOT = Path(__file__).resolve().parents[1]


def _git(repo, *args):
  return subprocess.run(["git", "-C", str(repo), *args], capture_output=True, text=True, check=True).stdout.strip()


def test_git_commit_names_the_checkout_the_package_is_imported_from(tmp_path):
  repo = tmp_path / "checkout"
  package = repo / "petseg_jax"
  package.mkdir(parents=True)
  (package / "__init__.py").write_text("")
  assert provenance.git_commit(package) is None  # Not a git checkout.
  _git(repo, "init", "-q")
  assert provenance.git_commit(package) is None  # No commit yet.
  _git(repo, "add", ".")
  _git(repo, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "first")
  head = _git(repo, "rev-parse", "HEAD")
  assert provenance.git_commit(package) == head
  before = provenance.code_fingerprint(package)
  (package / "__init__.py").write_text("changed = True\n")
  assert provenance.git_commit(package) == head + "-dirty"
  index = (repo / ".git" / "index").stat().st_mtime_ns
  # Two different uncommitted states: the same "-dirty" commit, told apart by the source's fingerprint.
  edited = provenance.code_fingerprint(package)
  (package / "__init__.py").write_text("changed = False\n")
  assert provenance.git_commit(package) == head + "-dirty"
  assert len({before, edited, provenance.code_fingerprint(package)}) == 3
  assert (repo / ".git" / "index").stat().st_mtime_ns == index  # Read only: no index lock taken from a user.
  # A package installed into a folder of another repository (e.g. a venv inside a checkout) is not its code.
  installed = repo / "venv" / "site-packages" / "petseg_jax"
  installed.mkdir(parents=True)
  assert provenance.git_commit(installed) is None


def test_the_record_names_this_code_and_these_libraries():
  record = provenance.attempt_record(7, 356)
  assert record["step"] == 7 and record["train_examples"] == 356 and record["petseg_jax"] == petseg_jax.__version__
  if (REPO_ROOT / ".git").exists():  # A checkout (CI's is a clone); an unpacked copy records None.
    assert record["git_commit"].removesuffix("-dirty") == _git(REPO_ROOT, "rev-parse", "HEAD")
  assert record["code_fingerprint"] == provenance.code_fingerprint() and len(record["code_fingerprint"]) == 16
  assert record["packages"]["jax"] == jax.__version__ and record["packages"]["flax"]
  assert record["num_devices"] == jax.local_device_count() and record["device"] == provenance.device_description()
  json.dumps(record)  # A JSON line.


def test_code_changes_name_what_differs_and_ignore_the_host():
  before = {"petseg_jax": "0.1.0", "git_commit": "a-dirty", "code_fingerprint": "f1",
            "packages": {"jax": "0.10.2", "flax": "0.12.8"}, "host": "one", "device": "cpu: X (2 cores)"}
  assert provenance.code_changes(before, dict(before, host="two", device="gpu: H100 x1")) == []
  assert provenance.code_changes(before, dict(before, code_fingerprint="f2")) == ["code_fingerprint f1 -> f2"]
  now = dict(before, git_commit="b", packages={"jax": "0.11.0", "flax": "0.12.8", "optax": "0.2.8"})
  assert provenance.code_changes(before, now) == ["git_commit a-dirty -> b", "jax 0.10.2 -> 0.11.0",
                                                  "optax None -> 0.2.8"]


def test_record_attempt_appends_and_reports_a_change_of_code(tmp_path):
  def record(step, train_examples):  # As train does: the records read, then this attempt's added.
    return provenance.record_attempt(tmp_path, provenance.read_provenance(tmp_path), step, train_examples)

  assert provenance.recorded_train_examples(provenance.read_provenance(tmp_path)) is None  # Nothing to compare.
  assert record(0, None) == []  # E.g. write_initial_run: no data read.
  assert provenance.recorded_train_examples(provenance.read_provenance(tmp_path)) is None
  assert record(0, 64) == []
  assert record(8, 64) == []  # The same code.
  assert provenance.recorded_train_examples(provenance.read_provenance(tmp_path)) == 64
  path = tmp_path / provenance.PROVENANCE_FILE
  records = provenance.read_provenance(tmp_path)
  assert [r["step"] for r in records] == [0, 0, 8]
  older = dict(records[-1], git_commit="0" * 40, packages=dict(records[-1]["packages"], jax="0.0.1"))
  # A torn last line (a process killed while writing, before this file was rewritten whole) is dropped.
  path.write_text("".join(json.dumps(r) + "\n" for r in (records[0], older)) + '{"step": 1')
  changes = record(16, 64)
  assert changes[0] == f"git_commit {'0' * 40} -> {provenance.git_commit()}"
  assert f"jax 0.0.1 -> {jax.__version__}" in changes
  assert [r["step"] for r in provenance.read_provenance(tmp_path)] == [0, 8, 16]
  path.write_text('not json\n{"step": 0}\n')
  with pytest.raises(metrics_log.MetricsFileError, match=f"{path}, line 1"):
    record(24, 64)


def test_the_fingerprint_follows_file_names_and_contents(tmp_path):
  package = tmp_path / "pkg"
  (package / "sub").mkdir(parents=True)
  (package / "a.py").write_text("x = 1\n")
  (package / "sub" / "b.py").write_text("y = 2\n")
  (package / "notes.txt").write_text("not source")
  before = provenance.code_fingerprint(package)
  (package / "notes.txt").write_text("other notes")  # Only *.py counts.
  assert provenance.code_fingerprint(package) == before
  (package / "sub" / "b.py").rename(package / "sub" / "c.py")  # The same contents, another module.
  renamed = provenance.code_fingerprint(package)
  assert renamed != before
  (package / "a.py").write_text("x = 2\n")
  assert provenance.code_fingerprint(package) not in (before, renamed)


def test_the_recorded_example_count_is_the_latest_attempts_that_read_data():
  records = [{"train_examples": 64}, {"train_examples": None}, {"train_examples": 65}, {}]
  assert provenance.recorded_train_examples(records) == 65  # An import (None) and old records (no key) skipped.
  assert provenance.recorded_train_examples(records[:2]) == 64
  assert provenance.recorded_train_examples([{}, {"train_examples": None}]) is None
