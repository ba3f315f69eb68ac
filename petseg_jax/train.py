"""Training and evaluation loop: from a config to checkpoints, metrics and figures in a workdir.

Modelled on google/flax examples/imagenet/train.py. The steps are ``jax.pmap``-ed over all local devices
(one device is the same code path): gradients are averaged with ``pmean`` and BatchNorm statistics are
computed over the global batch (``UNet(bn_axis_name="batch")``), so N devices train like one device with
the same global batch. Metrics are summed confusion matrices, exact over a split. Between steps the state
stays on the devices and batches go to them ahead of their step (``parallel.py``). What is frozen follows
from the config (``freezing.py``), which ``config_checks.validate_config`` checks before anything is written;
SIGINT/SIGTERM stop the loop after a step, with a checkpoint (``stopping.py``).

The workdir receives config.json, checkpoints/ and checkpoints_best/ (see ``checkpoint.py``),
metrics.jsonl (one JSON object per evaluation), provenance.jsonl (the code and devices of each attempt, see
``provenance.py``), TensorBoard event files and figures/.

TensorFlow (tf.data, event files) is imported where a run reads data or writes summaries, not at the top:
the model, state and step functions then import on accelerator hosts that have JAX but no TensorFlow
(``scripts/benchmark.py`` runs there).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import functools
import itertools
import logging as std_logging
import math
import os
import signal
import time
from pathlib import Path
from typing import Any, Callable, Sequence

from absl import logging
import flax
from flax.training import train_state
import jax
from jax import lax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm

from petseg_jax import checkpoint
from petseg_jax import config_checks
from petseg_jax import freezing as freezing_lib
from petseg_jax import losses
from petseg_jax import metric_writer
from petseg_jax import metrics as metrics_lib
from petseg_jax import metrics_log
from petseg_jax.metrics_log import METRICS_FILE, read_metrics  # Part of this module's API too.
from petseg_jax import models
from petseg_jax import optim
from petseg_jax import packed
from petseg_jax import parallel
from petseg_jax import plots
from petseg_jax import provenance
from petseg_jax import stopping
from petseg_jax import weights

FIGURES_DIR = "figures"


class TrainState(train_state.TrainState):
  """flax's TrainState (step, params, optimizer) with the model's BatchNorm statistics beside the params."""
  batch_stats: Any

  @property
  def variables(self) -> dict[str, Any]:
    """``{"params", "batch_stats"}``: what ``model.apply`` takes."""
    return {"params": self.params, "batch_stats": self.batch_stats}


def create_model(config: ml_collections.ConfigDict, bn_axis_name: str | None = parallel.AXIS) -> models.UNet:
  """The UNet of ``config.model``; BatchNorm statistics synced over the pmap axis while training."""
  return models.create_model(config.model, bn_axis_name=bn_axis_name)


# The initializer is mostly threefry hashing, inlined once per parameter shape, and runs once per run: LLVM's
# level-1 optimization compiles it in ~4 s instead of ~7 s (2-core CPU) and gives the same bits (no
# fast-math at any level; tests/test_train.py checks the equality).
INIT_COMPILER_OPTIONS = {"xla_backend_optimization_level": 1}


@functools.partial(jax.jit, static_argnums=(0, 2), compiler_options=INIT_COMPILER_OPTIONS)
def _init(model: models.UNet, rng: jax.Array, image_size: int,
          encoder: dict[str, Any] | None) -> dict[str, Any]:
  # Module-level and keyed on the (hashable) model: equal models share one compiled initializer.
  variables = model.init({"params": rng}, jnp.zeros((1, image_size, image_size, 3), jnp.float32), train=False)
  if encoder is not None:
    # Merged inside the compiled function, so that XLA drops the random encoder these variables replace:
    # its ~50 kernels are most of the initializer (alpha 1.0, 2-core CPU: compiled in ~1 s instead of ~6).
    # Flax draws each parameter's key from its own path, so the decoder's values are the same bits.
    variables = weights.merge_encoder_variables(variables, encoder)
  return variables


def initialized(rng: jax.Array, image_size: int, model: models.UNet,
                encoder: dict[str, Any] | None = None) -> dict[str, Any]:
  """Initial ``{"params", "batch_stats"}``: random, with ``encoder`` variables in place of the encoder's.

  Args:
    rng: the parameters' key.
    image_size: the input's side (BatchNorm statistics and kernels do not depend on it; shapes are traced).
    model: the UNet.
    encoder: ``{"params", "batch_stats"}`` of the encoder (e.g. from ``weights.load_encoder_variables``),
      or None for a random encoder.

  Raises:
    weights.WeightsError: ``encoder`` does not fit the model's encoder.
  """
  return flax.core.unfreeze(_init(model, rng, image_size, encoder))


def create_learning_rate_fn(train_config: ml_collections.ConfigDict, total_steps: int) -> optax.Schedule:
  """``train.lr_schedule``: "constant" or "cosine" (to 0 at ``total_steps``), after a linear warmup."""
  lr, warmup = train_config.learning_rate, train_config.warmup_steps
  if train_config.lr_schedule == "constant":
    main = optax.constant_schedule(lr)
  elif train_config.lr_schedule == "cosine":
    main = optax.cosine_decay_schedule(lr, decay_steps=max(total_steps - warmup, 1))
  else:
    raise config_checks.ConfigError(f"config.train.lr_schedule={train_config.lr_schedule!r} is not one of "
                                    f"{config_checks.LR_SCHEDULES}.")
  if warmup <= 0:
    return main
  return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), main], [warmup])


def mismatched_collections(model: models.UNet, image_size: int, variables: dict[str, Any]) -> list[str]:
  """The collections of ``variables`` ("params", "batch_stats") whose tree, shapes or dtypes are not ``model``'s."""
  expected = models.variable_shapes(model, image_size)
  signature = lambda tree: jax.tree.map(lambda x: (tuple(x.shape), str(np.dtype(x.dtype))), tree)
  return [collection for collection in ("params", "batch_stats")
          if signature(expected[collection]) != signature(variables[collection])]


def create_train_state(rng: jax.Array, config: ml_collections.ConfigDict, model: models.UNet,
                       learning_rate_fn: optax.Schedule, steps_per_epoch: int,
                       variables: dict[str, Any] | None = None) -> TrainState:
  """Initial state: ``variables``, or a random init with ``model.encoder_weights`` loaded; the freezing optimizer.

  ``variables``: ``{"params", "batch_stats"}`` to start from (``checked_init_from``'s, for ``model.init_from``:
  then no encoder weights are read, so an 'imagenet' left in the config needs no network, and no initializer
  is compiled); ``rng`` is not used then.
  """
  if variables is None:
    # The weight file first: a wrong path or alpha fails before the (slower) initialization compiles.
    encoder = weights.load_encoder_variables(config.model.encoder_weights or None, config.model.alpha)
    variables = initialized(rng, config.data.image_size, model, encoder)
  try:
    labels = optim.param_labels(variables["params"], config.train.frozen_params)
  except ValueError as e:
    raise config_checks.ConfigError(str(e)) from e
  tx = optim.create_optimizer(config.train, learning_rate_fn, labels,
                              freeze=config.model.freeze_encoder,
                              unfreeze_step=freezing_lib.unfreeze_step(config, steps_per_epoch))
  return TrainState.create(apply_fn=model.apply, params=variables["params"], tx=tx,
                           batch_stats=variables["batch_stats"])


def abstract_train_state(config: ml_collections.ConfigDict, model: models.UNet,
                         learning_rate_fn: optax.Schedule, steps_per_epoch: int) -> TrainState:
  """``create_train_state``'s state as ``jax.ShapeDtypeStruct``s: what a resumed run restores its checkpoint
  into. Nothing is computed or read (no initializer compiled, no encoder weights needed)."""
  return jax.eval_shape(
      lambda variables: create_train_state(None, config, model, learning_rate_fn, steps_per_epoch, variables),
      models.variable_shapes(model, config.data.image_size))


def read_init_from(config: ml_collections.ConfigDict) -> tuple[dict[str, Any], str]:
  """``model.init_from``'s params and batch_stats, and the words that name them in messages.

  A Keras file (``weights.is_keras_file``: ``.keras``, ``.h5``) is the tutorial's whole U-Net, read into the
  model of ``config.model``; anything else is a previous run's workdir or checkpoint dir, whose latest
  checkpoint is read (``checkpoints_best/``: the best; a step's directory: that step), not its optimizer state.

  Raises:
    weights.WeightsError: a Keras file that does not fit ``config.model``.
    checkpoint.CheckpointError: no readable checkpoint there.
  """
  path, model_config = config.model.init_from, config.model
  if weights.is_keras_file(path):
    variables = weights.unet_variables_from_keras_file(
        path, model_config.alpha, model_config.num_classes, tuple(model_config.decoder_filters))
    return variables, f"model.init_from={path!r} (a Keras U-Net)"
  variables, step = checkpoint.restore_variables(path, "latest")
  return variables, f"model.init_from={path!r} (step {step})"


def checked_init_from(model: models.UNet, image_size: int, init_from: tuple[dict[str, Any], str]
                      ) -> dict[str, Any]:
  """``read_init_from``'s params and batch_stats, checked against ``model``'s shapes and put on the device: what
  ``create_train_state`` starts from.

  Raises:
    checkpoint.CheckpointError: they are another model's, naming where they came from.
  """
  variables, source = init_from
  mismatched = mismatched_collections(model, image_size, variables)
  if mismatched:
    raise checkpoint.CheckpointError(
        f"{source}: its {mismatched[0]} do not fit this model; check model.alpha, model.decoder_filters and "
        "model.num_classes against its config.json.")
  logging.info("Initialized params and batch_stats from %s.", source)
  # device_put, not jnp.asarray, which compiles a small program per distinct leaf shape (weights.py's merge too).
  return {collection: jax.tree.map(jax.device_put, variables[collection]) for collection in ("params", "batch_stats")}


def _loss_settings(config: ml_collections.ConfigDict) -> dict[str, Any]:
  return {"loss": config.train.loss, "class_weights": tuple(config.train.class_weights)}


def train_step(state: TrainState, batch: dict[str, jax.Array], dropout_rng: jax.Array, *,
               config: ml_collections.ConfigDict, freezing: freezing_lib.Freezing
               ) -> tuple[TrainState, dict[str, jax.Array]]:
  """One optimizer step on a device's shard of the global batch (run under ``pmap(axis_name=parallel.AXIS)``).

  ``freezing`` (static) is how the model runs its frozen layers; it must be ``freezing_lib.freezing_at(config, ...)`` at
  the state's step. The optimizer's masking follows the config alone: another ``freezing`` would keep the
  frozen parameters but move their BatchNorm statistics.
  """
  # Dropout masks depend on (seed, step, device) only: resumed runs draw the same ones.
  rng = jax.random.fold_in(jax.random.fold_in(dropout_rng, state.step), lax.axis_index(parallel.AXIS))

  def loss_fn(params):
    logits, updates = state.apply_fn(
        {"params": params, "batch_stats": state.batch_stats}, batch["image"], train=True,
        frozen_encoder=freezing.encoder, frozen_batch_norms=freezing.batch_norms, mutable=["batch_stats"],
        rngs={"dropout": rng})
    # The Dice term's sums over the global batch (psum); the per-pixel term is this shard's mean.
    loss = losses.segmentation_loss(logits, batch["mask"], **_loss_settings(config), axis_name=parallel.AXIS)
    return loss, (logits, updates["batch_stats"])

  (loss, (logits, batch_stats)), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # Equal shards: the mean of the per-device gradients is the gradient of the global batch's loss.
  grads = lax.pmean(grads, parallel.AXIS)
  new_state = state.apply_gradients(grads=grads, batch_stats=batch_stats)
  confusion = metrics_lib.confusion_matrix(logits, batch["mask"], num_classes=config.model.num_classes)
  return new_state, {"loss": lax.pmean(loss, parallel.AXIS), "confusion": lax.psum(confusion, parallel.AXIS)}


def eval_step(variables: dict[str, Any], batch: dict[str, jax.Array], *, model: models.UNet,
              config: ml_collections.ConfigDict) -> tuple[dict[str, jax.Array], jax.Array]:
  """The loss's sums (``losses.loss_sums``; padding examples have weight 0) and the confusion matrix of the
  devices' shards, summed over the devices, of ``model`` in inference mode on ``variables``: evaluation passes
  them with BatchNorm folded, the function ``prediction.Predictor`` computes (``pmapped_inference_variables``).
  Also this shard's class maps (N, H, W), the logits' argmax: what the figures show, so that drawing them
  compiles no other program.
  """
  logits = model.apply(variables, batch["image"], train=False)
  weight = batch["weight"]
  # Sums, not the batch's loss: added up over the split they give its exact loss, whatever the batching.
  sums = losses.loss_sums(logits, batch["mask"], **_loss_settings(config), weights=weight)
  sums["confusion"] = metrics_lib.confusion_matrix(logits, batch["mask"], weight,
                                                   num_classes=config.model.num_classes)
  return lax.psum(sums, parallel.AXIS), jnp.argmax(logits, axis=-1)


def _packed_train_step(buffers: tuple[jax.Array, ...], batch: dict[str, jax.Array], dropout_rng: jax.Array, *,
                       layout: packed.Layout, config: ml_collections.ConfigDict, freezing: freezing_lib.Freezing
                       ) -> tuple[tuple[jax.Array, ...], dict[str, jax.Array]]:
  state, metrics = train_step(packed.unpack(buffers, layout), batch, dropout_rng, config=config,
                              freezing=freezing)
  new_buffers, new_layout = packed.pack(state, layout.concatenated)
  if new_layout != layout:  # At trace time: the new state must have the old one's structure, shapes, dtypes.
    raise ValueError(f"train_step changed the state's layout: {layout} -> {new_layout}")
  return new_buffers, metrics


def pmapped_train_step(config: ml_collections.ConfigDict, freezing: freezing_lib.Freezing, layout: packed.Layout
                       ) -> Callable:
  """``train_step`` pmapped over the local devices, on a state packed with ``layout`` (``parallel.replicate_state``).

  Takes and returns the state's buffers (one per dtype), and donates them. As a tree, the state was ~300
  argument buffers in and out of each step, whose host work took longer than the step's kernels on an
  H200 (frozen bfloat16 step 5.4-5.6 ms as a tree, 3.2-3.5 ms packed).
  """
  return jax.pmap(functools.partial(_packed_train_step, layout=layout, config=config,
                                    freezing=freezing), axis_name=parallel.AXIS, donate_argnums=(0,))


def pmapped_inference_variables(state_layout: packed.Layout) -> tuple[Callable, packed.Layout]:
  """A pmapped function from the replicated train state packed with ``state_layout`` (``parallel.replicate_state``) to
  the variables evaluation runs on, on every device: BatchNorm folded into the convolutions
  (``models.fold_batch_norm``; the model is ``model.clone(batch_norm_folded=True)``), packed as the state is;
  and their layout. An evaluation folds once, then runs every batch on the folded variables.
  """
  def folded_variables(buffers: tuple[jax.Array, ...]) -> dict[str, Any]:
    state = packed.unpack(buffers, state_layout)
    return models.fold_batch_norm(state.variables)

  layout = packed.layout_of(jax.eval_shape(folded_variables, packed.abstract_buffers(state_layout)),
                            state_layout.concatenated)
  return jax.pmap(lambda buffers: packed.pack(folded_variables(buffers), layout.concatenated)[0],
                  axis_name=parallel.AXIS), layout


def pmapped_eval_step(config: ml_collections.ConfigDict, model: models.UNet, layout: packed.Layout
                      ) -> Callable:
  """``eval_step`` of ``model`` pmapped over the local devices, on variables packed with ``layout``
  (``pmapped_inference_variables``, or ``parallel.replicate_state`` of a ``{"params", "batch_stats"}`` tree)."""
  return jax.pmap(lambda buffers, batch: eval_step(packed.unpack(buffers, layout), batch, model=model,
                                                   config=config),
                  axis_name=parallel.AXIS)


def evaluation_sums(p_eval_step: Callable, buffers: tuple[jax.Array, ...], eval_input: Any, num_shown: int = 0
                    ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """The summed ``eval_step`` outputs over the whole eval split (``pmapped_eval_step`` on ``buffers``, the
  replicated packed variables of ``pmapped_inference_variables`` or ``parallel.replicate_state``), and examples
  to show.

  Each batch's sums are fetched ``parallel.PREFETCH_BATCHES`` batches after its step is dispatched, so the host never
  waits for the step it just started (fetched at once, every batch's small output cost the devices an idle
  gap between steps), and at most that many steps are queued ahead of the host.

  Returns:
    The sums: "confusion" (int64 on the host: no overflow) and the loss's sums (``losses.loss_sums``:
    "loss_sum", "num_pixels", ..., float64). And the first batch's first ``num_shown`` examples, padding
    left out, as host arrays: "image", "mask" and the predicted "class_map" (empty when ``num_shown`` is 0).
  """
  totals: dict[str, Any] = {}
  shown: dict[str, np.ndarray] = {}

  def add(sums: dict[str, jax.Array]) -> None:
    for key, value in parallel.first_replica(sums).items():
      totals[key] = totals.get(key, 0) + np.asarray(value, np.int64 if key == "confusion" else np.float64)

  host_batches = iter(eval_input)
  first_batch = next(host_batches, None)
  batches = parallel.device_batches(itertools.chain([] if first_batch is None else [first_batch], host_batches))
  outputs = (p_eval_step(buffers, batch) for batch in batches)
  for i, (sums, class_maps) in enumerate(parallel.run_ahead(outputs, parallel.PREFETCH_BATCHES)):
    add(sums)
    if i == 0 and num_shown > 0:
      shown = _examples_shown(first_batch, np.asarray(class_maps), num_shown)
  return totals, shown


def _examples_shown(batch: dict[str, np.ndarray], class_maps: np.ndarray, count: int) -> dict[str, np.ndarray]:
  """The first ``count`` real examples of a host batch (leading axis: the devices) and their class maps."""
  flat = lambda x: x.reshape((-1,) + x.shape[2:])
  real = flat(batch["weight"]) > 0
  return {key: flat(value)[real][:count]
          for key, value in (("image", batch["image"]), ("mask", batch["mask"]), ("class_map", class_maps))}


def eval_metrics(sums: dict[str, Any]) -> dict[str, Any]:
  """``metrics.compute_metrics`` of ``evaluation_sums``' confusion matrix, and the split's "loss" from its
  sums (``losses.loss_from_sums``: as if the split were one batch)."""
  result = metrics_lib.compute_metrics(sums["confusion"])
  result["loss"] = float(losses.loss_from_sums(sums))
  return result


def evaluate(p_eval_step: Callable, buffers: tuple[jax.Array, ...], eval_input: Any, num_shown: int = 0
             ) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
  """Loss and ``metrics.compute_metrics`` over the whole eval split (``eval_metrics`` of ``evaluation_sums``),
  and ``evaluation_sums``' examples to show."""
  sums, shown = evaluation_sums(p_eval_step, buffers, eval_input, num_shown)
  return eval_metrics(sums), shown


# --- the loop's bookkeeping ------------------------------------------------------------------------------

class _QuietOrbaxInfo(std_logging.Filter):
  """Drops Orbax's INFO records (a dozen per checkpoint); its warnings and errors still show."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return record.levelno > std_logging.INFO or f"{os.sep}orbax{os.sep}" not in record.pathname


_QUIET_ORBAX = _QuietOrbaxInfo()


@dataclasses.dataclass
class _StepSums:
  """Loss and confusion summed over some training steps (fetched to the host)."""
  loss_sum: float = 0.0
  num_steps: int = 0
  confusion: Any = 0

  def add(self, step_losses: np.ndarray, confusion: np.ndarray) -> None:
    self.loss_sum += float(step_losses.sum())
    self.num_steps += len(step_losses)
    self.confusion = self.confusion + confusion


class _TrainMetrics:
  """Per-step train metrics kept on the device until a log point, then summed on the host.

  Two sums: the steps since the last log point (``take_interval``: TensorBoard's train/*) and the steps since
  the last evaluation (``summary``: metrics.jsonl's train_*). Fetching early (a checkpoint, an epoch's end)
  adds to both; it starts neither anew.
  """

  def __init__(self, learning_rate_fn: optax.Schedule):
    self.learning_rate_fn = learning_rate_fn
    self.pending: list[tuple[int, dict[str, jax.Array]]] = []
    self.since_evaluation, self.since_log = _StepSums(), _StepSums()

  @property
  def num_steps(self) -> int:
    """Steps fetched since the last ``reset()``."""
    return self.since_evaluation.num_steps

  def add(self, step: int, step_metrics: dict[str, jax.Array]) -> None:
    self.pending.append((step, step_metrics))

  def flush(self, last_checkpoint: str, through: int | None = None) -> None:
    """Fetches the pending steps (the loop's only host sync), those up to step ``through`` if given, checks
    their loss and adds them to both sums.

    Raises:
      FloatingPointError: a step's loss is NaN/inf.
    """
    count = len(self.pending) if through is None else sum(s <= through for s, _ in self.pending)
    if not count:
      return
    steps = [s for s, _ in self.pending[:count]]
    fetched = [parallel.first_replica(m) for _, m in self.pending[:count]]
    self.pending = self.pending[count:]
    step_losses = np.array([float(m["loss"]) for m in fetched])
    bad = np.flatnonzero(~np.isfinite(step_losses))
    if bad.size:
      raise diverged(f"the loss is {step_losses[bad[0]]} at step {steps[bad[0]]}",
                     float(self.learning_rate_fn(steps[bad[0]] - 1)), last_checkpoint)
    confusion = sum(np.asarray(m["confusion"], np.int64) for m in fetched)
    self.since_evaluation.add(step_losses, confusion)
    self.since_log.add(step_losses, confusion)

  def take_interval(self) -> dict[str, float] | None:
    """Loss and pixel accuracy over the steps fetched since the last call (None if none), then starts anew."""
    sums, self.since_log = self.since_log, _StepSums()
    if not sums.num_steps:
      return None
    return {"loss": sums.loss_sum / sums.num_steps,
            "pixel_accuracy": float(np.trace(sums.confusion) / sums.confusion.sum())}

  def summary(self) -> dict[str, Any] | None:
    """Means since the last ``reset()`` (call after ``flush``); None if no step ran since."""
    sums = self.since_evaluation
    if not sums.num_steps:
      return None
    result = metrics_lib.compute_metrics(sums.confusion)
    result["loss"] = sums.loss_sum / sums.num_steps
    result["num_steps"] = sums.num_steps
    return result

  def reset(self) -> None:
    self.since_evaluation = _StepSums()


def diverged(what: str, learning_rate: float, last_checkpoint: str) -> FloatingPointError:
  """The error a diverged run stops with: ``what`` went non-finite, what to change, what is left to resume."""
  return FloatingPointError(
      f"Training diverged: {what}. Lower config.train.learning_rate (now {learning_rate:g}) or add warmup "
      f"(train.warmup_steps). Nothing was saved after the divergence; last good checkpoint: "
      f"{last_checkpoint}.")


def _flat_record(prefix: str, result: dict[str, Any] | None) -> dict[str, Any]:
  if result is None:
    return {}
  record = {f"{prefix}_{k}": result[k] for k in ("loss", "pixel_accuracy", "miou", "dice")}
  record.update({f"{prefix}_iou_{name}": v for name, v in result["iou"].items()})
  return record


class _Evaluator:
  """Evaluation at an eval point and everything recorded with it.

  The order matters for crash safety: figure, best checkpoint, and last the metrics.jsonl record, which
  marks the evaluation done (a run resumed at an eval point without its record evaluates it again).
  """

  def __init__(self, config: ml_collections.ConfigDict, workdir: Path, model: models.UNet, eval_input: Any,
               ckpt: checkpoint.Checkpointer, writer: metric_writer.SummaryWriter, learning_rate_fn: optax.Schedule,
               steps_per_epoch: int, start_time: float, layout: packed.Layout):
    self.config, self.workdir, self.eval_input = config, workdir, eval_input
    self.ckpt, self.writer, self.learning_rate_fn = ckpt, writer, learning_rate_fn
    self.steps_per_epoch, self.start_time, self.layout = steps_per_epoch, start_time, layout
    self.inference_variables, variables_layout = pmapped_inference_variables(layout)
    self.p_eval_step = pmapped_eval_step(config, model.clone(batch_norm_folded=True), variables_layout)
    self.best_miou = ckpt.best_metric()

  def __call__(self, buffers: tuple[jax.Array, ...], step: int, train_result: dict[str, Any] | None,
               images_per_sec: float | None) -> None:
    """Evaluates the replicated state packed in ``buffers`` (``parallel.replicate_state``) at ``step``;
    ``images_per_sec`` is the training rate since the last evaluation (None when none trained: a redone
    evaluation at resume)."""
    eval_result, shown = evaluate(self.p_eval_step, self.inference_variables(buffers), self.eval_input,
                                  self.config.train.num_figure_examples)
    # train_steps: how many steps the train_* means cover (fewer than the interval after a resume within it).
    record = {"step": step, "epoch": round(step / self.steps_per_epoch, 3),
              **_flat_record("train", train_result),
              **({"train_steps": train_result["num_steps"]} if train_result else {}),
              **_flat_record("eval", eval_result),
              "images_per_sec": images_per_sec, "learning_rate": float(self.learning_rate_fn(step - 1)),
              "elapsed_sec": time.time() - self.start_time, "wall_time": time.time()}
    train_line = ("train loss %.4f acc %.4f mIoU %.4f | " % (
        train_result["loss"], train_result["pixel_accuracy"], train_result["miou"]) if train_result else "")
    logging.info("epoch %g (step %d): %seval loss %.4f acc %.4f mIoU %.4f Dice %.4f%s", record["epoch"], step,
                 train_line, eval_result["loss"], eval_result["pixel_accuracy"], eval_result["miou"],
                 eval_result["dice"], "" if images_per_sec is None else f" | {images_per_sec:.1f} img/s")
    for key, value in record.items():
      if key not in ("step", "wall_time", "train_steps") and value is not None:
        # "eval_miou" → "eval/miou": TensorBoard groups the train and eval curves. The train_* means since the
        # last evaluation go to train_epoch/: train/ has the loop's means over log_every_steps, some at this step.
        tag = (key.replace("train_", "train_epoch/", 1) if key.startswith("train_")
               else key.replace("_", "/", 1) if key.startswith("eval_") else key)
        self.writer.scalar(tag, value, step)
    self.writer.flush()
    if shown:
      plots.save_prediction_triplets(shown["image"], shown["mask"], shown["class_map"],
                                     self.workdir / FIGURES_DIR / f"predictions_step_{step:07d}.png",
                                     input_range=self.config.data.input_range)
    if self.best_miou is None or eval_result["miou"] > self.best_miou:
      self.best_miou = eval_result["miou"]
      self.ckpt.save_best(parallel.host_state(buffers, self.layout), self.best_miou)
    metrics_log.append_record(self.workdir / METRICS_FILE, record)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
  """Trains ``config`` in ``workdir`` (resuming from its latest checkpoint) and returns the final state.

  Raises:
    config_checks.ConfigError, input_pipeline.DataError, weights.WeightsError: an unusable config or data
      (raised before the workdir is created or changed; except a trimap value outside 1-3 in a prepared tfds
      download, which is found only when its batch is read, during training).
    checkpoint.CheckpointError: the workdir is locked by another process or holds an incompatible run.
    stopping.TrainingInterrupted: after SIGINT/SIGTERM, once a checkpoint of the current step is written.
    FloatingPointError: the loss became NaN/inf; nothing after the divergence is saved.
  """
  start_time = time.time()
  workdir = Path(workdir)
  logging.get_absl_logger().addFilter(_QUIET_ORBAX)
  num_devices = jax.local_device_count()
  config_checks.validate_config(config, num_devices)
  logging.info("devices: %d (%s)", num_devices, jax.local_devices()[0].platform)
  # Read-only look at the workdir: fail fast on an incompatible resume.
  resuming, init_from = bool(checkpoint.available_steps(workdir)), None
  if resuming:
    checkpoint.check_resume_config(workdir, config)
  elif config.model.init_from:
    init_from = read_init_from(config)  # Fails fast: a missing run, a Keras file of another model.

  from petseg_jax import input_pipeline  # pylint: disable=g-import-not-at-top  # TensorFlow: see top.
  input_pipeline.check_train_eval_disjoint(config.data)
  train_input = input_pipeline.TrainInput(config.data, config.train.batch_size, seed=config.seed,
                                          num_devices=num_devices)
  eval_input = input_pipeline.EvalInput(config.data, config.data.eval_split, config.train.batch_size,
                                        num_devices=num_devices)
  steps_per_epoch = train_input.steps_per_epoch  # >= 1: TrainInput refuses a batch larger than the split.
  total_steps = (config.train.num_train_steps if config.train.num_train_steps > 0
                 else config.train.num_epochs * steps_per_epoch)
  num_epochs = math.ceil(total_steps / steps_per_epoch)
  logging.info("train: %d examples, %d steps/epoch, %d steps (%d epochs); eval (%s): %d examples",
               train_input.num_examples, steps_per_epoch, total_steps, num_epochs,
               config.data.eval_split, eval_input.num_examples)
  unfreeze_at = freezing_lib.unfreeze_step(config, steps_per_epoch)
  if unfreeze_at is not None and unfreeze_at >= total_steps:
    logging.warning("config.train.unfreeze_after_epochs=%d unfreezes the encoder at step %d, but the run "
                    "ends at step %d: the encoder stays frozen throughout.",
                    config.train.unfreeze_after_epochs, unfreeze_at, total_steps)

  model = create_model(config)
  init_rng, dropout_rng = run_rngs(config)
  learning_rate_fn = create_learning_rate_fn(config.train, total_steps)
  if resuming:  # Restored from the checkpoint: only its shapes are needed.
    state = abstract_train_state(config, model, learning_rate_fn, steps_per_epoch)
  else:
    start = None if init_from is None else checked_init_from(model, config.data.image_size, init_from)
    state = create_train_state(init_rng, config, model, learning_rate_fn, steps_per_epoch, start)
  freezing_lib.check_freezing(config, state.variables)

  _make_workdir(workdir)
  with checkpoint.lock_workdir(workdir):
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
      return _train(config, workdir, ckpt, state, model, train_input, eval_input, total_steps,
                    learning_rate_fn, dropout_rng, start_time)
    finally:
      ckpt.close()


def check_same_train_examples(workdir: str | os.PathLike, attempts: Sequence[dict[str, Any]],
                              config: ml_collections.ConfigDict, num_examples: int) -> None:
  """Refuses to resume ``workdir`` (its ``attempts``: ``provenance.read_provenance``) on another number of
  training examples than it trained on.

  The config check allows ``data.data_dir`` to change (the same data moved), and a folder's content may
  change in place: a resume mid-epoch on another example list would see some images twice and others never,
  and the epochs' length, the schedule and the unfreezing step would move.

  Raises:
    checkpoint.CheckpointError: the recorded number differs (runs that recorded none are not checked).
  """
  trained_on = provenance.recorded_train_examples(attempts)
  if trained_on is not None and trained_on != num_examples:
    raise checkpoint.CheckpointError(
        f"{workdir} trained on {trained_on} examples of config.data.train_split={config.data.train_split!r}, "
        f"which now has {num_examples} (config.data.data_dir={config.data.data_dir!r}): the epochs, the data "
        "order and the schedule would change mid-run. Give the data it trained on, or start a new run in "
        "another --workdir.")


def run_rngs(config: ml_collections.ConfigDict) -> tuple[jax.Array, jax.Array]:
  """A run's initialization and dropout keys, both from ``config.seed``."""
  init_rng, dropout_rng = jax.random.split(jax.random.PRNGKey(config.seed))
  return init_rng, dropout_rng


def _make_workdir(workdir: Path) -> None:
  try:
    workdir.mkdir(parents=True, exist_ok=True)
  except OSError as e:  # A path below a file, no permission, a read-only disk.
    raise checkpoint.CheckpointError(f"Cannot create the workdir {workdir} ({e}); pass another --workdir.") from e


def write_initial_run(config: ml_collections.ConfigDict, workdir: str | os.PathLike) -> TrainState:
  """Writes the state ``config`` starts training from into a new ``workdir``: a run at step 0.

  The state is ``train_and_evaluate``'s first (``model.init_from``'s variables, or a random init with
  ``model.encoder_weights``), saved as the workdir's step-0 checkpoint beside its ``config.json``.
  ``scripts/evaluate.py`` and ``scripts/predict.py`` read it like any run, and ``scripts/train.py`` resumes
  it: how ``scripts/import_keras_unet.py`` turns a Keras U-Net into a run.

  Raises:
    config_checks.ConfigError, input_pipeline.DataError, weights.WeightsError: an unusable config (before
      anything is written).
    checkpoint.CheckpointError: ``workdir`` holds checkpoints already, or cannot be written.
  """
  workdir = Path(workdir)
  logging.get_absl_logger().addFilter(_QUIET_ORBAX)
  config_checks.validate_config(config, jax.local_device_count())  # What training would refuse is not written.

  def refuse_a_run() -> None:
    if checkpoint.available_steps(workdir):
      raise checkpoint.CheckpointError(f"{workdir} holds a run's checkpoints already; pass a new --workdir.")

  refuse_a_run()
  model = create_model(config)
  start = (checked_init_from(model, config.data.image_size, read_init_from(config)) if config.model.init_from
           else None)
  init_rng, _ = run_rngs(config)
  # The learning-rate schedule and the epoch length shape the optimizer's updates, not its state: training
  # builds its own when it resumes.
  state = create_train_state(init_rng, config, model, create_learning_rate_fn(config.train, 1), 1, start)
  freezing_lib.check_freezing(config, state.variables)
  _make_workdir(workdir)
  with checkpoint.lock_workdir(workdir):
    refuse_a_run()  # Again, holding the lock: another process may have started a run here meanwhile.
    ckpt = checkpoint.Checkpointer(workdir, keep=config.train.keep_checkpoints)
    try:
      checkpoint.write_config(workdir, config)
      provenance.record_attempt(workdir, provenance.read_provenance(workdir), 0, None)
      ckpt.save(state)
    finally:
      ckpt.close()
  return state


def _train(config: ml_collections.ConfigDict, workdir: Path, ckpt: checkpoint.Checkpointer,
           state: TrainState, model: models.UNet, train_input: Any, eval_input: Any, total_steps: int,
           learning_rate_fn: optax.Schedule, dropout_rng: jax.Array, start_time: float) -> TrainState:
  """The loop of ``train_and_evaluate``, run holding the workdir's lock."""
  steps_per_epoch = train_input.steps_per_epoch
  num_epochs = math.ceil(total_steps / steps_per_epoch)
  resume_step, changes = ckpt.latest_step(), {}
  # Read first: a damaged provenance.jsonl stops the run before anything is written.
  attempts = provenance.read_provenance(workdir)
  if resume_step is not None:
    # Checked again now that the lock is held: another process may have written a run here meanwhile.
    changes = checkpoint.check_resume_config(workdir, config)
    check_same_train_examples(workdir, attempts, config, train_input.num_examples)
    state = ckpt.restore_latest(state)
    logging.info("Resuming from %s at step %d.", workdir / checkpoint.LATEST_DIR, resume_step)
    if changes:  # Allowed (RESUME_KEYS are equal), but the schedule, the data or the loss change mid-run.
      logging.warning("Resuming at step %d with changed settings (%s); the earlier config is kept as "
                      "config_before_step_%d.json.", resume_step,
                      "; ".join(f"{key}: {saved!r} -> {now!r}" for key, (saved, now) in changes.items()),
                      resume_step)
  elif isinstance(state.step, jax.ShapeDtypeStruct):  # Only its shapes: made to restore a checkpoint into.
    raise checkpoint.CheckpointError(f"The checkpoints in {workdir} were removed while this run started to "
                                     "resume them; run the command again.")
  # Records after the starting step belong to a crashed attempt; they are redone. So is its best checkpoint
  # (else its mIoU stays the bar, and `--checkpoint best` may restore a model of another config). Read first:
  # a damaged metrics.jsonl stops the run before its config.json is rewritten.
  records = metrics_log.truncate_metrics(workdir, resume_step or 0)
  checkpoint.write_config(workdir, config, keep_previous_at=resume_step if changes else None)
  code_changes = provenance.record_attempt(workdir, attempts, resume_step or 0, train_input.num_examples)
  if code_changes:
    logging.warning("%s at step %d with other code than the attempt before (%s): the steps from here are "
                    "computed with it; %s records each attempt's.",
                    "Starting again" if resume_step is None else "Resuming", resume_step or 0,
                    "; ".join(code_changes), workdir / provenance.PROVENANCE_FILE)
  stale_best = ckpt.discard_best_after(resume_step or 0)
  if stale_best is not None:
    logging.warning("Deleted the best checkpoint of step %d in %s: it is after the starting step %d (an "
                    "attempt that did not checkpoint that far); the evaluations from there are redone.",
                    stale_best, workdir / checkpoint.BEST_DIR, resume_step or 0)

  def is_eval_step(step: int) -> bool:
    return step == total_steps or (
        step % steps_per_epoch == 0 and (step // steps_per_epoch) % config.train.eval_every_epochs == 0)

  def last_checkpoint() -> str:
    last = ckpt.latest_step()
    return f"step {last} in {workdir / checkpoint.LATEST_DIR}" if last is not None else "none"

  step = int(state.step)
  # Which layers are frozen follows from the variables' paths alone: their shapes, not a copy kept all run.
  variables_for_freezing = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), state.variables)
  buffers, layout = parallel.replicate_state(state)  # The state between steps: packed, on the devices.
  del state
  dropout_rngs = parallel.replicate(dropout_rng)
  p_train_steps = {}  # freezing_lib.Freezing → pmapped step, compiled once per phase.
  writer = metric_writer.SummaryWriter(workdir)
  # Also at step 0: an attempt killed before its first checkpoint logged steps that are trained again.
  writer.mark_start(step)
  evaluator = _Evaluator(config, workdir, model, eval_input, ckpt, writer, learning_rate_fn, steps_per_epoch,
                         start_time, layout)
  train_metrics = _TrainMetrics(learning_rate_fn)

  def save() -> None:
    try:
      ckpt.save(parallel.host_state(buffers, layout))
    except FloatingPointError as e:  # NaN parameters with a still finite loss.
      raise diverged(str(e), float(learning_rate_fn(step - 1)), last_checkpoint()) from e

  # Steps whose train/ means are due: each is logged parallel.PREFETCH_BATCHES steps later (or at the next checkpoint,
  # epoch end or stop), so that reading its metrics never waits for the step just dispatched: the devices
  # keep those steps queued while the host fetches, writes and reads the next batch.
  log_points: collections.deque[int] = collections.deque()

  def log(log_step: int) -> None:
    """train/* means over the steps after the previous log point up to ``log_step`` (those still pending are
    fetched now; a checkpoint or an epoch's end may have fetched the first ones)."""
    train_metrics.flush(last_checkpoint(), through=log_step)
    interval = train_metrics.take_interval()
    bar.set_postfix(loss=f"{interval['loss']:.4f}", acc=f"{interval['pixel_accuracy']:.4f}")
    writer.scalar("train/loss", interval["loss"], log_step)
    writer.scalar("train/pixel_accuracy", interval["pixel_accuracy"], log_step)
    writer.scalar("train/learning_rate", float(learning_rate_fn(log_step - 1)), log_step)

  def flush_all() -> None:
    """Logs the due log points, then fetches every pending step (waits for the devices)."""
    while log_points:
      log(log_points.popleft())
    train_metrics.flush(last_checkpoint())

  def stopped(signum: int) -> stopping.TrainingInterrupted:
    """Checkpoints the current step for a graceful stop; returns the exception to raise."""
    flush_all()  # Never save past a non-finite loss.
    save()
    return stopping.TrainingInterrupted(
        f"Stopped by {signal.Signals(signum).name} after step {step}; checkpoint saved in "
        f"{workdir / checkpoint.LATEST_DIR}. Run the same command again to resume.", signum)

  first_epoch = step // steps_per_epoch
  if step >= total_steps:
    logging.info("Already trained to step %d (of %d).", step, total_steps)
    first_epoch = num_epochs
  train_time, train_examples = 0.0, 0
  # The writer is closed on the way out of a stop or a divergence too: the points logged up to there are kept.
  with stopping.graceful_stop() as stop, contextlib.closing(writer):
    if resume_step is not None and is_eval_step(step) and step not in [r["step"] for r in records]:
      evaluator(buffers, step, None, None)  # The attempt before stopped between checkpoint and record.
    for epoch in range(first_epoch, num_epochs):
      if stop.signum is not None:  # Arrived during the evaluation: stop before the next step.
        raise stopped(stop.signum)
      # Unfreezing happens at an epoch boundary: one compiled step per phase.
      freezing = freezing_lib.freezing_at(config, variables_for_freezing, step, steps_per_epoch)
      if freezing not in p_train_steps:
        p_train_steps[freezing] = pmapped_train_step(config, freezing, layout)
        logging.info("From step %d: %s.", step, freezing.describe())
      run_step = p_train_steps[freezing]
      epoch_end = min((epoch + 1) * steps_per_epoch, total_steps)
      bar = tqdm.tqdm(total=epoch_end - epoch * steps_per_epoch, initial=step - epoch * steps_per_epoch,
                      desc=f"epoch {epoch + 1}/{num_epochs}" + (" (encoder frozen)" if freezing.encoder else ""),
                      unit="step", disable=None, leave=False)
      epoch_start, epoch_first_step = time.time(), step
      batches = train_input.epoch(epoch, start_step=step - epoch * steps_per_epoch)
      for batch in parallel.device_batches(itertools.islice(batches, epoch_end - step)):
        buffers, step_metrics = run_step(buffers, batch, dropout_rngs)
        step += 1
        train_metrics.add(step, step_metrics)
        bar.update(1)
        if step % config.train.log_every_steps == 0:
          log_points.append(step)
        if log_points and step - log_points[0] >= parallel.PREFETCH_BATCHES:
          log(log_points.popleft())
        if stop.signum is not None:
          bar.close()
          raise stopped(stop.signum)
        if step % config.train.checkpoint_every_steps == 0:
          flush_all()  # Never save past a non-finite loss.
          save()
      flush_all()  # Waits for the devices: the epoch's time is complete.
      bar.close()
      train_time += time.time() - epoch_start
      train_examples += (step - epoch_first_step) * config.train.batch_size
      images_per_sec = train_examples / max(train_time, 1e-9)
      if is_eval_step(step):
        evaluator(buffers, step, train_metrics.summary(), images_per_sec)
        train_metrics.reset()
        train_time, train_examples = 0.0, 0
      elif train_metrics.num_steps:
        summary = train_metrics.summary()
        logging.info("epoch %d/%d (step %d): train loss %.4f acc %.4f mIoU %.4f (since the last evaluation) "
                     "| %.1f img/s", epoch + 1, num_epochs, step, summary["loss"], summary["pixel_accuracy"],
                     summary["miou"], images_per_sec)

  save()
  history = read_metrics(workdir)
  if history:
    plots.save_training_curves(history, workdir / FIGURES_DIR / "training_curves.png",
                               eval_split=config.data.eval_split)
  logging.info("Done: step %d in %.1f s; workdir %s", step, time.time() - start_time, workdir)
  return parallel.host_state(buffers, layout)
