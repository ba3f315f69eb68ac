"""Exports a trained run as the tutorial's Keras U-Net, for Keras and TensorFlow tools (TF Serving, TFLite).

  python scripts/export_keras_unet.py --workdir runs/quick --output runs/quick/unet.keras [--checkpoint best]

Builds the tutorial's Keras model (``model.alpha``, ``model.decoder_filters``, ``model.num_classes`` and
``data.image_size`` of the run's config.json), gives it the checkpoint's weights, checks that its logits equal
the run's model's on random inputs, and only then writes it: ``.keras`` (Keras 3's format), ``.h5`` (the
legacy whole model) or ``.weights.h5`` (weights only), as ``--output`` ends. Its inputs are the run's: images
resized to ``data.image_size`` and scaled as ``data.input_range`` says; its outputs are logits of the classes
0 pet, 1 background, 2 border. ``scripts/import_keras_unet.py`` reads such a file back. The logic lives in
``petseg_jax/inference.py`` (``export_keras_unet``) and ``petseg_jax/weights.py``.
"""

import sys
from pathlib import Path

# As in the other scripts: this checkout's petseg_jax, not whichever copy is installed.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import tensorflow as tf

from petseg_jax import inference  # pylint: disable=g-import-not-at-top
from petseg_jax import weights

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Workdir of a training run (scripts/train.py --workdir).")
flags.DEFINE_string("output", None, "The Keras file to write: .keras, .h5 or .weights.h5.")
flags.DEFINE_string("checkpoint", "latest",
                    "Which checkpoint: 'latest', 'best' (best mIoU on the run's eval split) or a step.")
flags.mark_flags_as_required(["workdir", "output"])


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tf.config.set_visible_devices([], "GPU")  # Keras builds and checks the model; the accelerators are JAX's.
  try:
    config = inference.load_run_config(FLAGS.workdir)
    _, variables, step = inference.restore_model(config, FLAGS.workdir, FLAGS.checkpoint)
    difference = inference.export_keras_unet(config, variables, FLAGS.output)
  except (inference.WorkdirError, weights.WeightsError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  model, size = config.model, config.data.image_size
  print(f"wrote {FLAGS.output}: step {step} ({FLAGS.checkpoint}) of {FLAGS.workdir} as the tutorial's Keras "
        f"U-Net (alpha={model.alpha}, decoder_filters={tuple(model.decoder_filters)}, "
        f"num_classes={model.num_classes}); inputs {size}x{size} scaled to {config.data.input_range}; its logits "
        f"equal the run's within {difference:.1e} of their scale.")


if __name__ == "__main__":
  app.run(main)
