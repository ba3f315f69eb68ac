"""Prints the model's parameters per module: ``python scripts/summary.py [--config configs/X.py]``.

Without --config, the model ``scripts/train.py`` trains without one (the quickstart); the tutorial's is
``--config configs/default.py``.

Trainable / frozen as the config trains them (model.freeze_encoder, train.frozen_params) and BatchNorm
moving statistics, with Keras-style totals. Needs no weights (shapes only). The logic lives in
``petseg_jax/summary.py``.
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

from petseg_jax import cli_flags
from petseg_jax import config_files
from petseg_jax import summary

FLAGS = flags.FLAGS

cli_flags.define_config_file_flag(sys.argv, config_files.QUICKSTART_CONFIG,
                                  "Configuration file (default: the quickstart, as scripts/train.py); override "
                                  "fields with --config.section.key=value.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    print(summary.summarize(FLAGS.config))
  except ValueError as e:  # Invalid model fields or frozen_params patterns; the message names them.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parse_flags)
