"""Benchmarks training, inference and the input pipeline, optionally against the Keras tutorial model.

    python scripts/benchmark.py --mode train|infer|input|layers [--batch-size 64] [--steps 10] [--warmup 2]
        [--config configs/default.py] [--set model.dtype=bfloat16 ...] [--compare-keras] [--json]

By default it runs the tutorial model (configs/default.py: MobileNetV2 alpha 1.0, 128x128, frozen encoder,
batch 64) with random weights on one fixed synthetic host batch, fed to every step as the training loop feeds
its batches (``parallel.device_batches``: put on the device two steps ahead; the input pipeline is timed on its
own by ``--mode input``). Every rate is the median over ``--steps`` timed steps after ``--warmup`` untimed ones.

* ``train``: the project's real ``train.train_step`` (``train.pmapped_train_step`` on the state as
  ``parallel.replicate_state`` gives it, packed on accelerators, as the loop uses it) with the encoder frozen
  and, unless ``--skip-finetune``, fine-tuning the whole network; time to the first finished step
  (initialization and compilation included); FLOPs per image from XLA's cost analysis.
* ``infer``: the jitted ``model.apply(train=False)`` as ``prediction.Predictor`` runs it (BatchNorm folded into the
  convolutions, ``--batch-norm separate`` not; on accelerators the variables packed into one buffer per
  dtype, ``--variables packed|tree`` chooses).
* ``input``: ``input_pipeline.TrainInput`` on real JPEGs (``--data-dir``, default the shared Oxford-IIIT
  Pet sample beside the repo, else the bundled one): the first epoch (decode + resize + cache) and later,
  cached epochs. The folder is prepared into a temporary tfds data dir, so the first epoch is a cold one.
* ``layers``: forward and forward+backward time of each distinct convolution of the model that has a fast
  formulation (``petseg_jax.models.layers``), "fast" against "reference", at the configured batch size.
* ``--compare-keras``: the tutorial's Keras model (TensorFlow backend; ``KERAS_BACKEND=jax`` where TensorFlow
  is absent) at the same batch and image size in the same process: ``model.fit`` for ``train`` (the encoder
  frozen as the tutorial's, or trainable where the config fine-tunes from the first step: ``variant`` and
  ``keras_variant`` in the JSON; a ``train.frozen_params`` freezing other than exactly the encoder has no Keras
  counterpart and is refused), the compiled call (``tf.function``; ``jax.jit`` of ``stateless_call`` on JAX)
  for ``infer``.

Each compiled program (``train``: per variant; ``infer``) is reported with ``hlo_fingerprint``, a hash of its
optimized HLO without source locations: two code versions with equal fingerprints compile to the same
program, and an A/B between them measures only the machine. ``--dump-hlo DIR`` writes the HLO texts to diff.

Human-readable lines go to stdout (stderr with ``--json``); the last stdout line is always one JSON object.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import hashlib
import itertools
import json
import os
import re
import resource
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

REPO_ROOT = Path(__file__).resolve().parents[1]
# Config files import their base as `from configs import default`: make the repo root importable.
sys.path.insert(0, str(REPO_ROOT))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":  # Before JAX and TensorFlow load: glibc reads its tunables at start-up only.
  host.restart_with_tunables()
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp
import ml_collections
import numpy as np

from petseg_jax import ablation
from petseg_jax import config_files
from petseg_jax import files
from petseg_jax import freezing as freezing_lib
from petseg_jax.data import settings as data_settings
from petseg_jax import models
from petseg_jax.models import layers
from petseg_jax.models.layers import IMPLS
from petseg_jax import parallel
from petseg_jax import provenance

DEFAULT_CONFIG = config_files.DEFAULT_CONFIG
SHARED_SAMPLE = REPO_ROOT.parent / "shared" / "data" / "oxford_iiit_pet_sample"
BUNDLED_SAMPLE = REPO_ROOT / "petseg_jax" / "assets" / "pets_sample"
MODES = ("train", "infer", "input", "layers")

_log_stream = sys.stdout


def log(message: str) -> None:
  print(message, file=_log_stream, flush=True)


# --- configuration ---------------------------------------------------------------------------------------


def load_config(path: str | os.PathLike) -> ml_collections.ConfigDict:
  """``get_config()`` of a config file (as ``ml_collections.config_flags`` would load it)."""
  try:
    return config_files.load_config(path)
  except config_files.ConfigFileError as e:
    raise SystemExit(f"--config {path}: {e}") from e


def apply_override(config: ml_collections.ConfigDict, assignment: str) -> ml_collections.ConfigDict:
  """``config`` with ``--set a.b=value`` applied as the ablation runner applies overrides (the value a Python
  literal when it is one, else a string; unknown keys and ill-typed values exit naming them)."""
  try:
    key, value = ablation.parse_override(assignment)
  except ablation.SweepError as e:
    raise SystemExit(f"--set: {e} E.g. --set model.dtype=bfloat16.") from e
  try:
    return ablation.apply_overrides(config, {key: value}, where="--set")
  except ablation.SweepError as e:
    raise SystemExit(str(e)) from e


def check_benchmark_config(config: ml_collections.ConfigDict) -> None:
  """Exits naming the value if the config cannot build the model or its batches (the model and data checks
  of ``config_checks.validate_config``, without its training settings, which the benchmark does not all use)."""
  try:
    models.check_model_config(config.model)
    data_settings.check_data_config(config.data)
  except ValueError as e:  # DataError is one.
    raise SystemExit(f"--config/--set: {e}") from e
  batch = config.train.batch_size
  if not isinstance(batch, int) or batch < 1:
    raise SystemExit(f"--batch-size / config.train.batch_size={batch!r} must be a positive integer.")


def train_variant(config: ml_collections.ConfigDict) -> str:
  """The training step ``config`` starts with: "frozen" (exactly the encoder, the tutorial's), "partly_frozen"
  (``train.frozen_params`` freeze other parameters: part of the encoder, or more than it) or "finetune" (nothing
  frozen from the first step)."""
  from petseg_jax import optim, train  # pylint: disable=g-import-not-at-top
  if not config.model.freeze_encoder or config.train.unfreeze_after_epochs == 0:
    return "finetune"
  # Which parameters freeze follows from their paths: the shapes suffice, nothing is initialized.
  shapes = models.variable_shapes(train.create_model(config), config.data.image_size)
  labels = optim.param_labels(shapes["params"], config.train.frozen_params)
  beyond_encoder = any(label == optim.FROZEN for name, subtree in labels.items() if name != "encoder"
                       for label in jax.tree.leaves(subtree))
  return "frozen" if optim.covers_subtree(labels, "encoder") and not beyond_encoder else "partly_frozen"


def benchmark_config(args: argparse.Namespace) -> ml_collections.ConfigDict:
  """The config file with the benchmark's defaults (synthetic data, random weights) and ``--set``s."""
  config = load_config(args.config)
  config.data.source = "synthetic"
  config.model.encoder_weights = ""  # Speed does not depend on the values; nothing to download or read.
  if args.batch_size is not None:
    config.train.batch_size = args.batch_size
  for assignment in args.set:
    config = apply_override(config, assignment)
  if args.impl:
    config.model.conv_impl = args.impl
  check_benchmark_config(config)
  return config


# --- measuring -------------------------------------------------------------------------------------------


def peak_rss_mb() -> float:
  """Peak resident set size of this process so far (Linux reports KiB, macOS bytes)."""
  peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
  return peak / (1024 * 1024) if sys.platform == "darwin" else peak / 1024


def peak_device_memory_mb() -> float | None:
  """Peak memory in use on the first accelerator so far (None on CPU, where peak_rss_mb says it)."""
  device = jax.local_devices()[0]
  stats = device.memory_stats() if device.platform != "cpu" else None
  return stats["peak_bytes_in_use"] / 2**20 if stats and "peak_bytes_in_use" in stats else None


def load_average() -> float | None:
  try:
    return round(os.getloadavg()[0], 2)
  except OSError:
    return None


# The instruction sets that set this model's speed on a CPU: AVX-512 for float32 matmuls, AVX512-BF16 and AMX
# for bfloat16 ones. The CI hosts differ (BENCHMARKS.md: bfloat16 matmuls ran at about 4x the float32 rate
# on one with AMX, 2x on one with AVX512-BF16 only), so each result says which it had.
MATMUL_CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_fp16", "amx_tile", "amx_bf16")


def cpu_flags() -> list[str] | None:
  """Which of ``MATMUL_CPU_FLAGS`` the CPU reports (/proc/cpuinfo), or None where that is unknown."""
  flags = provenance.cpuinfo_field("flags")
  return None if flags is None else [f for f in MATMUL_CPU_FLAGS if f in flags.split()]


def time_steps(step: Callable[[], Any], warmup: int, steps: int) -> tuple[list[float], list[float]]:
  """Wall and process CPU seconds of each of ``steps`` calls after ``warmup`` calls.

  ``step`` must block until its result exists. CPU time (all threads of this process) is reported beside
  wall time because it is much less sensitive to other processes sharing the cores.
  """
  for _ in range(warmup):
    step()
  walls, cpus = [], []
  for _ in range(steps):
    start, cpu_start = time.perf_counter(), time.process_time()
    step()
    walls.append(time.perf_counter() - start)
    cpus.append(time.process_time() - cpu_start)
  return walls, cpus


def summarize(times: tuple[list[float], list[float]], batch_size: int) -> dict[str, float]:
  walls, cpus = times
  median = statistics.median(walls)
  return {"step_ms_median": 1e3 * median, "step_ms_min": 1e3 * min(walls), "step_ms_max": 1e3 * max(walls),
          "images_per_sec": batch_size / median, "cpu_ms_median": 1e3 * statistics.median(cpus)}


def xla_flops(compiled: Any, hlo_text: str = "", unchunked: Callable[[], Any] | None = None) -> float | None:
  """FLOPs of a compiled computation according to XLA's cost analysis (None if it gives none).

  The analysis counts a loop's body once: where the program's ``hlo_text`` has loops (the batch chunks of
  ``layers.conv_transpose_3x3s2``), ``unchunked()`` compiles the same computation without them
  (inside ``layers.unchunked``) for the count.
  """
  if unchunked is not None and re.search(r"\bwhile\(", hlo_text):
    with layers.unchunked():
      compiled = unchunked()
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except  # Some backends do not implement it.
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else None
  if not analysis or "flops" not in analysis:
    return None
  return float(analysis["flops"])


# Source locations in optimized HLO text: each op's ``metadata={...}`` (op names, file and line) and the
# module's stack-frame tables. They change when code moves without changing what is computed.
_HLO_METADATA = re.compile(r', metadata=\{(?:[^{}"]|"(?:[^"\\]|\\.)*")*\}')
_HLO_COMPUTATION_LINE = re.compile(r"^(?:HloModule |ENTRY |%|\s+(?:ROOT )?%|\})")


def hlo_fingerprint(hlo_text: str) -> str:
  """A short hash of optimized HLO text that ignores source locations (equal for the same program)."""
  lines = [_HLO_METADATA.sub("", line) for line in hlo_text.splitlines() if _HLO_COMPUTATION_LINE.match(line)]
  return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:16]


def record_program(stats: dict[str, Any], compiled: Any, name: str, args: argparse.Namespace) -> str:
  """Puts the compiled program's ``hlo_fingerprint`` into ``stats``; writes its HLO under ``--dump-hlo``.

  Returns the HLO text, which ``profile_ops`` reuses.
  """
  hlo_text = compiled.as_text()
  stats["hlo_fingerprint"] = hlo_fingerprint(hlo_text)
  if args.dump_hlo:
    path = Path(args.dump_hlo) / f"{name}.hlo.txt"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(hlo_text)
    stats["hlo_path"] = str(path)
  return hlo_text


def trace_subdir(args: argparse.Namespace, name: str) -> str:
  """Where ``--profile`` keeps the trace of program ``name``: under ``--trace-dir``, or "" (not kept)."""
  return str(Path(args.trace_dir) / name) if args.trace_dir else ""


def profile_ops(step: Callable[[], Any], hlo_text: str, top: int, trace_dir: str = "") -> list[dict[str, Any]]:
  """Runs ``step`` once under the JAX profiler; the ``top`` XLA ops by time, named by their JAX source op.

  Independent ops may run concurrently on XLA:CPU, so the times of one step can add up to more than its
  wall time; use them to rank, not to sum. ``trace_dir``: keep the trace there (for Perfetto or XProf)
  instead of in a temporary directory.
  """
  import glob
  import gzip

  source = {}
  for line in hlo_text.splitlines():
    match = re.match(r"\s*(?:ROOT )?%([\w.\-]+) = (\S+) ", line)
    if match:
      op_name = re.search(r'op_name="([^"]*)"', line)
      source[match.group(1)] = (match.group(2), op_name.group(1) if op_name else "")
  with contextlib.ExitStack() as stack:
    directory = trace_dir or stack.enter_context(tempfile.TemporaryDirectory(prefix="benchmark_trace_"))
    with jax.profiler.trace(directory, create_perfetto_trace=True):
      step()
    trace_file = max(glob.glob(f"{directory}/**/*.trace.json.gz", recursive=True), key=os.path.getmtime)
    with gzip.open(trace_file) as f:
      events = json.load(f)["traceEvents"]
  if trace_dir:
    log(f"profiler trace: {trace_file}")
  rows = []
  for name, ms in op_times(events, source)[:top]:
    shape, op_name = source[name]
    rows.append({"op": name, "ms": round(ms, 3), "shape": shape, "source": op_name})
    log(f"  {ms:8.2f} ms  {name[:28]:28s} {shape[:34]:34s} {op_name[-90:]}")
  return rows


def op_times(events: list[dict[str, Any]], source: dict[str, Any]) -> list[tuple[str, float]]:
  """Milliseconds per HLO instruction in a profiler trace's events, most expensive first.

  On XLA:CPU an op's event is named after its HLO instruction. On a GPU the device's events are kernels,
  with the instruction in ``args["hlo_op"]``, and the host's launch events carry the same name: where the
  trace has a GPU/TPU device, only that device's events count. Inside a CUDA graph ``hlo_op`` names the
  whole command buffer, so a kernel named after its fusion (``loop_add_fusion_3`` for
  ``loop_add_fusion.3``) counts for that fusion.
  """
  import collections

  devices = {event["pid"] for event in events if event.get("ph") == "M" and event.get("name") == "process_name"
             and re.search(r"/device:(GPU|TPU)", str(event.get("args", {}).get("name", "")))}
  totals: dict[str, float] = collections.defaultdict(float)
  for event in events:
    if event.get("ph") != "X" or (devices and event.get("pid") not in devices):
      continue
    kernel = event["name"]
    for name in (kernel, re.sub(r"_(\d+)$", r".\1", kernel), event.get("args", {}).get("hlo_op")):
      if name in source:
        totals[name] += event["dur"] / 1e3
        break
  return sorted(totals.items(), key=lambda item: -item[1])


def matmul_peak_gflops(dtype: Any = jnp.float32, size: int = 4096, repeats: int = 3) -> float:
  """The machine's matmul rate: best of ``repeats`` jitted ``size``^3 ``jnp.dot``s (float32 accumulation)."""
  a = jnp.ones((size, size), dtype)
  dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
  jax.block_until_ready(dot(a, a))
  best = min(time_steps(lambda: jax.block_until_ready(dot(a, a)), 0, repeats)[0])
  return 2 * size ** 3 / best / 1e9


def synthetic_batch(batch_size: int, image_size: int, num_classes: int, seed: int = 0
                    ) -> dict[str, np.ndarray]:
  rng = np.random.default_rng(seed)
  return {"image": rng.uniform(-1, 1, (batch_size, image_size, image_size, 3)).astype(np.float32),
          "mask": rng.integers(0, num_classes, (batch_size, image_size, image_size)).astype(np.int32)}


# --- JAX -------------------------------------------------------------------------------------------------


def random_variables(model: Any, image_size: int, seed: int = 0) -> dict[str, Any]:
  """Variables of ``model`` with He-normal kernels and identity BatchNorm, made on the host.

  ``jax.eval_shape`` gives the variable tree without compiling ``model.init`` (which takes longer to
  compile than the model's forward pass); speed does not depend on the values as long as they are finite.
  """
  shapes = jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0),
                          jnp.zeros((1, image_size, image_size, 3), jnp.float32))
  rng = np.random.default_rng(seed)

  def make(path, leaf):
    name = jax.tree_util.keystr(path)
    if "kernel" in name:
      fan_in = int(np.prod(leaf.shape[:-1])) if "depthwise" not in name else 9
      return jnp.asarray(rng.normal(0.0, np.sqrt(2.0 / fan_in), leaf.shape), leaf.dtype)
    one = "scale" in name or "var" in name
    return jnp.full(leaf.shape, 1.0 if one else 0.0, leaf.dtype)

  return jax.tree_util.tree_map_with_path(make, shapes)


def bench_train(config: ml_collections.ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
  """Frozen-encoder (and fine-tuning) train steps of ``petseg_jax.train``, pmapped as the loop does."""
  from petseg_jax import train

  batch_size, size = config.train.batch_size, config.data.image_size
  num_devices = jax.local_device_count()
  if batch_size % num_devices:
    raise SystemExit(f"--batch-size {batch_size} must be divisible by the {num_devices} local devices.")
  host_batch = synthetic_batch(batch_size, size, config.model.num_classes)
  # A host batch split over the local devices, put on them for every step as the training loop puts its
  # batches (the transfer is real: a new device copy per step).
  host_batch = {k: v.reshape((num_devices, batch_size // num_devices) + v.shape[1:])
                for k, v in host_batch.items()}
  results: dict[str, Any] = {}
  # A config that unfreezes at step 0 trains everything from the first step: the fine-tuning variant.
  first = train_variant(config)
  variants = [(first, True)] if first != "finetune" else []
  if not args.skip_finetune or not variants:
    variants.append(("finetune", False))
  for name, frozen in variants:
    variant_config = ml_collections.ConfigDict(config.to_dict())
    variant_config.model.freeze_encoder = frozen
    start = time.perf_counter()
    model = train.create_model(variant_config)
    init_rng, dropout_rng = train.run_rngs(variant_config)
    learning_rate_fn = train.create_learning_rate_fn(variant_config.train, 1000)
    initial = train.create_train_state(init_rng, variant_config, model, learning_rate_fn, steps_per_epoch=100)
    # As the training loop runs its first step.
    freezing = freezing_lib.freezing_at(variant_config, initial.variables, 0, 100)
    state, layout = parallel.replicate_state(initial)
    del initial
    dropout_rngs = parallel.replicate(dropout_rng)
    batches = parallel.device_batches(itertools.repeat(host_batch))
    batch = next(batches)

    def compile_step(state: Any) -> Any:
      # The training loop's step, a new function object each call (so that layers.unchunked traces afresh).
      return train.pmapped_train_step(variant_config, freezing, layout).lower(state, batch, dropout_rngs).compile()

    jax.block_until_ready(state)
    initialized = time.perf_counter()
    # Compiled ahead of time once: the same executable runs the steps and gives the cost analysis (unless it
    # has loops: see xla_flops).
    compiled = compile_step(state)
    compiled_at = time.perf_counter()
    holder = {"state": state}

    def step():
      holder["state"], metrics = compiled(holder["state"], next(batches), dropout_rngs)
      jax.block_until_ready(metrics)

    step()
    first_step_s = time.perf_counter() - start  # Init, lowering, compilation (cached by pmap) and one step.
    stats = summarize(time_steps(step, args.warmup, args.steps), batch_size)
    stats["first_step_s"] = first_step_s
    # Where the first step's time goes: variables made and placed; tracing, lowering and compiling; one run.
    stats["first_step_parts_s"] = {"init": initialized - start, "compile": compiled_at - initialized,
                                   "run": start + first_step_s - compiled_at}
    hlo_text = record_program(stats, compiled, f"train_{name}", args)
    flops = xla_flops(compiled, hlo_text, lambda: compile_step(holder["state"]))
    stats["flops_per_image"] = flops / (batch_size // num_devices) if flops else None
    if args.profile:
      log(f"top {args.profile} XLA ops of one {name}-encoder step:")
      stats["profile"] = profile_ops(step, hlo_text, args.profile, trace_subdir(args, f"train_{name}"))
    results[name] = stats
    del holder, state
    log(f"JAX train ({name} encoder): {stats['images_per_sec']:.1f} img/s, step median "
        f"{stats['step_ms_median']:.0f} ms (min {stats['step_ms_min']:.0f}, max {stats['step_ms_max']:.0f}; "
        f"CPU {stats['cpu_ms_median']:.0f} ms), first step {first_step_s:.1f} s ("
        + ", ".join(f"{part} {s:.1f}" for part, s in stats["first_step_parts_s"].items()) + "), "
        + (f"{stats['flops_per_image'] / 1e9:.2f} GFLOPs/image (XLA)" if flops else "FLOPs n/a")
        + f"; program {stats['hlo_fingerprint']}")
  main = results[variants[0][0]]
  out = {"variant": variants[0][0], "images_per_sec": main["images_per_sec"], "step_ms_median": main["step_ms_median"],
         "compile_s": main["first_step_s"], "flops_per_image": main["flops_per_image"],
         "hlo_fingerprint": main["hlo_fingerprint"],
         "variants": results}
  if "frozen" in results and "finetune" in results:
    out["frozen_to_finetune_step_ratio"] = (results["frozen"]["step_ms_median"]
                                            / results["finetune"]["step_ms_median"])
    log(f"frozen / fine-tuning step time: {out['frozen_to_finetune_step_ratio']:.2f}")
  return out


def bench_infer(config: ml_collections.ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
  """``model.apply(train=False)`` on one device as ``prediction.Predictor`` runs it (the variables packed on
  accelerators; ``--variables`` chooses), on variables as a checkpoint would give them.

  The time to the first call counts packing, tracing, compilation and the call, not ``model.init``
  (prediction restores variables instead of initializing them).
  """
  from petseg_jax import prediction

  batch_size, size = config.train.batch_size, config.data.image_size
  start = time.perf_counter()
  model = models.create_model(config.model)
  images = jnp.asarray(synthetic_batch(batch_size, size, config.model.num_classes)["image"])
  concatenate = {"auto": None, "packed": True, "tree": False}[args.variables]
  predictor = prediction.Predictor(model, random_variables(model, size), concatenate,
                                   fold_batch_norm=args.batch_norm == "folded")
  variables = predictor.packed_variables
  # A new function object each call (so that layers.unchunked traces afresh).
  compile_apply = lambda: jax.jit(functools.partial(prediction.packed_logits, predictor.model, predictor.layout)
                                  ).lower(variables, images).compile()
  apply = compile_apply()
  step = lambda: jax.block_until_ready(apply(variables, images))
  step()
  first_step_s = time.perf_counter() - start
  stats = summarize(time_steps(step, args.warmup, args.steps), batch_size)
  hlo_text = record_program(stats, apply, "infer", args)
  flops = xla_flops(apply, hlo_text, compile_apply)
  stats.update(compile_s=first_step_s, flops_per_image=flops / batch_size if flops else None,
               variables="packed" if predictor.layout.concatenated else "tree", batch_norm=args.batch_norm)
  if args.profile:
    log(f"top {args.profile} XLA ops of one inference call:")
    stats["profile"] = profile_ops(step, hlo_text, args.profile, trace_subdir(args, "infer"))
  log(f"JAX inference: {stats['images_per_sec']:.1f} img/s, step median {stats['step_ms_median']:.0f} ms "
      f"(CPU {stats['cpu_ms_median']:.0f} ms), first call {first_step_s:.1f} s, "
      + (f"{flops / batch_size / 1e9:.2f} GFLOPs/image (XLA)" if flops else "FLOPs n/a")
      + f"; program {stats['hlo_fingerprint']}")
  return stats


def model_layers(config: ml_collections.ConfigDict
                 ) -> list[tuple[str, Any, tuple[tuple[int, ...], ...]]]:
  """(label, module, input shapes) of the model's distinct convolutions that have a fast formulation.

  A layer has one input shape, or two for a decoder layer called on its ``(upsampled, skip)`` blocks, as
  ``petseg_jax.models.unet.Decoder`` calls it.
  """
  from petseg_jax.models import layers, mobilenet_v2

  batch, size, alpha = config.train.batch_size, config.data.image_size, config.model.alpha
  taps = jax.eval_shape(
      lambda: mobilenet_v2.MobileNetV2Encoder(alpha).init_with_output(
          jax.random.PRNGKey(0), jnp.zeros((batch, size, size, 3))))[0]
  taps = [taps[name].shape for name in mobilenet_v2.TAP_NAMES]
  out: list[tuple[str, Any, tuple[tuple[int, ...], ...]]] = []
  x = (taps[-1],)
  for i, (features, skip) in enumerate(zip(config.model.decoder_filters, reversed(taps[:-1]))):
    out.append((f"decoder/up_{i} conv_transpose", layers.ConvTranspose3x3s2(features), x))
    x = ((batch, 2 * x[0][1], 2 * x[0][2], features), skip)
  out.append(("decoder/last conv_transpose", layers.ConvTranspose3x3s2(config.model.num_classes, use_bias=True),
              x))
  seen = set()
  spatial, in_channels = size // 2, mobilenet_v2.make_divisible(32 * alpha)
  out.append(("encoder/Conv1 3x3 s2", layers.Conv(in_channels, 3, 2), ((batch, size, size, 3),)))
  for block_id, expanded, out_channels, stride in mobilenet_v2.block_channels(alpha):
    prefix = f"encoder/block_{block_id}" if block_id else "encoder/expanded_conv"
    if block_id and ("expand", spatial, in_channels, expanded) not in seen:
      seen.add(("expand", spatial, in_channels, expanded))
      out.append((f"{prefix}_expand 1x1", layers.Conv(expanded, 1), ((batch, spatial, spatial, in_channels),)))
    if ("depthwise", spatial, expanded, stride) not in seen:
      seen.add(("depthwise", spatial, expanded, stride))
      out.append((f"{prefix}_depthwise s{stride}", layers.DepthwiseConv3x3(stride),
                  ((batch, spatial, spatial, expanded),)))
    spatial //= stride
    if ("project", spatial, expanded, out_channels) not in seen:
      seen.add(("project", spatial, expanded, out_channels))
      out.append((f"{prefix}_project 1x1", layers.Conv(out_channels, 1), ((batch, spatial, spatial, expanded),)))
    in_channels = out_channels
  return out


def bench_layers(config: ml_collections.ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
  """Forward and forward+backward time of each distinct fast-formulated layer, ``--impl`` (default "fast";
  "explicit" times the CPU formulations on an accelerator) against "reference"."""
  from petseg_jax.models import DTYPES

  timed = args.impl or "fast"
  rows = []
  total_timed = total_ref = 0.0
  selected = [layer for layer in model_layers(config) if re.search(args.only, layer[0])]
  if not selected:
    raise SystemExit(f"--only {args.only!r} matches none of: {[label for label, _, _ in model_layers(config)]}")
  for label, module, shapes in selected:
    rng = np.random.default_rng(0)
    parts = tuple(jnp.asarray(rng.uniform(-1, 1, shape), jnp.float32) for shape in shapes)
    x = parts if len(parts) > 1 else parts[0]  # Every block differentiated (a fine-tuning step).
    row: dict[str, Any] = {"layer": label, "input": [list(shape) for shape in shapes]}
    for impl in (timed, "reference"):
      m = module.clone(impl=impl, dtype=DTYPES[config.model.dtype])
      variables = m.init(jax.random.PRNGKey(0), jax.tree.map(lambda a: a[:1], x))
      forward = jax.jit(m.apply)
      cotangent = jnp.ones(jax.eval_shape(forward, variables, x).shape, jnp.float32)
      grads = jax.jit(jax.grad(lambda v, x: jnp.vdot(m.apply(v, x).astype(jnp.float32), cotangent),
                               argnums=(0, 1)))
      for name, fn in (("fwd", forward), ("fwd_bwd", grads)):
        jax.block_until_ready(fn(variables, x))
        walls, _ = time_steps(lambda: jax.block_until_ready(fn(variables, x)), 0, args.steps)
        row[f"{impl}_{name}_ms"] = 1e3 * statistics.median(walls)
    total_timed += row[f"{timed}_fwd_bwd_ms"]
    total_ref += row["reference_fwd_bwd_ms"]
    rows.append(row)
    log(f"{label:36s} {' + '.join(str(tuple(shape)) for shape in shapes):22s} {timed} "
        f"{row[f'{timed}_fwd_ms']:8.2f} / {row[f'{timed}_fwd_bwd_ms']:8.2f} ms   reference "
        f"{row['reference_fwd_ms']:8.2f} / {row['reference_fwd_bwd_ms']:8.2f} ms  (fwd / fwd+bwd)")
  return {"layers": rows, "images_per_sec": None, "step_ms_median": total_timed, "compile_s": None,
          "reference_step_ms_median": total_ref}


def bench_input(config: ml_collections.ConfigDict, args: argparse.Namespace) -> dict[str, Any]:
  """``TrainInput`` on a real-JPEG folder: preparation, the first (decoding) epoch, then cached epochs."""
  data_dir = Path(args.data_dir) if args.data_dir else (SHARED_SAMPLE if SHARED_SAMPLE.is_dir()
                                                        else BUNDLED_SAMPLE)
  if not data_dir.is_dir():
    raise SystemExit(f"--data-dir {data_dir}: no such folder (a folder in the Oxford-IIIT Pet layout).")
  config.data.source = "folder"
  config.data.data_dir = str(data_dir)
  config.data.cache = True
  with tempfile.TemporaryDirectory(prefix="benchmark_tfds_") as tfds_dir:
    os.environ["TFDS_DATA_DIR"] = tfds_dir  # A cold, private preparation; removed afterwards.
    import tensorflow as tf
    tf.config.set_visible_devices([], "GPU")
    from petseg_jax import input_pipeline

    start = time.perf_counter()
    try:
      num_images = input_pipeline.split_size(config.data, config.data.train_split)
      if num_images < config.train.batch_size:  # E.g. the bundled sample's 48 pets with the default batch of 64.
        raise SystemExit(f"--mode input on {data_dir}: its train split has {num_images} images, fewer than "
                         f"--batch-size {config.train.batch_size}: pass a smaller --batch-size, or --data-dir "
                         "with more images.")
      train_input = input_pipeline.TrainInput(config.data, config.train.batch_size, seed=config.seed,
                                              num_devices=jax.local_device_count())
    except input_pipeline.DataError as e:  # A damaged folder: the file and what to do.
      raise SystemExit(f"--mode input on {data_dir}: {e}") from e
    prepare_s = time.perf_counter() - start
    per_epoch = train_input.steps_per_epoch * config.train.batch_size

    def run_epoch(epoch: int) -> float:
      start = time.perf_counter()
      count = 0
      for batch in train_input.epoch(epoch):
        count += batch["image"].shape[0] * batch["image"].shape[1]
      if count != per_epoch:
        raise RuntimeError(f"epoch {epoch} gave {count} images, expected {per_epoch}")
      return time.perf_counter() - start

    first_s = run_epoch(0)
    cached = [run_epoch(epoch) for epoch in range(1, 1 + max(args.steps, 1))]
  cached_rate = per_epoch / statistics.median(cached)
  stats = {"images_per_sec": cached_rate, "first_epoch_images_per_sec": per_epoch / first_s,
           "prepare_s": prepare_s, "epoch_images": per_epoch, "data_dir": str(data_dir),
           "step_ms_median": 1e3 * statistics.median(cached) / train_input.steps_per_epoch,
           "compile_s": prepare_s + first_s}
  log(f"input pipeline ({data_dir}, {train_input.num_examples} train examples, {per_epoch} per epoch): "
      f"preparation {prepare_s:.1f} s, first epoch {per_epoch / first_s:.0f} img/s, cached "
      f"{cached_rate:.0f} img/s (median of {len(cached)} epochs)")
  return stats


# --- Keras -----------------------------------------------------------------------------------------------


def bench_keras(config: ml_collections.ConfigDict, args: argparse.Namespace, mode: str,
                variant: str | None = None) -> dict[str, Any]:
  """The tutorial's Keras model: ``model.fit`` steps (train: in the step JAX's numbers are of, ``variant`` —
  its encoder frozen, or trainable for "finetune") or its compiled call (infer, where ``variant`` is None).

  The backend is Keras' own choice (``KERAS_BACKEND``, TensorFlow by default, as in the tutorial). Where
  TensorFlow cannot be installed (an accelerator host with JAX alone) ``KERAS_BACKEND=jax`` runs the same
  Keras model and ``fit`` on JAX; the JSON records which backend ran.
  """
  import keras
  from petseg_jax.keras_reference import keras_unet

  backend = keras.backend.backend()
  if backend == "tensorflow":
    import tensorflow as tf
    for gpu in tf.config.list_physical_devices("GPU"):
      tf.config.experimental.set_memory_growth(gpu, True)  # Leave the device memory JAX has not taken.

  batch_size, size = config.train.batch_size, config.data.image_size
  host = synthetic_batch(batch_size, size, config.model.num_classes)
  # The Keras counterpart of model.dtype="bfloat16": bfloat16 compute, float32 variables. Set either way, as
  # the policy is global and main() may run more than once in a process.
  keras.mixed_precision.set_global_policy("mixed_bfloat16" if config.model.dtype == "bfloat16" else "float32")
  start = time.perf_counter()
  model = keras_unet(config.model.alpha, size, config.model.num_classes,
                     decoder_filters=tuple(config.model.decoder_filters), freeze_encoder=variant != "finetune")
  if mode == "train":
    # The tutorial's compile(); one batch repeated, like the JAX side's batch held on the device.
    model.compile(optimizer="adam", loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    if backend == "tensorflow":
      dataset = tf.data.Dataset.from_tensors((host["image"], host["mask"])).repeat()
    else:  # The same batch again and again, as a Python generator (Keras' backend-neutral input).
      dataset = (batch for batch in itertools.repeat((host["image"], host["mask"])))
    ends: list[tuple[float, float]] = []
    timer = keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: ends.append(
        (time.perf_counter(), time.process_time())))
    model.fit(dataset, epochs=1, steps_per_epoch=1 + args.warmup + args.steps, callbacks=[timer], verbose=0)
    first_step_s = ends[0][0] - start
    walls, cpus = (list(np.diff([end[i] for end in ends[args.warmup:]])) for i in (0, 1))
    times = (walls, cpus)
  else:
    if backend == "tensorflow":
      infer = tf.function(lambda x: model(x, training=False))
      images = tf.constant(host["image"])
      step = lambda: infer(images).numpy()
    else:  # The jitted stateless call on device-resident inputs, as the JAX side is timed.
      call = jax.jit(lambda trainable, non_trainable, x: model.stateless_call(
          trainable, non_trainable, x, training=False)[0])
      trainable = [v.value for v in model.trainable_variables]
      non_trainable = [v.value for v in model.non_trainable_variables]
      images = jnp.asarray(host["image"])
      step = lambda: jax.block_until_ready(call(trainable, non_trainable, images))
    step()
    first_step_s = time.perf_counter() - start
    times = time_steps(step, args.warmup, args.steps)
  stats = summarize(times, batch_size)
  stats["first_step_s"] = first_step_s
  stats["backend"] = backend
  stats["variant"] = variant
  log(f"Keras {keras.__version__} ({backend} backend) {'fit' if mode == 'train' else 'inference'}: "
      f"{stats['images_per_sec']:.1f} img/s, step median {stats['step_ms_median']:.0f} ms (CPU "
      f"{stats['cpu_ms_median']:.0f} ms), first step {first_step_s:.1f} s")
  return stats


# --- main ------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--mode", choices=MODES, default="train")
  parser.add_argument("--batch-size", type=int, default=None, help="default: config.train.batch_size")
  parser.add_argument("--steps", type=int, default=10, help="timed steps (input: cached epochs)")
  parser.add_argument("--warmup", type=int, default=2, help="untimed steps after the first one")
  parser.add_argument("--config", default=str(DEFAULT_CONFIG), help="config file (default: the tutorial)")
  parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                      help="config override, e.g. --set model.dtype=bfloat16 --set data.image_size=64")
  parser.add_argument("--impl", choices=IMPLS, default=None,
                      help="convolution formulation (petseg_jax.models.layers); default: the model's; "
                      "layers: the one timed against reference (default fast)")
  parser.add_argument("--skip-finetune", action="store_true", help="train: time the frozen encoder only")
  parser.add_argument("--variables", choices=("auto", "packed", "tree"), default="auto",
                      help="infer: the variables packed into one buffer per dtype, or as their tree of ~270 "
                           "arrays (auto: as prediction.Predictor does, packed on accelerators)")
  parser.add_argument("--batch-norm", choices=("folded", "separate"), default="folded",
                      help="infer: BatchNorm folded into the convolutions, as prediction.Predictor does, or run "
                           "as four operations of its own")
  parser.add_argument("--data-dir", default="", help="input: official-layout folder (default: shared "
                      "sample beside the repo, else the bundled one)")
  parser.add_argument("--profile", type=int, default=0, metavar="N",
                      help="train/infer: profile one more step and print its N most expensive XLA ops")
  parser.add_argument("--trace-dir", default="", metavar="DIR",
                      help="with --profile: keep each profiler trace under DIR/<program> (Perfetto, XProf)")
  parser.add_argument("--dump-hlo", default="", metavar="DIR",
                      help="train/infer: write each compiled program's optimized HLO text into DIR")
  parser.add_argument("--only", default="", metavar="REGEX", help="layers: only layers whose label matches")
  parser.add_argument("--compare-keras", action="store_true", help="also time the Keras tutorial model")
  parser.add_argument("--compilation-cache", default="", metavar="DIR",
                      help="JAX persistent compilation cache directory (a warm one shortens the first step)")
  parser.add_argument("--matmul-peak", action="store_true",
                      help="also measure the machine's matmul rate and the fraction of it reached")
  parser.add_argument("--malloc-tuning", action="store_true",
                      help="restart with glibc malloc tunables that also reuse freed memory (Linux; JAX and "
                      "Keras both run under them)")
  parser.add_argument("--json", action="store_true", help="only the JSON line on stdout (text to stderr)")
  args = parser.parse_args(argv)
  if args.steps < 1 or args.warmup < 0:
    parser.error("--steps must be >= 1 and --warmup >= 0")
  if args.compare_keras and args.mode not in ("train", "infer"):
    parser.error("--compare-keras applies to --mode train and infer")
  if args.mode == "layers" and args.impl == "reference":
    parser.error("--mode layers times --impl fast or explicit against reference; reference alone compares nothing")
  if args.trace_dir and not args.profile:
    parser.error("--trace-dir keeps the traces of --profile N: pass --profile too")
  if args.profile < 0:
    parser.error(f"--profile {args.profile}: the number of ops to list must be >= 0 (0: no profile)")
  try:
    re.compile(args.only)
  except re.error as e:
    parser.error(f"--only {args.only!r} is not a regular expression ({e})")
  for flag, folder in (("--dump-hlo", args.dump_hlo), ("--trace-dir", args.trace_dir)):
    if folder and (problem := files.folder_problem(folder, flag)):
      parser.error(problem)
  return args


# glibc malloc settings that also keep freed memory in the heap for reuse (on top of the huge pages that
# every script asks for, petseg_jax/host.py): no page faults at all in the steps after the first, but in
# alternating runs no faster than huge pages alone (BENCHMARKS.md).
MALLOC_TUNABLES = ("glibc.malloc.mmap_max=0", "glibc.malloc.trim_threshold=68719476736",
                   "glibc.malloc.arena_max=1")


def main(argv: list[str] | None = None) -> dict[str, Any]:
  global _log_stream
  args = parse_args(argv)
  if args.malloc_tuning and argv is None:
    host.restart_with_tunables([*host.default_tunables(), *MALLOC_TUNABLES])
  if args.json:
    _log_stream = sys.stderr
  # With --json, whatever libraries print (TFDS preparing the input benchmark's dataset, Keras) goes to
  # stderr too, so that stdout is the JSON line alone.
  with contextlib.redirect_stdout(sys.stderr if args.json else sys.stdout):
    result = run(args)
  print(json.dumps(result, default=float))
  return result


def run(args: argparse.Namespace) -> dict[str, Any]:
  """The benchmark ``args`` ask for: its result, with what was measured on and the Keras comparison."""
  config = benchmark_config(args)
  if args.compilation_cache:
    # JAX's persistent cache: a second run with the same shapes loads its executables instead of compiling.
    jax.config.update("jax_compilation_cache_dir", args.compilation_cache)
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  load_start = load_average()
  flags = cpu_flags()
  log(f"device: {provenance.device_description()}; CPU flags {' '.join(flags or ['unknown'])}; jax {jax.__version__}; "
      f"load average {load_start}")
  log(f"config: {args.config}; batch {config.train.batch_size}, {config.data.image_size}x"
      f"{config.data.image_size}, alpha {config.model.alpha}, dtype {config.model.dtype}, conv impl "
      f"{config.model.conv_impl}")
  if args.compare_keras and args.mode == "train" and train_variant(config) == "partly_frozen":
    raise SystemExit(f"--compare-keras: train.frozen_params={tuple(config.train.frozen_params)} freeze other "
                     "parameters than exactly the encoder; the Keras tutorial model freezes the encoder or (with "
                     "model.freeze_encoder=False) nothing. Compare without the override, or drop --compare-keras.")
  bench = {"train": bench_train, "infer": bench_infer, "input": bench_input, "layers": bench_layers}[args.mode]
  result = bench(config, args)
  result["peak_rss_mb"] = peak_rss_mb()  # Before Keras runs.
  result["peak_device_memory_mb"] = peak_device_memory_mb()
  if args.matmul_peak and args.mode != "input":
    result["matmul_peak_gflops"] = matmul_peak_gflops(
        jnp.bfloat16 if config.model.dtype == "bfloat16" else jnp.float32)
    if result.get("flops_per_image"):
      achieved = result["flops_per_image"] * result["images_per_sec"] / 1e9
      result["achieved_gflops"] = achieved
      result["fraction_of_matmul_peak"] = achieved / result["matmul_peak_gflops"]
      log(f"{achieved:.0f} GFLOP/s achieved; matmul peak ({config.model.dtype} 4096^3 jnp.dot) "
          f"{result['matmul_peak_gflops']:.0f} GFLOP/s: {result['fraction_of_matmul_peak']:.0%} of it")
  if args.compare_keras:
    keras_stats = bench_keras(config, args, args.mode, result.get("variant"))
    result["keras_images_per_sec"] = keras_stats["images_per_sec"]
    result["keras_step_ms_median"] = keras_stats["step_ms_median"]
    result["keras_first_step_s"] = keras_stats["first_step_s"]
    result["keras_cpu_ms_median"] = keras_stats["cpu_ms_median"]
    result["keras_backend"] = keras_stats["backend"]
    result["keras_variant"] = keras_stats["variant"]
    result["ratio"] = result["images_per_sec"] / keras_stats["images_per_sec"]
    result["peak_rss_mb_with_keras"] = peak_rss_mb()
    log(f"JAX / Keras images/s: {result['ratio']:.2f}")
  else:
    result["ratio"] = None
  result.update(mode=args.mode, device=provenance.device_description(), batch_size=config.train.batch_size,
                image_size=config.data.image_size, alpha=config.model.alpha, dtype=config.model.dtype,
                conv_impl=config.model.conv_impl, jax_version=jax.__version__,
                cpu_flags=flags, malloc_tunables=os.environ.get("GLIBC_TUNABLES", ""),
                transparent_huge_pages=host.transparent_huge_pages_mode(),
                compilation_cache=args.compilation_cache or None, load_average_start=load_start,
                load_average_end=load_average())
  return result


if __name__ == "__main__":
  main()
