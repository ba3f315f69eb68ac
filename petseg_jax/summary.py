"""Parameter counts of the U-Net per module, trainable or frozen, counted as Keras' ``model.summary()``.

Shapes come from ``jax.eval_shape`` (no weights loaded, nothing computed). A parameter is frozen when
``config.model.freeze_encoder`` holds and its path matches ``config.train.frozen_params``, labelled by the
optimizer's own ``optim.param_labels``. Keras counts BatchNorm moving mean/variance as non-trainable
parameters; they are the ``batch_stats`` collection here and are counted the same way, so the totals match
Keras (the tutorial's model, alpha 1.0 at 128x128: 6,504,227 total, 4,660,323 trainable).
"""

from __future__ import annotations

import dataclasses
import re

import flax
import ml_collections
import numpy as np

from petseg_jax import freezing as freezing_lib
from petseg_jax import models
from petseg_jax import optim


@dataclasses.dataclass
class ModuleCount:
  """Parameter counts of one module (an encoder block or a decoder block)."""
  name: str
  trainable: int = 0
  frozen: int = 0
  batch_stats: int = 0  # BatchNorm moving mean/variance: non-trainable in Keras' count.

  @property
  def total(self) -> int:
    return self.trainable + self.frozen + self.batch_stats


def module_name(path: tuple[str, ...]) -> str:
  """The module a variable belongs to: Keras' MobileNetV2 blocks for the encoder, up_i/last for the decoder.

  ("encoder", "block_3_expand_BN", "mean") → "encoder/block_3"; Conv1/bn_Conv1 → "encoder/stem";
  expanded_conv_* → "encoder/expanded_conv" (block 0).
  """
  top, layer = path[0], path[1]
  if top == "encoder":
    match = re.match(r"(block_\d+|expanded_conv)_", layer)
    if match:
      return f"encoder/{match.group(1)}"
    if layer in ("Conv1", "bn_Conv1"):
      return "encoder/stem"
  return f"{top}/{layer}"


def _order(name: str) -> tuple[int, int, str]:
  """Network order: encoder stem, expanded_conv, block_1..; then the decoder up_0.., last."""
  top, _, layer = name.partition("/")
  number = re.search(r"\d+", layer)
  rank = {"stem": 0, "expanded_conv": 1, "last": 3}.get(layer, 2)
  return (0 if top == "encoder" else 1, rank, f"{int(number.group()):04d}" if number else layer)


def count_parameters(config: ml_collections.ConfigDict) -> list[ModuleCount]:
  """Counts per module, in network order.

  Raises:
    ValueError: a ``config.train.frozen_params`` pattern is invalid or matches nothing (from optim), or
      none of the encoder under ``model.freeze_encoder`` (``config_checks.ConfigError``).
  """
  model = models.create_model(config.model)
  shapes = flax.core.unfreeze(models.variable_shapes(model, config.data.image_size))
  params = shapes["params"]
  freezing_lib.check_freezing(config, shapes)  # What training refuses is not summarized as if it trained so.
  if config.model.freeze_encoder:
    labels = flax.traverse_util.flatten_dict(optim.param_labels(params, config.train.frozen_params))
  else:
    labels = {}  # Nothing frozen: every parameter trains from the start.
  counts: dict[str, ModuleCount] = {}
  for collection in ("params", "batch_stats"):
    for path, leaf in flax.traverse_util.flatten_dict(shapes.get(collection, {})).items():
      name = module_name(path)
      count = counts.setdefault(name, ModuleCount(name))
      size = int(np.prod(leaf.shape))
      if collection == "batch_stats":
        count.batch_stats += size
      elif labels.get(path) == optim.FROZEN:
        count.frozen += size
      else:
        count.trainable += size
  return [counts[name] for name in sorted(counts, key=_order)]


def totals(counts: list[ModuleCount]) -> dict[str, int]:
  """Keras' three numbers: total, trainable and non-trainable (frozen + BatchNorm statistics)."""
  trainable = sum(c.trainable for c in counts)
  frozen = sum(c.frozen for c in counts)
  batch_stats = sum(c.batch_stats for c in counts)
  return {"total": trainable + frozen + batch_stats, "trainable": trainable,
          "non_trainable": frozen + batch_stats, "frozen": frozen, "batch_stats": batch_stats}


def format_table(config: ml_collections.ConfigDict, counts: list[ModuleCount]) -> str:
  """The per-module table and Keras-style totals."""
  m, size = config.model, config.data.image_size
  width = max(len(c.name) for c in counts + [ModuleCount("module")])
  header = f"{'module':<{width}} {'trainable':>11} {'frozen':>11} {'BN stats':>9} {'total':>11}"
  lines = [f"UNet: MobileNetV2 alpha {m.alpha} encoder, decoder filters {tuple(m.decoder_filters)}, "
           f"{m.num_classes} classes; input {size}x{size}x3",
           header, "-" * len(header)]
  for c in counts:
    lines.append(f"{c.name:<{width}} {c.trainable:>11,} {c.frozen:>11,} {c.batch_stats:>9,} {c.total:>11,}")
  t = totals(counts)
  lines += ["-" * len(header),
            f"{'total':<{width}} {t['trainable']:>11,} {t['frozen']:>11,} {t['batch_stats']:>9,} "
            f"{t['total']:>11,}",
            "",
            f"Total params: {t['total']:,}",
            f"Trainable params: {t['trainable']:,}",
            f"Non-trainable params: {t['non_trainable']:,} (frozen parameters {t['frozen']:,} + BatchNorm "
            f"moving mean/variance {t['batch_stats']:,}, counted as Keras does)"]
  if m.freeze_encoder:
    lines.append(f"Frozen: parameters matching config.train.frozen_params {tuple(config.train.frozen_params)}"
                 + (f", until epoch {config.train.unfreeze_after_epochs}"
                    if config.train.unfreeze_after_epochs >= 0 else "") + ".")
  else:
    lines.append("Frozen: nothing (config.model.freeze_encoder=False).")
  return "\n".join(lines)


def summarize(config: ml_collections.ConfigDict) -> str:
  """``format_table`` of ``count_parameters``."""
  return format_table(config, count_parameters(config))
