"""Data parallelism's plumbing for the ``jax.pmap``-ed steps: the state and batches on every local device.

The steps are pmapped with ``axis_name=AXIS`` (also the UNet's BatchNorm axis). Between steps the state stays
on the devices, on accelerators packed into one buffer per dtype (``replicate_state``), and batches go to the
devices ``PREFETCH_BATCHES`` steps ahead (``device_batches``): on a GPU, a batch-64 step is short enough that
passing ~300 arrays and copying the batch took longer than its kernels.
"""

from __future__ import annotations

import collections
from typing import Any, Iterable, Iterator

from flax import jax_utils
import jax
import numpy as np

from petseg_jax import packed

AXIS = "batch"  # pmap axis name; also the UNet's BatchNorm axis.
PREFETCH_BATCHES = 2  # Training batches put on the devices ahead of their step (device_batches).


def replicate_state(state: Any, concatenate: bool | None = None
                    ) -> tuple[tuple[jax.Array, ...], packed.Layout]:
  """``state`` (a ``train.TrainState``, or variables for ``train.pmapped_eval_step``) packed (``packed.pack``:
  one buffer per dtype, by default on accelerators only) and copied to every local device, as the pmapped
  steps take it; and its layout."""
  buffers, layout = packed.pack(jax.device_get(state), concatenate)
  return replicate(buffers), layout


def host_state(buffers: tuple[jax.Array, ...], layout: packed.Layout) -> Any:
  """The first device's copy of a packed replicated state: the tree it was (e.g. a ``train.TrainState``), of
  host NumPy arrays."""
  return packed.unpack(first_replica(buffers), layout)


def replicate(tree: Any) -> Any:
  """``tree`` copied to every local device with a leading device axis, as ``jax.pmap`` takes it.

  Sharded over a mesh axis named ``AXIS``, like the outputs of the pmapped steps (all pmapped with
  ``axis_name=AXIS``): pmap compiles per input sharding, and with flax's default axis name the first step
  was compiled twice (once for the replicated state, once for the state it returns). Host copies: given
  device arrays, ``jax_utils.replicate`` stacks them on the device, compiling one small program per distinct
  leaf shape.
  """
  return jax_utils.replicate(jax.device_get(tree), axis_name=AXIS)


def first_replica(tree: Any) -> Any:
  """The first device's copy of a pmapped (replicated or per-device) pytree, as host NumPy arrays.

  Like ``jax.device_get(jax_utils.unreplicate(tree))`` without its cost: that indexes each leaf on the
  device, compiling one small program per distinct leaf shape; this copies the first device's buffer.
  """
  def first(x):
    return np.asarray(x.addressable_data(0))[0] if isinstance(x, jax.Array) else np.asarray(x)[0]
  return jax.tree.map(first, tree)


def device_batches(batches: Iterable[dict[str, np.ndarray]], ahead: int = PREFETCH_BATCHES
                   ) -> Iterator[dict[str, jax.Array]]:
  """Host batches (leading axis: the local devices) put on the devices ``ahead`` batches before their step.

  Each array goes over in one transfer, sharded over the mesh axis ``AXIS`` as the pmapped steps' inputs and
  outputs are, and while earlier steps run: fed as host arrays, every step first waits for its batch's copy
  (2-3 ms of a 7-8 ms bfloat16 step on an H200). flax's ``prefetch_to_device`` would split each array per
  device and stack it again on the host.
  """
  mesh = jax.sharding.Mesh(np.array(jax.local_devices()), (AXIS,))
  sharding = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))
  return run_ahead((jax.device_put(batch, sharding) for batch in batches), ahead)


def run_ahead(items: Iterable[Any], ahead: int) -> Iterator[Any]:
  """``items`` in order, each yielded once ``ahead`` later ones have been taken from the iterable (at the end,
  the rest): the work that makes an item (a transfer, a dispatched step) runs ``ahead`` items early."""
  queue: collections.deque[Any] = collections.deque()
  for item in items:
    queue.append(item)
    if len(queue) > ahead:
      yield queue.popleft()
  yield from queue
