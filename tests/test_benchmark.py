"""scripts/benchmark.py runs end to end at tiny sizes and ends with its JSON line (no timing assertions)."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import pytest

from petseg_jax import host
from petseg_jax import provenance

REPO_ROOT = Path(__file__).resolve().parents[1]
SCRIPT = REPO_ROOT / "scripts" / "benchmark.py"
BUNDLED_SAMPLE = REPO_ROOT / "petseg_jax" / "assets" / "pets_sample"
TINY = ["--batch-size", "2", "--steps", "1", "--warmup", "0", "--set", "data.image_size=32",
        "--set", "model.alpha=0.35", "--set", "model.decoder_filters=(8,8,8,8)"]
KEYS = ("images_per_sec", "ratio", "step_ms_median", "compile_s", "peak_rss_mb", "device")


def script_env() -> dict[str, str]:
  """This environment without GLIBC_TUNABLES, as a user's shell: the scripts choose their own (host.py)."""
  env = {key: value for key, value in os.environ.items() if key != "GLIBC_TUNABLES"}
  env["TF_CPP_MIN_LOG_LEVEL"] = "3"
  return env


def run_benchmark(*args: str) -> dict:
  proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=300,
                        env=script_env(), cwd=REPO_ROOT)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()
  result = json.loads(lines[-1])
  for key in KEYS:
    assert key in result, key
  return result, lines


def load_benchmark_module():
  spec = importlib.util.spec_from_file_location("benchmark_script", SCRIPT)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_hlo_fingerprint_ignores_source_locations_only():
  fingerprint = load_benchmark_module().hlo_fingerprint

  def compiled_text(fn):
    return jax.jit(fn).lower(jnp.ones((4, 8))).compile().as_text()

  def f(x):
    return jnp.sin(x) * 2.0

  reference = compiled_text(f)
  assert "metadata={" in reference  # There are source locations to ignore.
  # The same program from elsewhere: other op names, stack frames and file/line tables.
  moved = re.sub(r'op_name="[^"]*"', 'op_name="jit(g)/elsewhere"', reference)
  moved = re.sub(r"stack_frame_id=\d+", "stack_frame_id=999", moved)
  moved = moved.replace("\nENTRY", "\n19 {file_name_id=7 function_name_id=14 line=428 end_line=428}\nENTRY", 1)
  assert "\n19 {file_name_id=7" in moved
  assert moved != reference and fingerprint(moved) == fingerprint(reference)

  def f(x):  # pylint: disable=function-redefined  # Same name (HLO module names follow it), other program.
    return jnp.cos(x) * 2.0

  assert fingerprint(compiled_text(f)) != fingerprint(reference)


def test_train(tmp_path):
  # --skip-finetune: compiling the fine-tuning step would double this test's time; it is the same code path
  # with frozen_encoder=False.
  result, lines = run_benchmark("--mode", "train", "--skip-finetune", "--dump-hlo", str(tmp_path), *TINY)
  assert len(lines) > 1  # Human-readable lines come first without --json.
  assert result["mode"] == "train" and result["batch_size"] == 2 and result["image_size"] == 32
  assert result["images_per_sec"] > 0 and result["compile_s"] > 0 and result["peak_rss_mb"] > 0
  assert set(result["variants"]) == {"frozen"} and result["variant"] == "frozen"
  assert result["flops_per_image"] > 0
  assert result["ratio"] is None  # No --compare-keras.
  frozen = result["variants"]["frozen"]
  parts = frozen["first_step_parts_s"]
  assert set(parts) == {"init", "compile", "run"} and all(seconds > 0 for seconds in parts.values())
  assert sum(parts.values()) == pytest.approx(frozen["first_step_s"])
  assert re.fullmatch(r"[0-9a-f]{16}", result["hlo_fingerprint"])
  assert frozen["hlo_fingerprint"] == result["hlo_fingerprint"]
  dumped = Path(frozen["hlo_path"])
  assert dumped == tmp_path / "train_frozen.hlo.txt"
  assert load_benchmark_module().hlo_fingerprint(dumped.read_text()) == result["hlo_fingerprint"]
  # The script restarted itself with the tunables this host benefits from (petseg_jax/host.py), and says so.
  assert result["transparent_huge_pages"] == host.transparent_huge_pages_mode()
  assert result["malloc_tunables"] == ":".join(host.default_tunables())
  assert result["cpu_flags"] == load_benchmark_module().cpu_flags()  # Which host it was (BENCHMARKS.md).


def test_cpu_flags_are_the_matmul_relevant_ones_the_cpu_reports(monkeypatch):
  benchmark = load_benchmark_module()
  reported = {"flags": "fpu sse avx2 avx512f avx512_bf16 amx_tile amx_bf16 sha_ni", "model name": "Some CPU"}
  monkeypatch.setattr(provenance, "cpuinfo_field", reported.get)
  assert benchmark.cpu_flags() == ["avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16"]
  assert provenance.cpu_name() == "Some CPU"
  monkeypatch.setattr(provenance, "cpuinfo_field", lambda name: None)  # No /proc/cpuinfo (macOS).
  assert benchmark.cpu_flags() is None and provenance.cpu_name()


def test_the_train_variant_is_the_first_step_of_the_config():
  benchmark = load_benchmark_module()
  config = benchmark.load_config(benchmark.DEFAULT_CONFIG)
  config.data.image_size, config.model.alpha = 32, 0.35
  assert benchmark.train_variant(config) == "frozen"
  for override in ("model.freeze_encoder=False", "train.unfreeze_after_epochs=0"):
    assert benchmark.train_variant(benchmark.apply_override(config, override)) == "finetune"
  partial = benchmark.apply_override(config, "train.frozen_params=('encoder/(Conv1|bn_Conv1)/.*',)")
  assert benchmark.train_variant(partial) == "partly_frozen"
  more = benchmark.apply_override(config, "train.frozen_params=('encoder/.*','decoder/last/.*')")
  assert benchmark.train_variant(more) == "partly_frozen"  # Not the tutorial's step either.


def test_fine_tuning_against_keras_fine_tuning():
  """--compare-keras times the Keras model in the same step as the JAX side: its encoder trainable when the
  config fine-tunes (a partial freeze has no Keras counterpart, and is refused before anything runs)."""
  result, _ = run_benchmark("--mode", "train", "--compare-keras", "--set", "model.freeze_encoder=False", *TINY)
  assert result["variant"] == result["keras_variant"] == "finetune"
  assert result["keras_images_per_sec"] > 0 and result["ratio"] > 0
  proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "train", "--compare-keras", *TINY, "--set",
                         "train.frozen_params=('encoder/Conv1/.*',)"], capture_output=True, text=True, timeout=300,
                        env=script_env(), cwd=REPO_ROOT)
  assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert "--compare-keras: train.frozen_params=('encoder/Conv1/.*',) freeze other parameters" in proc.stderr


def test_infer_against_keras_json_only_with_profile(tmp_path):
  result, lines = run_benchmark("--mode", "infer", "--compare-keras", "--json", "--profile", "3",
                                "--trace-dir", str(tmp_path), *TINY)
  assert list(tmp_path.glob("infer/**/*.trace.json.gz"))  # --trace-dir keeps the trace.
  assert len(lines) == 1  # --json: the JSON line alone on stdout.
  assert result["mode"] == "infer" and result["images_per_sec"] > 0
  assert result["variables"] == ("tree" if jax.default_backend() == "cpu" else "packed")  # As Predictor does.
  assert result["keras_images_per_sec"] > 0
  assert result["ratio"] == pytest.approx(result["images_per_sec"] / result["keras_images_per_sec"])
  assert 0 < len(result["profile"]) <= 3 and all(row["ms"] >= 0 for row in result["profile"])


def test_infer_with_the_variables_packed_or_as_a_tree_computes_the_same():
  """--variables packed|tree: the same convolutions, fewer or more arguments; --batch-norm separate: the
  BatchNorms' own operations back."""
  packed, _ = run_benchmark("--mode", "infer", "--json", "--variables", "packed", *TINY)
  tree, _ = run_benchmark("--mode", "infer", "--json", "--variables", "tree", *TINY)
  assert (packed["variables"], tree["variables"]) == ("packed", "tree") and tree["images_per_sec"] > 0
  assert tree["hlo_fingerprint"] != packed["hlo_fingerprint"]
  assert tree["flops_per_image"] == pytest.approx(packed["flops_per_image"], rel=1e-3)
  separate, _ = run_benchmark("--mode", "infer", "--json", "--variables", "tree", "--batch-norm", "separate", *TINY)
  assert (tree["batch_norm"], separate["batch_norm"]) == ("folded", "separate")
  assert separate["hlo_fingerprint"] != tree["hlo_fingerprint"]
  assert separate["flops_per_image"] > tree["flops_per_image"]  # Three operations fewer per BatchNorm folded.


def test_input_on_the_bundled_sample():
  result, lines = run_benchmark("--mode", "input", "--batch-size", "8", "--steps", "1",
                                "--set", "data.image_size=32", "--data-dir", str(BUNDLED_SAMPLE), "--json")
  assert len(lines) == 1  # TFDS' messages while preparing the dataset go to stderr with --json.
  assert result["mode"] == "input" and result["images_per_sec"] > 0
  assert result["first_epoch_images_per_sec"] > 0 and result["epoch_images"] % 8 == 0


def test_layers_fast_against_reference():
  result, _ = run_benchmark("--mode", "layers", "--only", "up_0|Conv1|block_1_depthwise", "--json", *TINY)
  assert [row["layer"] for row in result["layers"]] == ["decoder/up_0 conv_transpose", "encoder/Conv1 3x3 s2",
                                                       "encoder/block_1_depthwise s2"]
  for row in result["layers"]:
    assert all(row[f"{impl}_{part}_ms"] > 0 for impl in ("fast", "reference") for part in ("fwd", "fwd_bwd"))


def test_layers_explicit_against_reference():
  result, _ = run_benchmark("--mode", "layers", "--impl", "explicit", "--only", "up_3", "--json", *TINY)
  assert result["conv_impl"] == "explicit"
  [row] = result["layers"]
  assert all(row[f"{impl}_{part}_ms"] > 0 for impl in ("explicit", "reference") for part in ("fwd", "fwd_bwd"))
  assert result["step_ms_median"] == row["explicit_fwd_bwd_ms"]


def test_flops_of_a_program_with_loops_come_from_its_unchunked_twin():
  xla_flops = load_benchmark_module().xla_flops
  x = jnp.ones((4, 64, 64))
  looped = jax.jit(lambda x: jax.lax.map(lambda a: a @ a, x)).lower(x).compile()
  plain = jax.jit(lambda x: jnp.einsum("bij,bjk->bik", x, x)).lower(x).compile()
  assert xla_flops(plain) >= 4 * 2 * 64 ** 3
  assert xla_flops(looped) < xla_flops(plain)  # XLA counts the loop's body once.
  assert xla_flops(looped, looped.as_text(), unchunked=lambda: plain) == xla_flops(plain)
  assert xla_flops(plain, plain.as_text(), unchunked=lambda: looped) == xla_flops(plain)  # No loop: its own count.


def test_op_times_counts_an_accelerators_kernels_once():
  op_times = load_benchmark_module().op_times
  source = {"fusion.1": ("f32[2]", "jit(f)/add"), "convolution.2": ("f32[4]", "jit(f)/conv"),
            "loop_add_fusion.3": ("f32[8]", "jit(f)/add"), "command_buffer_1": ("()", "")}
  events = [
      {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
      {"ph": "M", "name": "process_name", "pid": 7, "args": {"name": "/device:GPU:0 NVIDIA H200"}},
      # The host's launches carry the instruction names too; they must not count.
      {"ph": "X", "name": "fusion.1", "pid": 1, "dur": 900.0},
      {"ph": "X", "name": "loop_add_fusion", "pid": 7, "dur": 1000.0, "args": {"hlo_op": "fusion.1"}},
      {"ph": "X", "name": "sm90_xmma_fprop", "pid": 7, "dur": 1500.0, "args": {"hlo_op": "convolution.2"}},
      {"ph": "X", "name": "cudnn_helper", "pid": 7, "dur": 500.0, "args": {"hlo_op": "convolution.2"}},
  ]
  assert op_times(events, source) == [("convolution.2", 2.0), ("fusion.1", 1.0)]
  # In a CUDA graph, hlo_op is the command buffer: a kernel named after its fusion counts for that fusion.
  graph = [{"ph": "X", "name": "loop_add_fusion_3", "pid": 7, "dur": 300.0, "args": {"hlo_op": "command_buffer_1"}},
           {"ph": "X", "name": "nvjet_sm90_gemm", "pid": 7, "dur": 200.0, "args": {"hlo_op": "command_buffer_1"}}]
  assert op_times(events[:2] + graph, source) == [("loop_add_fusion.3", 0.3), ("command_buffer_1", 0.2)]
  cpu_events = [{"ph": "X", "name": "fusion.1", "pid": 1, "dur": 250.0}]  # XLA:CPU: named after the op.
  assert op_times(cpu_events, source) == [("fusion.1", 0.25)]


def test_layers_against_itself_is_a_clear_error():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "layers", "--impl", "reference"],
                        capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
  assert proc.returncode != 0 and "--mode layers times --impl fast or explicit against reference" in proc.stderr
  assert "Traceback" not in proc.stderr


@pytest.mark.parametrize("args, message", [
    (("--set", "model.alhpa=1.0"), "override 'model.alhpa': model has no field 'alhpa'"),
    (("--batch-size", "0"), "config.train.batch_size=0 must be a positive integer"),
    (("--set", "model.dtype=float8"), "config.model.dtype='float8'"),
    (("--set", "data.image_size=abc"), "override data.image_size='abc': the config's field holds int"),
    (("--set", "oops"), "--set: Override 'oops' must look like section.key=value"),
    (("--set", "data.image_size=None"), "override data.image_size=None: the config's field holds int 128"),
    (("--set", "data.image_size=100"), "config.data.image_size=100 must be a positive multiple of 32"),
    (("--config", "configs/nope.py"), "config file configs/nope.py not found"),
    (("--mode", "input", "--data-dir", "nope"), "--data-dir nope: no such folder"),
    (("--mode", "layers", "--only", "["), "--only '[' is not a regular expression"),
    (("--profile", "-3"), "--profile -3: the number of ops to list must be >= 0"),
    (("--dump-hlo", f"{__file__}/hlo"), f"--dump-hlo {__file__}/hlo lies under {__file__}, which is a file"),
])
def test_bad_settings_are_clear_errors(args, message):
  """Before anything is built or timed: one line naming the value, no traceback, no result."""
  proc = subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=120,
                        cwd=REPO_ROOT)
  assert proc.returncode != 0 and message in proc.stderr, proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr and "images_per_sec" not in proc.stdout


def test_input_batch_larger_than_the_data_is_a_clear_error():
  proc = subprocess.run([sys.executable, str(SCRIPT), "--mode", "input", "--data-dir", str(BUNDLED_SAMPLE),
                         "--batch-size", "64"], capture_output=True, text=True, timeout=300, cwd=REPO_ROOT)
  assert proc.returncode != 0
  message = proc.stderr.strip().splitlines()[-1]
  assert message.endswith(f"--mode input on {BUNDLED_SAMPLE}: its train split has 48 images, fewer than "
                          "--batch-size 64: pass a smaller --batch-size, or --data-dir with more images."), message
  assert "Traceback" not in proc.stderr


SUITE = REPO_ROOT / "scripts" / "benchmark_suite.py"


def run_suite(*args: str) -> subprocess.CompletedProcess:
  return subprocess.run([sys.executable, str(SUITE), *args], capture_output=True, text=True, timeout=300,
                        env=script_env(), cwd=REPO_ROOT)


def test_suite_records_rows_resumes_and_records_failures(tmp_path):
  output = tmp_path / "suite.jsonl"
  proc = run_suite("--suite", "cpu", "--only", "^infer_fp32$", "--no-keras", "--output", str(output), "--", *TINY)
  assert proc.returncode == 0, proc.stderr[-3000:]
  [record] = [json.loads(line) for line in output.read_text().splitlines()]
  assert record["name"] == "infer_fp32" and record["suite"] == "cpu" and record["mode"] == "infer"
  assert record["images_per_sec"] > 0 and record["run_s"] > 0 and record["batch_size"] == 2
  assert record["command"][:3] == ["scripts/benchmark.py", "--mode", "infer"]
  assert "--compare-keras" not in record["command"]
  assert "infer_fp32" in proc.stdout and "img/s" in proc.stdout

  proc = run_suite("--suite", "cpu", "--only", "^infer_", "--no-keras", "--resume", "--output", str(output),
                   "--", *TINY, "--set", "model.alhpa=1.0")
  assert proc.returncode == 1  # infer_bf16 failed on the typo; infer_fp32 was not run again.
  records = [json.loads(line) for line in output.read_text().splitlines()]
  assert [r["name"] for r in records] == ["infer_fp32", "infer_bf16"]
  assert "model has no field 'alhpa'" in records[1]["error"] and records[1]["returncode"] != 0
  assert "skipped (--resume)" in proc.stdout and "FAILED" in proc.stdout


def test_suite_lists_the_gpu_rows():
  proc = run_suite("--suite", "gpu", "--list")
  assert proc.returncode == 0, proc.stderr[-3000:]
  rows = dict(line.split(": ", 1) for line in proc.stdout.strip().splitlines())
  assert {"train_fp32", "train_bf16", "infer_fp32", "infer_bf16", "train_fp32_full_precision"} <= set(rows)
  assert rows["train_fp32_full_precision"].startswith("JAX_DEFAULT_MATMUL_PRECISION=float32 ")
  assert "--impl reference" in rows["train_bf16_reference"] and "--compare-keras" not in rows["train_bf16_reference"]
  assert "--compare-keras" in rows["infer_bf16"] and "model.dtype=bfloat16" in rows["infer_bf16"]
  assert run_suite("--suite", "gpu", "--only", "nothing", "--list").returncode != 0
