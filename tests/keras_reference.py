"""Re-export of ``petseg_jax.keras_reference`` (the tutorial's Keras model), which the benchmark also uses."""

from petseg_jax.keras_reference import keras_encoder, keras_unet, randomize_keras_weights

__all__ = ["keras_encoder", "keras_unet", "randomize_keras_weights"]
