"""A pytree packed into a few flat buffers (one per dtype), for compiled calls with few arguments.

Each argument buffer of a compiled call costs host time at every call (PjRt's per-buffer bookkeeping). On an
H200 that was as long as the GPU's own work: 0.7-1.2 ms for the U-Net's 273 variables in a batch-64
inference call (1.1 ms of kernels), 4.2 ms for a training step's ~300 state buffers in and out (2.2 ms of
kernels); on the 2-core CPU host, ~0.8 ms of a ~400 ms call (BENCHMARKS.md, "GPU: one NVIDIA H200,
2026-11-27, second lease"). Packed, the tree is one argument per dtype; ``unpack`` inside the compiled
function slices the leaves back out, and ``pack`` inside it gathers a new tree's leaves again. Packing is
exact (each leaf stays in its own dtype). XLA fuses the slices into the elementwise ops that read them; on a
GPU it copies the matmuls' weight operands out (device to device, 0.07-0.12 ms a call on the H200), much
less than the host time saved. ``Layout`` is hashable, so it can be a static argument of ``jax.jit``: trees
of the same structure, shapes and dtypes share one compilation.
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
  """Where each leaf of a packed pytree lies: its structure, and each leaf's shape and dtype (a leaf is in the
  buffer of its dtype, after the leaves of that dtype before it in the tree's order)."""
  treedef: Any
  shapes: tuple[tuple[int, ...], ...]
  dtypes: tuple[np.dtype, ...]
  concatenated: bool = True  # False: the "buffers" are the leaves themselves, in the tree's order.

  @property
  def buffer_dtypes(self) -> tuple[np.dtype, ...]:
    """The dtype of each buffer, in the order of their first leaf."""
    return tuple(dict.fromkeys(self.dtypes))

  def buffer_sizes(self) -> tuple[int, ...]:
    """Elements in each buffer."""
    return tuple(sum(math.prod(shape) for shape, d in zip(self.shapes, self.dtypes) if d == dtype)
                 for dtype in self.buffer_dtypes)


def _dtype(leaf: Any) -> np.dtype:
  """The dtype a leaf has as a JAX array (64-bit host arrays become 32-bit unless x64 is enabled)."""
  return jax.dtypes.canonicalize_dtype(getattr(leaf, "dtype", None) or np.result_type(leaf))


def pack(tree: Any, concatenate: bool | None = None) -> tuple[tuple[Any, ...], Layout]:
  """``tree``'s leaves raveled and concatenated, one buffer per dtype, and the layout to unpack them.

  ``concatenate=False``: the leaves as they are (``jax.tree.flatten``), behind the same interface. The
  default packs where it pays, on accelerators: on the 2-core CPU host the packed programs ran at the same
  speed, and a packed training step compiled 1.7 s longer (6.7 s against 5.0 s).
  """
  layout = layout_of(tree, concatenate)
  leaves = jax.tree.leaves(tree)
  if not layout.concatenated:
    return tuple(leaves), layout
  # Host leaves are packed on the host (a state about to be copied to every device need not go through one
  # first); device arrays and tracers with jnp.
  xp = jnp if any(isinstance(leaf, jax.Array) for leaf in leaves) else np
  buffers = tuple(xp.concatenate([xp.ravel(leaf).astype(dtype) for leaf, d in zip(leaves, layout.dtypes)
                                  if d == dtype])
                  for dtype in layout.buffer_dtypes)
  return buffers, layout


def layout_of(tree: Any, concatenate: bool | None = None) -> Layout:
  """The layout ``pack`` gives ``tree``, from its leaves' shapes and dtypes alone (so ``jax.ShapeDtypeStruct``
  leaves, as ``jax.eval_shape`` returns them, will do); ``concatenate`` as in ``pack``."""
  if concatenate is None:
    concatenate = jax.default_backend() != "cpu"
  leaves, treedef = jax.tree.flatten(tree)
  return Layout(treedef, tuple(tuple(leaf.shape if hasattr(leaf, "shape") else np.shape(leaf)) for leaf in leaves),
                tuple(_dtype(leaf) for leaf in leaves), concatenate)


def abstract_buffers(layout: Layout) -> tuple[jax.ShapeDtypeStruct, ...]:
  """The shapes and dtypes of the buffers that ``pack`` makes with ``layout`` (for ``jax.eval_shape``)."""
  if not layout.concatenated:
    return tuple(jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in zip(layout.shapes, layout.dtypes))
  return tuple(jax.ShapeDtypeStruct((size,), dtype)
               for size, dtype in zip(layout.buffer_sizes(), layout.buffer_dtypes))


def unpack(buffers: tuple[Any, ...], layout: Layout) -> Any:
  """The pytree that ``pack`` packed into ``buffers`` with ``layout`` (device or host NumPy buffers)."""
  if not layout.concatenated:
    if len(buffers) != len(layout.shapes):
      raise ValueError(f"packed.unpack: {len(buffers)} leaves given for a layout of {len(layout.shapes)}.")
    return jax.tree.unflatten(layout.treedef, buffers)
  sizes = layout.buffer_sizes()
  if len(buffers) != len(sizes) or any(np.shape(b) != (size,) for b, size in zip(buffers, sizes)):
    raise ValueError(f"packed.unpack: buffers of shapes {[np.shape(b) for b in buffers]} do not match their "
                     f"layout's {[(size,) for size in sizes]} (dtypes {[str(d) for d in layout.buffer_dtypes]}).")
  which = {dtype: i for i, dtype in enumerate(layout.buffer_dtypes)}
  offsets = [0] * len(buffers)
  leaves = []
  for shape, dtype in zip(layout.shapes, layout.dtypes):
    i, size = which[dtype], math.prod(shape)
    leaves.append(buffers[i][offsets[i]:offsets[i] + size].reshape(shape))
    offsets[i] += size
  return jax.tree.unflatten(layout.treedef, leaves)
