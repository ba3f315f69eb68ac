"""A pytree of float arrays packed into one flat device buffer, for compiled calls with fewer arguments.

Each argument buffer of a compiled call costs host time at every call (PjRt's per-buffer bookkeeping):
for the U-Net's ~270 variables, 0.7-0.8 ms per call on the 2-core CPU host, and 0.7-1.2 ms on an H200 host,
about as long as the GPU's own work for a batch of 64 (BENCHMARKS.md, "GPU: one NVIDIA H200, 2026-11-27,
second lease"). Packed once with ``pack``, the variables are one argument; ``unpack`` inside the compiled
function slices them back out. XLA fuses the slices into the elementwise ops that read them; on a GPU it
copies the matmuls' weight operands out (device to device, 0.07-0.12 ms a call on the H200), much less
than the host time saved. ``Layout`` is hashable, so it can be a static argument of ``jax.jit``: calls with
the same tree structure, shapes and dtypes share one compilation.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


@dataclasses.dataclass(frozen=True)
class Layout:
  """Where each leaf of a packed pytree lies in the flat buffer: its structure, shapes and dtypes."""
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[str, ...]

  @property
  def sizes(self) -> tuple[int, ...]:
    return tuple(math.prod(shape) for shape in self.shapes)


def pack(tree: Any) -> tuple[jax.Array, Layout]:
  """``tree``'s leaves raveled and concatenated into one array of their common float dtype, and its layout.

  Raises ValueError naming the leaf if a leaf is not a floating-point array: a common dtype would not hold
  integers exactly.
  """
  leaves_with_paths, treedef = jax.tree_util.tree_flatten_with_path(tree)
  leaves = [leaf for _, leaf in leaves_with_paths]
  for path, leaf in leaves_with_paths:
    if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
      raise ValueError(f"packed.pack takes floating-point leaves only; {jax.tree_util.keystr(path)} is "
                       f"{jnp.result_type(leaf)}. Pass the integer leaves separately.")
  layout = Layout(treedef, tuple(tuple(np.shape(leaf)) for leaf in leaves),
                  tuple(jnp.result_type(leaf).name for leaf in leaves))
  dtype = jnp.result_type(*leaves) if leaves else jnp.float32
  flat = jnp.concatenate([jnp.ravel(jnp.asarray(leaf, dtype)) for leaf in leaves] or [jnp.zeros((0,), dtype)])
  return flat, layout


def unpack(flat: jax.Array, layout: Layout) -> Any:
  """The pytree that ``pack`` packed into ``flat`` with ``layout``, each leaf in its own dtype again."""
  if flat.shape != (sum(layout.sizes),):
    raise ValueError(f"packed.unpack: a buffer of shape {flat.shape} does not match its layout of "
                     f"{sum(layout.sizes)} elements in {len(layout.sizes)} leaves.")
  offsets = np.cumsum((0,) + layout.sizes)
  leaves = [flat[start:stop].reshape(shape).astype(dtype)
            for start, stop, shape, dtype in zip(offsets[:-1], offsets[1:], layout.shapes, layout.dtypes)]
  return jax.tree_util.tree_unflatten(layout.treedef, leaves)
