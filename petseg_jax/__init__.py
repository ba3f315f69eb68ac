"""petseg_jax: a JAX/Flax U-Net (MobileNetV2 encoder) for Oxford-IIIT Pet segmentation.

Import the modules themselves (``from petseg_jax import train, prediction, input_pipeline``); this file
imports none of them, so that importing one pulls in only what it needs (TensorFlow only with the data).
"""

from importlib import metadata

try:
  __version__ = metadata.version("petseg_jax")
except metadata.PackageNotFoundError:  # Imported from a checkout that was never installed.
  __version__ = "0+unknown"
