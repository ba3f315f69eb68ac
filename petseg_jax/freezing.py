"""Which layers a frozen run keeps fixed, and how the model runs them: read from the config and the variables.

The optimizer freezes parameters by path (``train.frozen_params``, ``optim.param_labels``); this module says
what else follows from that freeze at a given step: whether the whole encoder is frozen (its backward pass is
skipped), which BatchNorm layers run on their running statistics, and when ``train.unfreeze_after_epochs``
ends it.
"""

from __future__ import annotations

import collections
from typing import Any, NamedTuple

from absl import logging
import flax
import jax
import ml_collections

from petseg_jax import optim
from petseg_jax.config_checks import ConfigError


def unfreeze_step(config: ml_collections.ConfigDict, steps_per_epoch: int) -> int | None:
  """The step at which a frozen encoder starts training, or None if it stays frozen (or never was)."""
  if not config.model.freeze_encoder or config.train.unfreeze_after_epochs < 0:
    return None
  return config.train.unfreeze_after_epochs * steps_per_epoch


def _batch_norms_by_freezing(labels: Any, batch_stats: Any) -> tuple[set[str], set[str]]:
  """The paths of the BatchNorm layers (those with ``batch_stats``) whose parameters ``labels`` (``optim``'s)
  freeze all of, and of those whose parameters they freeze some of."""
  layer_labels = collections.defaultdict(set)  # Layer path → its parameters' labels.
  for path, label in flax.traverse_util.flatten_dict(labels).items():
    layer_labels["/".join(path[:-1])].add(label)
  batch_norms = {"/".join(path[:-1]) for path in flax.traverse_util.flatten_dict(batch_stats)}
  frozen = {path for path in batch_norms if layer_labels[path] == {optim.FROZEN}}
  partly = {path for path in batch_norms if len(layer_labels[path]) > 1}
  return frozen, partly


def check_freezing(config: ml_collections.ConfigDict, variables: dict[str, Any]) -> None:
  """Raises ConfigError if ``model.freeze_encoder`` holds but ``train.frozen_params`` match no encoder
  parameter of ``variables`` (``{"params", "batch_stats"}``, any values): the "frozen" encoder would train in
  full. Warns of BatchNorm layers they freeze part of: those keep normalizing with batch statistics."""
  if not config.model.freeze_encoder:
    return
  labels = optim.param_labels(variables["params"], config.train.frozen_params)
  if optim.FROZEN not in jax.tree.leaves(labels.get("encoder", {})):
    raise ConfigError(f"config.model.freeze_encoder=True but config.train.frozen_params="
                      f"{tuple(config.train.frozen_params)!r} match no encoder parameter: the encoder would train "
                      "in full. Match it (e.g. ('encoder/.*',)), or set model.freeze_encoder=False.")
  _, partly = _batch_norms_by_freezing(labels, variables["batch_stats"])
  if partly:
    logging.warning("config.train.frozen_params freeze some but not all parameters of the BatchNorm layers %s: "
                    "those stay fixed, but the layers keep normalizing with batch statistics and updating their "
                    "moving averages (only a layer whose scale and bias are both frozen runs on its running "
                    "statistics).", ", ".join(sorted(partly)))


class Freezing(NamedTuple):
  """How a training step runs the frozen layers: static, one compiled step per value (i.e. per phase).

  Attributes:
    encoder: the whole encoder is frozen: BatchNorm on running statistics, outputs ``stop_gradient``-ed (no
      encoder backward pass); ``UNet(..., frozen_encoder=True)``.
    batch_norms: the paths (e.g. "encoder/block_1_expand_BN", "decoder/up_0/bn") of the other BatchNorm
      layers whose parameters (scale and bias) are all frozen, which run on their running statistics and keep
      them, as Keras' ``trainable=False`` layers (``UNet(..., frozen_batch_norms=...)``). The frozen
      parameters themselves are the optimizer's part.
  """
  encoder: bool = False
  batch_norms: tuple[str, ...] = ()

  def describe(self) -> str:
    """E.g. "the encoder frozen", for the log."""
    parts = (["the encoder frozen"] if self.encoder else []) + (
        [f"BatchNorm layers {', '.join(self.batch_norms)} on running statistics"] if self.batch_norms else [])
    return "; ".join(parts) or "no layer frozen"


def freezing_at(config: ml_collections.ConfigDict, variables: dict[str, Any], step: int,
                steps_per_epoch: int) -> Freezing:
  """How the model runs its frozen layers at ``step`` (``variables``: ``{"params", "batch_stats"}``, any
  values): those ``train.frozen_params`` match, while ``model.freeze_encoder`` holds and
  ``train.unfreeze_after_epochs`` has not unfrozen them; from then on, none."""
  start = unfreeze_step(config, steps_per_epoch)
  if not config.model.freeze_encoder or (start is not None and step >= start):
    return Freezing()
  labels = optim.param_labels(variables["params"], config.train.frozen_params)
  encoder = optim.covers_subtree(labels, "encoder")
  frozen, _ = _batch_norms_by_freezing(labels, variables["batch_stats"])
  return Freezing(encoder=encoder, batch_norms=tuple(sorted(
      path for path in frozen if not (encoder and path.startswith("encoder/")))))
