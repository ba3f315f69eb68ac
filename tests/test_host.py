"""petseg_jax/host.py: which glibc tunables a script restarts with, and that the restart keeps its arguments."""

from __future__ import annotations

import os
from pathlib import Path
import platform
import subprocess
import sys

import pytest

from petseg_jax import host

REPO_ROOT = Path(__file__).resolve().parents[1]
GLIBC = host.glibc_version() is not None


def test_missing_tunables_keeps_every_tunable_the_environment_names():
  wanted = ["glibc.malloc.hugetlb=1", "glibc.malloc.arena_max=1"]
  assert host.missing_tunables("", wanted) == wanted
  # Named with another value (the documented opt-out): left as the environment says.
  assert host.missing_tunables("glibc.malloc.hugetlb=0", wanted) == ["glibc.malloc.arena_max=1"]
  assert host.missing_tunables("glibc.malloc.arena_max=4:glibc.malloc.hugetlb=1", wanted) == []
  assert host.missing_tunables("glibc.malloc.hugetlb_x=1", wanted) == wanted  # Whole names only.


def test_glibc_version_is_that_of_the_running_c_library():
  if sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc":
    assert host.glibc_version() == tuple(int(part) for part in platform.libc_ver()[1].split(".")[:2])


def test_transparent_huge_pages_mode(tmp_path):
  mode_file = tmp_path / "enabled"
  mode_file.write_text("always [madvise] never\n")
  assert host.transparent_huge_pages_mode(mode_file) == "madvise"
  mode_file.write_text("[always] madvise never\n")
  assert host.transparent_huge_pages_mode(mode_file) == "always"
  mode_file.write_text("garbage\n")
  assert host.transparent_huge_pages_mode(mode_file) is None
  assert host.transparent_huge_pages_mode(tmp_path / "missing") is None


@pytest.mark.parametrize("mode, glibc, expected", [
    ("madvise", (2, 35), True), ("madvise", (2, 34), False), ("madvise", None, False),
    ("always", (2, 35), False), ("never", (2, 35), False), (None, (2, 35), False),
])
def test_default_tunables_ask_for_huge_pages_only_where_the_kernel_needs_asking(monkeypatch, mode, glibc, expected):
  """Huge pages are asked for only where the kernel gives them on request (madvise) and glibc can ask."""
  assert host.MIN_GLIBC == (2, 35)  # The cases' versions sit on either side of it.
  monkeypatch.setattr(host, "transparent_huge_pages_mode", lambda: mode)
  monkeypatch.setattr(host, "glibc_version", lambda: glibc)
  assert host.default_tunables() == ([host.HUGE_PAGES] if expected else [])


def run_restarting(environment_tunables: str | None) -> list[str]:
  """GLIBC_TUNABLES and sys.argv of a child that calls restart_with_tunables, as it ends up."""
  code = ("import os, sys; from petseg_jax import host; "
          "host.restart_with_tunables(['glibc.malloc.hugetlb=1']); "
          "print(os.environ.get('GLIBC_TUNABLES', '')); print(sys.argv[1:])")
  env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  env["PYTHONPATH"] = os.pathsep.join([str(REPO_ROOT), *filter(None, [env.get("PYTHONPATH")])])
  if environment_tunables is not None:
    env["GLIBC_TUNABLES"] = environment_tunables
  proc = subprocess.run([sys.executable, "-c", code, "first", "--second=2"], capture_output=True, text=True,
                        env=env, timeout=60, check=True)
  return proc.stdout.splitlines()


@pytest.mark.skipif(not GLIBC, reason="glibc tunables need glibc")
def test_restart_adds_the_tunable_and_keeps_the_arguments():
  assert run_restarting(None) == ["glibc.malloc.hugetlb=1", "['first', '--second=2']"]
  assert run_restarting("glibc.malloc.arena_max=2") == ["glibc.malloc.arena_max=2:glibc.malloc.hugetlb=1",
                                                        "['first', '--second=2']"]


@pytest.mark.skipif(not GLIBC, reason="glibc tunables need glibc")
def test_restart_leaves_a_tunable_the_user_set():
  assert run_restarting("glibc.malloc.hugetlb=0") == ["glibc.malloc.hugetlb=0", "['first', '--second=2']"]


def test_the_collector_is_frozen_after_the_other_exit_handlers():
  """Handlers registered later (absl's, Orbax's, TensorFlow's at import) run first, on a live collector; the
  freeze comes last, and an output written just before the exit still arrives."""
  code = ("import atexit, gc\n"
          "atexit.register(lambda: print('registered before, frozen:', gc.get_freeze_count() > 0))\n"
          "from petseg_jax import host\n"
          "host.skip_collection_at_exit()\n"
          "atexit.register(lambda: print('registered after, frozen:', gc.get_freeze_count() > 0))\n"
          "print('main done', end='')\n")
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO_ROOT, timeout=60,
                        check=True)
  assert proc.stdout.splitlines() == ["main doneregistered after, frozen: False", "registered before, frozen: True"]
