"""Data sources of the input pipeline: image decoding, the folder builder and synthetic pets.

`petseg_jax.input_pipeline` is the public entry point; these modules are its parts.
"""

from petseg_jax.data.errors import DataError

__all__ = ["DataError"]
