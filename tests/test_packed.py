"""petseg_jax.packed: a pytree in one flat buffer and back, exactly."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petseg_jax import packed


def _tree(seed=0):
  rng = np.random.default_rng(seed)
  return {"params": {"conv": {"kernel": jnp.asarray(rng.normal(size=(3, 3, 4, 8)), jnp.float32)},
                     "bn": {"scale": jnp.asarray(rng.normal(size=(8,)), jnp.bfloat16)}},
          "batch_stats": {"bn": {"mean": jnp.asarray(rng.normal(size=(8,)), jnp.float32),
                                 "count": jnp.float32(3.0)}}}


def test_unpack_gives_back_every_leaf_bit_for_bit_in_its_dtype():
  tree = _tree()
  flat, layout = packed.pack(tree)
  assert flat.shape == (3 * 3 * 4 * 8 + 8 + 8 + 1,) and flat.dtype == jnp.float32
  back = jax.jit(packed.unpack, static_argnums=1)(flat, layout)
  assert jax.tree.structure(back) == jax.tree.structure(tree)
  for original, restored in zip(jax.tree.leaves(tree), jax.tree.leaves(back)):
    assert restored.dtype == original.dtype and restored.shape == original.shape
    np.testing.assert_array_equal(np.asarray(restored, np.float32), np.asarray(original, np.float32))


def test_layouts_of_equal_structures_are_equal_and_hashable():
  """A jit static argument: other values of the same structure must hit the same compilation."""
  (_, a), (_, b) = packed.pack(_tree(0)), packed.pack(_tree(1))
  assert a == b and hash(a) == hash(b)
  _, other = packed.pack({"params": _tree()["params"]})
  assert other != a


def test_integer_leaves_and_mismatched_buffers_are_refused_by_name():
  with pytest.raises(ValueError, match=r"\['step'\] is int32"):
    packed.pack({"w": jnp.ones(2), "step": jnp.int32(3)})
  flat, layout = packed.pack(_tree())
  with pytest.raises(ValueError, match="does not match its layout"):
    packed.unpack(flat[1:], layout)
