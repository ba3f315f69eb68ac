"""petseg_jax.packed: a pytree in one flat buffer per dtype and back, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petseg_jax import packed


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
                     "bn": {"scale": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)}},
          "opt": {"count": jnp.int32(7), "mu": jnp.asarray(rng.normal(size=(8,)), jnp.float32)},
          "step": np.int32(3)}


def test_unpack_gives_back_every_leaf_bit_for_bit_in_its_dtype():
  tree = _tree()
  buffers, layout = packed.pack(tree, concatenate=True)
  assert {b.dtype: b.shape for b in buffers} == {jnp.dtype(jnp.bfloat16): (8,), jnp.dtype(jnp.int32): (2,),
                                                 jnp.dtype(jnp.float32): (3 * 3 * 4 * 8 + 8,)}
  for back in (jax.jit(packed.unpack, static_argnums=1)(buffers, layout),
               packed.unpack(jax.device_get(buffers), layout)):  # On the device, and on the host.
    assert jax.tree.structure(back) == jax.tree.structure(tree)
    for original, restored in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
      assert restored.dtype == original.dtype and restored.shape == np.shape(original)
      np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))


def test_layouts_of_equal_structures_are_equal_and_hashable():
  """A jit static argument: other values of the same structure must hit the same compilation."""
  (_, a), (_, b) = packed.pack(_tree(0), True), packed.pack(_tree(1), True)
  assert a == b and hash(a) == hash(b)
  _, other = packed.pack({"params": _tree()["params"]}, True)
  assert other != a


@pytest.mark.parametrize("concatenate", [True, False])
def test_the_layout_and_buffer_shapes_follow_from_shapes_alone(concatenate):
  """layout_of reads only shapes and dtypes (jax.eval_shape's output will do); abstract_buffers describes pack's
  buffers, so a function of packed buffers can be traced before any exist."""
  tree = _tree()
  buffers, layout = packed.pack(tree, concatenate)
  assert packed.layout_of(jax.eval_shape(lambda: tree), concatenate) == layout
  assert [(b.shape, b.dtype) for b in packed.abstract_buffers(layout)] == [
      (np.shape(b), jnp.asarray(b).dtype) for b in buffers]


def test_buffers_that_do_not_fit_the_layout_are_refused():
  buffers, layout = packed.pack(_tree(), concatenate=True)
  with pytest.raises(ValueError, match="do not match their layout"):
    packed.unpack(buffers[:2], layout)
  with pytest.raises(ValueError, match="do not match their layout"):
    packed.unpack((buffers[0], buffers[1][1:], buffers[2]), layout)


def test_unconcatenated_packing_passes_the_leaves_behind_the_same_interface():
  tree = _tree()
  leaves, layout = packed.pack(tree, concatenate=False)
  assert not layout.concatenated and len(leaves) == len(jax.tree.leaves(tree))
  back = jax.jit(packed.unpack, static_argnums=1)(leaves, layout)
  for original, restored in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    np.testing.assert_array_equal(np.asarray(restored), np.asarray(original))
  with pytest.raises(ValueError, match="leaves given for a layout of"):
    packed.unpack(leaves[1:], layout)
  assert packed.pack(tree)[1].concatenated == (jax.default_backend() != "cpu")  # Packs on accelerators.


def test_a_host_tree_is_packed_on_the_host_into_the_same_buffers():
  """replicate_state packs a host copy of the state: no round trip through one device before replicating."""
  tree = _tree()
  on_device, layout = packed.pack(tree, concatenate=True)
  host_tree = jax.device_get(tree)
  host_tree["opt"]["count"] = 7  # A Python scalar leaf: int32 as JAX would make it.
  on_host, host_layout = packed.pack(host_tree, concatenate=True)
  assert host_layout == layout
  assert all(type(b) is np.ndarray for b in on_host)
  for device_buffer, host_buffer in zip(on_device, on_host):
    assert host_buffer.dtype == device_buffer.dtype
    np.testing.assert_array_equal(host_buffer, np.asarray(device_buffer))
