"""Trains a U-Net: ``python scripts/train.py [--config configs/X.py] --workdir DIR [--config.a.b=v ...]``.

This file is intentionally kept short (as google/flax examples/imagenet/main.py): the logic lives in
``petseg_jax/train.py``. Without --config it trains the quickstart (offline, real pet images, a few
minutes on a CPU). Running the same command again in the same workdir resumes from the latest checkpoint.
"""

import sys
from pathlib import Path

# Config files import their base as `from configs import default`: make the repo root importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":  # Before JAX and TensorFlow load: glibc reads its tunables at start-up only.
  host.restart_with_tunables()
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from absl import logging
from ml_collections import config_flags

from petseg_jax import cli_flags
from petseg_jax import config_files

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics, figures and TensorBoard logs.")
cli_flags.define_config_file_flag(
    sys.argv, config_files.QUICKSTART_CONFIG,
    "Training configuration file; override fields with --config.section.key=value.")
flags.mark_flags_as_required(["workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  # Whatever the syntax (--config.a.b=v, -config.a.b v, a --flagfile).
  ignored = config_files.ignored_override(FLAGS.config, config_flags.get_override_values(FLAGS["config"]))
  if ignored:
    print(f"error: --config.{ignored}", file=sys.stderr)
    sys.exit(1)
  # JAX, TensorFlow and the training code load here, once the flags are good: --help and a mistyped flag
  # answer in seconds (TensorFlow alone takes ~6 s to import on 2 cores).
  # pylint: disable=g-import-not-at-top
  import jax
  import tensorflow as tf

  from petseg_jax import checkpoint
  from petseg_jax import config_checks
  from petseg_jax import input_pipeline
  from petseg_jax import metrics_log
  from petseg_jax import stopping
  from petseg_jax import train
  from petseg_jax import weights
  # pylint: enable=g-import-not-at-top

  # Problems with a clear message of their own: shown as one "error: ..." line, without a traceback.
  user_errors = (config_checks.ConfigError, FloatingPointError, checkpoint.CheckpointError,
                 input_pipeline.DataError, metrics_log.MetricsFileError, weights.WeightsError)
  # Hide GPUs from TensorFlow (used for data only), so that it does not claim memory JAX needs.
  tf.config.set_visible_devices([], "GPU")
  logging.info("JAX process %d / %d; local devices: %r", jax.process_index(), jax.process_count(),
               jax.local_devices())
  try:
    train.train_and_evaluate(FLAGS.config, FLAGS.workdir)
  except stopping.TrainingInterrupted as e:
    logging.error("%s", e)
    sys.exit(128 + e.signum)
  except user_errors as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  # parse_flags: a --config.x=y naming a field the config lacks gets a message instead of a traceback.
  app.run(main, flags_parser=cli_flags.parse_flags)
