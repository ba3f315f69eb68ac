"""Converts Keras MobileNetV2 weights into petseg_jax's encoder weight format (.npz).

  python scripts/convert_keras_weights.py --source ../shared/weights/<file>.h5 --alpha 0.35 \
      --output encoder_0.35.npz

``--source`` takes a legacy Keras ``.h5`` (as ``keras.applications`` downloads it), a Keras 3 ``.weights.h5``
or ``.keras`` file (of a MobileNetV2, or of a whole model nesting one, e.g. the tutorial U-Net), or
``imagenet`` (downloads through ``keras.applications``; needs a network). The output loads with
``config.model.encoder_weights=<output>``.
"""

import sys
from pathlib import Path

# As in the other scripts: this checkout's petseg_jax, not whichever copy is installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

from absl import app, flags  # pylint: disable=g-import-not-at-top

from petseg_jax import weights  # pylint: disable=g-import-not-at-top

FLAGS = flags.DEFINE_string("source", None, "Keras weight file, or 'imagenet'.", required=True)
ALPHA = flags.DEFINE_float("alpha", 1.0, "MobileNetV2 width multiplier of the weights.")
OUTPUT = flags.DEFINE_string("output", None, "Where to write the converted .npz.", required=True)


def main(argv: list[str]) -> None:
  del argv
  if not OUTPUT.value.lower().endswith(".npz"):
    sys.exit(f"--output must end with .npz, got {OUTPUT.value!r}")
  try:
    # Errors about a mismatched alpha name this command's flag, not the training config's field.
    variables = weights.encoder_variables_from_keras(FLAGS.value, ALPHA.value, alpha_setting="--alpha")
  except weights.WeightsError as e:
    sys.exit(f"error: {e}")
  weights.save_encoder_variables(OUTPUT.value, variables, ALPHA.value)
  count = sum(v.size for c in variables.values() for layer in c.values() for v in layer.values())
  print(f"wrote {OUTPUT.value}: MobileNetV2 alpha={ALPHA.value} encoder, {count:,} values")


if __name__ == "__main__":
  app.run(main)
