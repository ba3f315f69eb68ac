"""Shared pytest fixtures (data). Append new fixtures; keep this file small."""

import contextlib
import os
from pathlib import Path
from typing import Any, Iterator

import jax
from jax.experimental.compilation_cache import compilation_cache
import pytest

# XLA:CPU's earlier code generation, the legacy fusion emitters, for every compile of the suite: in-process and,
# through the environment, in the scripts the tests run. The fine-tuning step of the tests' U-Net compiles in
# 9-13 s of CPU instead of 23-27 s, and test_layers_fast.py runs in 106 s instead of 156 s (2-core Zen 3). The
# operations JAX emits and their semantics are the same; XLA's fusion choices and machine code are not, so two
# programs of one function may differ in their last bits where the default's agree (the packed-state tests say
# where). XLA reads XLA_FLAGS once, when JAX creates its CPU client: hence here, before any test runs. The
# ``users_xla_options`` fixture compiles one program as users do.
SUITE_XLA_FLAGS = "--xla_cpu_use_fusion_emitters=false"
USERS_XLA_OPTIONS = {"xla_cpu_use_fusion_emitters": True}
if SUITE_XLA_FLAGS not in os.environ.get("XLA_FLAGS", "").split():  # xdist workers inherit the main process'.
  os.environ["XLA_FLAGS"] = " ".join(filter(None, [os.environ.get("XLA_FLAGS"), SUITE_XLA_FLAGS]))

SHARED_DIR = Path(__file__).resolve().parents[1].parent / "shared"
PETS_SAMPLE_DIR = SHARED_DIR / "data" / "oxford_iiit_pet_sample"


@pytest.fixture(scope="session", autouse=True)
def tfds_data_dir(tmp_path_factory):
  """A session-private TFDS_DATA_DIR: prepared datasets never land in (or come from) ~/tensorflow_datasets."""
  path = tmp_path_factory.mktemp("tensorflow_datasets")
  old = os.environ.get("TFDS_DATA_DIR")
  os.environ["TFDS_DATA_DIR"] = str(path)
  yield path
  if old is None:
    os.environ.pop("TFDS_DATA_DIR", None)
  else:
    os.environ["TFDS_DATA_DIR"] = old


@contextlib.contextmanager
def jax_settings(settings: dict[str, Any], environment: dict[str, str]) -> Iterator[None]:
  """JAX config ``settings`` in this process and ``environment`` for the scripts the tests run; both restored
  afterwards."""
  old_settings = {name: jax.config.values[name] for name in settings}
  old_environment = {name: os.environ.get(name) for name in environment}
  for name, value in settings.items():
    jax.config.update(name, value)
  os.environ.update(environment)
  try:
    yield
  finally:
    for name, value in old_settings.items():
      jax.config.update(name, value)
    for name, value in old_environment.items():
      if value is None:
        os.environ.pop(name, None)
      else:
        os.environ[name] = value


@pytest.fixture(scope="session")
def workers_temp_dir(tmp_path_factory) -> Path:
  """The session's temp folder, shared by all pytest-xdist workers (each worker's own temp folder lies inside
  it; without xdist, the session's only one)."""
  root = tmp_path_factory.getbasetemp()
  return root.parent if os.environ.get("PYTEST_XDIST_WORKER") else root


@pytest.fixture(scope="session", autouse=True)
def jax_compilation_cache(workers_temp_dir):
  """One persistent compilation cache for the session, in-process and, through the environment, in every
  subprocess: the suite's many tiny runs (and its scripts' runs) compile the same programs again and again.
  One for all xdist workers too: the folder's path is part of every entry's key (JAX puts it into the compile
  options), so the workers' caches in two folders never shared an entry. An entry read while another process
  still writes it fails to decompress, and JAX compiles the program again (with a warning)."""
  path = workers_temp_dir / "jax_cache"
  path.mkdir(exist_ok=True)
  settings = {"jax_compilation_cache_dir": str(path), "jax_persistent_cache_min_compile_time_secs": 0.0,
              "jax_persistent_cache_min_entry_size_bytes": 0}
  environment = {"JAX_COMPILATION_CACHE_DIR": str(path), "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
  with jax_settings(settings, environment):
    compilation_cache.reset_cache()
    yield path
  compilation_cache.reset_cache()


@pytest.fixture(scope="session", autouse=True)
def quick_cpu_compiles():
  """On the CPU, XLA's HLO passes as always but LLVM's code generation at -O0 (JAX's
  ``jax_disable_most_optimizations``), in-process and in the scripts the tests run: the suite's runs are tiny,
  so compiling is most of its time, and -O0 takes about a third off each compile (the fine-tuning step of the
  tests' U-Net: 26 s -> 16 s on a 2-core Zen 3). The programs and their numerics are XLA's as optimized at the
  HLO level; only the machine code is less tuned. Benchmarks and users' runs keep the default."""
  if jax.default_backend() != "cpu":
    yield
    return
  with jax_settings({"jax_disable_most_optimizations": True}, {"JAX_DISABLE_MOST_OPTIMIZATIONS": "1"}):
    yield


@pytest.fixture
def users_xla_options() -> dict[str, Any]:
  """The compiler options that undo ``SUITE_XLA_FLAGS`` for one program (pass them to ``compile``)."""
  return dict(USERS_XLA_OPTIONS)


@pytest.fixture
def users_xla_environment() -> dict[str, str]:
  """This process' environment without ``SUITE_XLA_FLAGS``: a script run in it compiles as users do (at -O0)."""
  flags = [flag for flag in os.environ["XLA_FLAGS"].split() if flag != SUITE_XLA_FLAGS]
  return dict(os.environ, XLA_FLAGS=" ".join(flags))


@pytest.fixture
def default_compiles(users_xla_options) -> Iterator[dict[str, Any]]:
  """XLA's default optimization for one test about compiler options (``quick_cpu_compiles`` set aside): at -O0
  LLVM fuses no multiply-adds, so its numbers are not the default build's. The flag is not part of jit's cache
  key: the in-memory compiled programs are dropped before and after. Yields the compiler options that undo
  ``SUITE_XLA_FLAGS`` (XLA_FLAGS cannot change in a running process): pass them to ``compile``."""
  with jax_settings({"jax_disable_most_optimizations": False}, {}):
    jax.clear_caches()
    yield users_xla_options
  jax.clear_caches()


@pytest.fixture(scope="session", autouse=True)
def float32_matmuls_on_accelerators():
  """On a GPU, float32 matmuls and convolutions in float32, not TF32 (JAX's default there): the parity tests'
  tolerances are float32's. Under TF32 10 of the first 26 layer tests failed on an H200; with
  JAX_DEFAULT_MATMUL_PRECISION=float32 they pass (BENCHMARKS.md, fourth lease). Set in the environment too,
  for the scripts the tests run. The CPU, where CI runs, computes float32 as float32 already: untouched."""
  if jax.default_backend() == "cpu":
    yield
    return
  with jax_settings({"jax_default_matmul_precision": "float32"}, {"JAX_DEFAULT_MATMUL_PRECISION": "float32"}):
    yield


@pytest.fixture(scope="session")
def pets_sample_dir() -> Path:
  """The shared real Oxford-IIIT Pet sample (593 pairs, official layout, read-only); skips if absent."""
  if not PETS_SAMPLE_DIR.is_dir():
    pytest.skip(f"shared Oxford-IIIT Pet sample not found beside the repo ({PETS_SAMPLE_DIR})")
  return PETS_SAMPLE_DIR


# The longest files, measured with --durations on 2 cores (test_train.py alone is over half of one worker's
# time). pytest-xdist's --dist loadfile hands whole files to the workers in collection order (with
# --no-loadscope-reorder; its default orders by number of tests, which sent the 3-test, 5-minute
# test_readme.py last): longest first, so that no long file starts late while the other worker runs out of work.
LONGEST_FILES_FIRST = ("test_train.py", "test_models.py", "test_readme.py", "test_benchmark.py",
                       "test_reliability.py", "test_layers_fast.py", "test_ablate.py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
  rank = {name: i for i, name in enumerate(LONGEST_FILES_FIRST)}
  items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # Stable: tests keep their order in a file.
