"""The tutorial's Keras model, built the way the TensorFlow segmentation tutorial builds it.

Used by the parity tests (``tests/keras_reference.py`` re-exports it), by ``scripts/benchmark.py
--compare-keras`` and by ``weights`` (Keras 3 weight files are read into these models). Keras is imported
inside the functions, so importing this module is cheap.
"""

from __future__ import annotations

import numpy as np

from petseg_jax.models.mobilenet_v2 import TAP_NAMES


def keras_encoder(alpha: float, image_size: int, weights: str | None = None):
  """keras.applications.MobileNetV2 (no top) and a sub-model returning the five U-Net taps."""
  import keras

  base = keras.applications.MobileNetV2(
      input_shape=(image_size, image_size, 3), alpha=alpha, include_top=False, weights=weights)
  taps = keras.Model(base.input, [base.get_layer(n).output for n in TAP_NAMES], name="down_stack")
  return base, taps


def keras_unet(alpha: float = 1.0, image_size: int = 128, num_classes: int = 3,
               weights: str | None = None, decoder_filters=(512, 256, 128, 64), freeze_encoder: bool = True):
  """The tutorial's unet_model: frozen down_stack + pix2pix upsample blocks + last Conv2DTranspose
  (``freeze_encoder=False``: the down_stack trainable, BatchNorm included, as a fine-tuning run)."""
  import keras

  _, down_stack = keras_encoder(alpha, image_size, weights)
  down_stack.trainable = not freeze_encoder

  def upsample(filters: int, size: int):
    return keras.Sequential([
        keras.layers.Conv2DTranspose(filters, size, strides=2, padding="same", use_bias=False,
                                     kernel_initializer=keras.initializers.RandomNormal(0.0, 0.02)),
        keras.layers.BatchNormalization(),
        keras.layers.ReLU(),
    ])

  up_stack = [upsample(f, 3) for f in decoder_filters]
  inputs = keras.layers.Input(shape=[image_size, image_size, 3])
  skips = down_stack(inputs)
  x = skips[-1]
  for up, skip in zip(up_stack, reversed(skips[:-1])):
    x = up(x)
    x = keras.layers.Concatenate()([x, skip])
  x = keras.layers.Conv2DTranspose(num_classes, 3, strides=2, padding="same")(x)
  return keras.Model(inputs=inputs, outputs=x)


def randomize_keras_weights(model, seed: int = 0) -> None:
  """Random weights everywhere, including BatchNorm statistics (so inference-mode BN is exercised)."""
  rng = np.random.default_rng(seed)
  for layer in model.weights:
    name = layer.path if hasattr(layer, "path") else layer.name
    shape = tuple(layer.shape)
    if name.endswith("moving_variance"):
      value = rng.uniform(0.5, 2.0, shape)
    elif name.endswith("gamma"):
      value = rng.uniform(0.5, 1.5, shape)
    elif name.endswith(("beta", "moving_mean", "bias")):
      value = rng.normal(0.0, 0.2, shape)
    else:  # Kernels: He-like scale so activations stay O(1) through 50 layers.
      fan_in = np.prod(shape[:-1]) if len(shape) > 1 else 1
      if "depthwise" in name:
        fan_in = shape[0] * shape[1]
      value = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    layer.assign(value.astype(np.float32))
