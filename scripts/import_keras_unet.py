"""Imports the tutorial's whole U-Net, saved by Keras, as a petseg_jax run at step 0.

  python scripts/import_keras_unet.py --source unet.keras --workdir runs/keras_unet \
      --config.data.input_range='[0,1]' [--config configs/default.py] [--config.model.alpha=0.35 ...]

Keras reads ``--source`` into the tutorial model built from the config's ``model.alpha``,
``model.decoder_filters`` and ``model.num_classes`` (default: the tutorial's, alpha 1.0): Keras 3's
``model.save("unet.keras")``, ``model.save("unet.h5")`` or ``model.save_weights("unet.weights.h5")``, or
tf.keras 2's ``.keras``, ``.h5`` or ``save_weights("unet.h5")``. The workdir then holds ``config.json`` and a
step-0 checkpoint of the training state (``model.init_from`` records the file), so that

  python scripts/evaluate.py --workdir runs/keras_unet [--config.data.source=folder --config.data.data_dir=…]
  python scripts/predict.py --workdir runs/keras_unet --output runs/keras_unet/predictions IMAGE...

measure and use the Keras model with petseg_jax's exact metrics. To train on from it, start a run with
``--config.model.init_from=unet.keras`` instead. A Keras file does not record how its inputs were scaled,
so ``--config.data.input_range`` must be given: ``'[0,1]'`` for the tutorial's ``normalize`` (image / 255),
``'[-1,1]'`` for ``keras.applications.mobilenet_v2.preprocess_input``. The input size comes from the file where
it records one (a whole model saved as ``.keras`` or ``.h5``); a weight file does not, and the config's
``data.image_size`` holds. ``--config.data.image_size`` overrides either (with a warning if it differs from
the file's).
"""

import sys
from pathlib import Path

# Config files import their base as `from configs import default`: make the repo root importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from ml_collections import config_flags
import tensorflow as tf

from petseg_jax import checkpoint  # pylint: disable=g-import-not-at-top
from petseg_jax import cli_flags
from petseg_jax import config_checks
from petseg_jax import config_files
from petseg_jax import input_pipeline
from petseg_jax import train
from petseg_jax import weights

FLAGS = flags.FLAGS
flags.DEFINE_string("source", None, "The Keras U-Net: a .keras, .h5 or .weights.h5 file.")
flags.DEFINE_string("workdir", None, "The new run's directory (must hold no checkpoints yet).")
cli_flags.define_config_file_flag(
    sys.argv, config_files.DEFAULT_CONFIG,
    "The run's configuration: its model settings must describe the Keras model; override fields with "
    "--config.section.key=value.")
flags.mark_flags_as_required(["source", "workdir"])

INPUT_RANGE_FLAG = "--config.data.input_range"


def main(argv: list[str]) -> None:
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Given in any flag syntax (--config.data.input_range=…, -config…, a --flagfile), as train.py reads them.
  if "data.input_range" not in config_flags.get_override_values(FLAGS["config"]):
    raise app.UsageError(
        f"Say how the Keras model's inputs were scaled: {INPUT_RANGE_FLAG}='[0,1]' (the tutorial's "
        "normalize, image / 255) or '[-1,1]' (mobilenet_v2.preprocess_input). A Keras file does not record it, "
        "and the wrong one gives a wrong model, not an error.")
  if not weights.is_keras_file(FLAGS.source):
    raise app.UsageError(f"--source={FLAGS.source!r} is not a Keras file (.keras, .h5, .weights.h5).")
  tf.config.set_visible_devices([], "GPU")  # Keras reads a file; the accelerators are JAX's.
  config = FLAGS.config
  recorded_size = weights.keras_file_image_size(FLAGS.source)
  if recorded_size is not None and recorded_size != config.data.image_size:
    if "data.image_size" in config_flags.get_override_values(FLAGS["config"]):
      print(f"warning: {FLAGS.source} is a Keras model of {recorded_size}x{recorded_size} inputs; the run will "
            f"read {config.data.image_size}x{config.data.image_size} ones, as --config.data.image_size says: its "
            "numbers are this model's at that size, not the Keras model's.", file=sys.stderr)
    else:  # The size the Keras model was built, trained and measured at.
      print(f"{FLAGS.source} is a Keras model of {recorded_size}x{recorded_size} inputs: the run takes "
            f"config.data.image_size={recorded_size} from it (the config says {config.data.image_size}).")
      config.data.image_size = recorded_size
  config.model.init_from = str(Path(FLAGS.source).resolve())
  config.model.encoder_weights = ""  # The whole model, encoder included, comes from the file.
  try:
    train.write_initial_run(config, FLAGS.workdir)
  except (config_checks.ConfigError, weights.WeightsError, checkpoint.CheckpointError, input_pipeline.DataError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  model = config.model
  size = config.data.image_size
  print(f"wrote {FLAGS.workdir}: step 0 of the Keras U-Net {FLAGS.source} (alpha={model.alpha}, "
        f"decoder_filters={tuple(model.decoder_filters)}, num_classes={model.num_classes}, inputs {size}x{size} "
        f"in {config.data.input_range}). Evaluate it: python scripts/evaluate.py --workdir {FLAGS.workdir}")


if __name__ == "__main__":
  # parse_flags: a --config.x=y naming a field the config lacks gets a message instead of a traceback.
  app.run(main, flags_parser=cli_flags.parse_flags)
