"""BatchNorm folded into the convolution before it, for inference.

In inference mode a BatchNorm is a per-channel affine map, ``(y - mean) * k + beta`` with ``k = scale /
sqrt(var + eps)``, of a convolution's output ``y = conv(x, kernel)``; so ``conv(x, kernel * k) + (beta - mean
* k)`` is the same function with one operation left per BatchNorm instead of four. ``fold_batch_norm`` turns a
U-Net's variables into those of ``UNet(batch_norm_folded=True)``, whose BatchNorms are ``FoldedBatchNorm``s
(``x + bias``). ``prediction.Predictor`` and evaluation (``train.pmapped_inference_variables``) do this once per
set of variables.
"""

from __future__ import annotations

from typing import Any

import jax
from flax import traverse_util

from petseg_jax.models.mobilenet_v2 import BN_EPSILON
from petseg_jax.models.unet import DECODER_BN_EPSILON

def _convolution_of(batch_norm: tuple[str, ...]) -> tuple[str, ...]:
  """The path of the convolution whose output the BatchNorm at ``batch_norm`` normalizes (Keras names in the
  encoder: ``bn_Conv1`` after ``Conv1``, ``block_1_expand_BN`` after ``block_1_expand``; ``up_i/bn`` after
  ``up_i/conv_transpose`` in the decoder)."""
  *parent, name = batch_norm
  if name.startswith("bn_"):
    return (*parent, name[len("bn_"):])
  if name.endswith("_BN"):
    return (*parent, name[:-len("_BN")])
  if name == "bn":
    return (*parent, "conv_transpose")
  raise ValueError(f"fold_batch_norm: no convolution is known to come before the BatchNorm "
                   f"{'/'.join(batch_norm)}; only the U-Net's own layer names are.")


@jax.jit  # One program per model: run op by op it compiled ~60 small programs per process (3.4-3.9 s, 2 cores).
def fold_batch_norm(variables: dict[str, Any]) -> dict[str, Any]:
  """The variables of ``UNet(batch_norm_folded=True)`` for a U-Net's ``{"params", "batch_stats"}``.

  Each BatchNorm's scale and running statistics are folded into the kernel of the convolution before it
  (scaled per output channel, in float32) and its bias becomes ``beta - mean * k``; ``batch_stats`` is gone.
  The folded model computes the same logits as the unfolded one in inference mode up to rounding (float32:
  ~1e-6 of the largest logit, 6e-7 to 4e-6 measured over alphas and image sizes; bfloat16 kernels are rounded
  after scaling instead of before). Compiled (``jax.jit``): the structure is checked when it is traced.

  Raises:
    ValueError: the variables have no ``batch_stats``, or a BatchNorm has no convolution of its width
      before it (the variables are not a U-Net's).
  """
  if "params" not in variables or "batch_stats" not in variables:
    raise ValueError(f"fold_batch_norm needs a U-Net's 'params' and 'batch_stats' (running statistics); "
                     f"got collections {sorted(variables)}.")
  params = traverse_util.flatten_dict(variables["params"])
  statistics = traverse_util.flatten_dict(variables["batch_stats"])
  folded = dict(params)
  for path in statistics:
    if path[-1] != "mean":
      continue
    batch_norm = path[:-1]
    convolution = (*_convolution_of(batch_norm), "kernel")
    kernel = params.get(convolution)
    channels = statistics[path].shape[-1]
    if kernel is None or kernel.shape[-1] != channels:
      found = "none" if kernel is None else f"one of shape {tuple(kernel.shape)}"
      raise ValueError(f"fold_batch_norm: the BatchNorm {'/'.join(batch_norm)} ({channels} channels) needs "
                       f"the kernel {'/'.join(convolution)} with {channels} output channels; found {found}.")
    epsilon = DECODER_BN_EPSILON if batch_norm[0] == "decoder" else BN_EPSILON  # The encoder's own too.
    k = params[(*batch_norm, "scale")] * jax.lax.rsqrt(statistics[(*batch_norm, "var")] + epsilon)
    folded[convolution] = kernel * k  # Output channels are the kernel's last axis.
    folded[(*batch_norm, "bias")] = params[(*batch_norm, "bias")] - statistics[path] * k
    del folded[(*batch_norm, "scale")]
  return {"params": traverse_util.unflatten_dict(folded)}
