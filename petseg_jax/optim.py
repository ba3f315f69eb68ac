"""The optimizer: Adam with Keras defaults, and freezing parameters by path (big_vision style).

Parameters are labelled by their path ("encoder/block_1_expand/kernel") against the regexes in
``config.train.frozen_params``. The matched group is

* frozen (``optax.set_to_zero()``: no update, no optimizer state) while ``model.freeze_encoder`` holds,
* or frozen until the step at which ``train.unfreeze_after_epochs`` unfreezes it, then trained with its own
  Adam at ``train.encoder_lr_multiplier`` times the learning rate,
* or, with ``model.freeze_encoder=False``, trained from the start at that multiplied learning rate.

Every other parameter gets Adam at the base learning rate. Freezing in the optimizer keeps the parameters
fixed; that frozen BatchNorm layers run on their running statistics (and that a wholly frozen encoder's
backward pass is not computed at all) is the model's part (``freezing.freezing_at``).
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple, Sequence

import flax
import jax
import jax.numpy as jnp
import ml_collections
import optax

FROZEN = "frozen"
TRAINABLE = "trainable"

# Keras' Adam defaults (the tutorial's optimizer="adam"). Note eps: Keras uses 1e-7, optax 1e-8.
KERAS_ADAM = dict(b1=0.9, b2=0.999, eps=1e-7)


def _param_paths(params: Any) -> list[str]:
  return ["/".join(path) for path in flax.traverse_util.flatten_dict(flax.core.unfreeze(params))]


def compile_patterns(patterns: Sequence[str]) -> list[re.Pattern]:
  """``config.train.frozen_params`` as compiled regexes; ValueError naming an invalid one."""
  compiled = []
  for pattern in patterns:
    try:
      compiled.append(re.compile(pattern))
    except re.error as e:
      raise ValueError(f"config.train.frozen_params: {pattern!r} is not a valid regex ({e}).") from e
  return compiled


def param_labels(params: Any, patterns: Sequence[str]) -> Any:
  """Labels each parameter FROZEN if its path fully matches one of ``patterns``, else TRAINABLE.

  Raises:
    ValueError: a pattern is not a valid regex or matches no parameter (most likely a typo, which would
      otherwise silently train what was meant to be frozen).
  """
  compiled = compile_patterns(patterns)
  paths = _param_paths(params)
  for pattern in compiled:
    if not any(pattern.fullmatch(path) for path in paths):
      raise ValueError(
          f"config.train.frozen_params: {pattern.pattern!r} matches no parameter. Patterns must match the "
          f"whole path, e.g. {paths[0]!r}; top-level groups: "
          f"{sorted({p.split('/')[0] for p in paths})}.")

  def label(path: tuple[str, ...], _: Any) -> str:
    name = "/".join(path)
    return FROZEN if any(pattern.fullmatch(name) for pattern in compiled) else TRAINABLE

  return flax.traverse_util.path_aware_map(label, flax.core.unfreeze(params))


def covers_subtree(labels: Any, subtree: str) -> bool:
  """Whether every parameter under the top-level ``subtree`` (e.g. "encoder") is labelled FROZEN."""
  leaves = jax.tree.leaves(labels[subtree]) if subtree in labels else []
  return bool(leaves) and all(label == FROZEN for label in leaves)


def keras_adam(learning_rate: optax.ScalarOrSchedule, weight_decay: float = 0.0
               ) -> optax.GradientTransformation:
  """Keras' Adam (b1 .9, b2 .999, eps 1e-7); decoupled weight decay (AdamW) when weight_decay > 0."""
  if weight_decay > 0:
    return optax.adamw(learning_rate, weight_decay=weight_decay, **KERAS_ADAM)
  return optax.adam(learning_rate, **KERAS_ADAM)


class FrozenUntilState(NamedTuple):
  """``frozen_until``'s state: the steps taken so far, and the inner optimizer's (initial until unfrozen)."""
  count: jax.Array
  inner_state: optax.OptState


def frozen_until(inner: optax.GradientTransformation, start_step: int) -> optax.GradientTransformation:
  """Zero updates before ``start_step`` and ``inner`` from then on.

  Before ``start_step`` the inner state is not touched, so Adam's bias correction counts from the
  unfreezing step (as a freshly compiled Keras model would) rather than from step 0.
  """

  def init_fn(params):
    return FrozenUntilState(count=jnp.zeros([], jnp.int32), inner_state=inner.init(params))

  def update_fn(updates, state, params=None):
    def frozen(_):
      return jax.tree.map(jnp.zeros_like, updates), state.inner_state

    def live(_):
      return inner.update(updates, state.inner_state, params)

    updates, inner_state = jax.lax.cond(state.count >= start_step, live, frozen, None)
    return updates, FrozenUntilState(count=optax.safe_increment(state.count), inner_state=inner_state)

  return optax.GradientTransformation(init_fn, update_fn)


def create_optimizer(train_config: ml_collections.ConfigDict, learning_rate_fn: optax.Schedule,
                     labels: Any, *, freeze: bool, unfreeze_step: int | None
                     ) -> optax.GradientTransformation:
  """The training optimizer.

  Args:
    train_config: ``config.train`` (weight_decay, encoder_lr_multiplier).
    learning_rate_fn: step → base learning rate.
    labels: ``param_labels(params, train_config.frozen_params)``.
    freeze: whether the FROZEN group starts frozen (``config.model.freeze_encoder``).
    unfreeze_step: the step from which a frozen group is trained; None keeps it frozen for good.
  """
  trainable = keras_adam(learning_rate_fn, train_config.weight_decay)
  multiplier = train_config.encoder_lr_multiplier
  if not freeze:
    group = keras_adam(lambda step: multiplier * learning_rate_fn(step), train_config.weight_decay)
  elif unfreeze_step is None:
    group = optax.set_to_zero()
  else:
    # The inner Adam counts from the unfreezing step; its schedule follows the global step.
    group = frozen_until(
        keras_adam(lambda count: multiplier * learning_rate_fn(count + unfreeze_step),
                   train_config.weight_decay),
        unfreeze_step)
  return optax.multi_transform({TRAINABLE: trainable, FROZEN: group}, labels)
