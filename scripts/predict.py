"""Segments image files: ``python scripts/predict.py --workdir DIR --output OUT IMAGE_OR_FOLDER...``.

For each image (any size; JPEG/PNG/GIF/BMP/WebP/... decoded by content; folders expand to their image
files) writes into OUT: ``<name>_mask.png`` (class ids 0 pet / 1 background / 2 border, one byte per pixel,
the image's size), ``<name>_overlay.png`` (class colours over the image) and, for an image
``<root>/images/NAME.*`` with a trimap ``<root>/annotations/trimaps/NAME.png`` (the Oxford layout),
``<name>_triplet.png`` (input | true mask | predicted mask). Unreadable files are reported and skipped. A photo
with an EXIF orientation is predicted, and its outputs written, upright as viewers show it (``--noupright``:
the stored pixel grid, as the data pipeline reads images).
Exit code: 0 if every file was predicted, 1 otherwise. The logic lives in ``petseg_jax/inference.py``.
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
import tensorflow as tf

from configs import default
from petseg_jax import checkpoint
from petseg_jax import cli_flags
from petseg_jax import files as files_lib
from petseg_jax import inference
from petseg_jax import input_pipeline

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Workdir of a training run (scripts/train.py --workdir).")
flags.DEFINE_string("output", None, "Folder for the output PNGs (created if needed).")
flags.DEFINE_string("checkpoint", "latest",
                    "Which checkpoint: 'latest', 'best' (best mIoU on the run's eval split) or a step.")
flags.DEFINE_integer("batch_size", 16, "Images predicted per batch (the last batch is padded).")
flags.DEFINE_bool("upright", True, "Turn each image as its EXIF orientation says (as image viewers show it) "
                  "before predicting; masks and figures are then upright too. --noupright predicts the stored "
                  "pixel grid, as the data pipeline reads images.")
flags.mark_flags_as_required(["workdir", "output"])
_SAVED_CONFIG, _CONFIG_ERROR = cli_flags.define_run_config_flag(sys.argv, fallback=default.get_config())


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("Name at least one image file or folder to predict.")
  if FLAGS.batch_size < 1:
    raise app.UsageError(f"--batch_size={FLAGS.batch_size} must be >= 1.")
  if problem := files_lib.folder_problem(FLAGS.output, "--output"):
    raise app.UsageError(problem)
  try:
    Path(FLAGS.output).mkdir(parents=True, exist_ok=True)
  except OSError as e:  # No permission, a read-only or virtual file system (/proc).
    raise app.UsageError(f"--output {FLAGS.output}: cannot create it ({e.strerror or e}); give a writable folder.")
  tf.config.set_visible_devices([], "GPU")  # TensorFlow decodes images only; the accelerators are JAX's.
  files, problems = inference.expand_inputs(argv[1:])
  for path, reason in problems:
    print(f"error: {path}: {reason}", file=sys.stderr)
  if not files:
    print("error: no image files to predict.", file=sys.stderr)
    sys.exit(1)
  try:
    if _CONFIG_ERROR is not None:
      raise _CONFIG_ERROR
    model, variables, step = inference.restore_model(FLAGS.config, FLAGS.workdir, FLAGS.checkpoint)
    print(f"Checkpoint step {step} ({FLAGS.checkpoint}) of {FLAGS.workdir}; {len(files)} images")
    report = inference.predict_files(
        FLAGS.config, model, variables, files, FLAGS.output, FLAGS.batch_size,
        on_done=lambda path, written: print(f"{path} -> " + ", ".join(p.name for p in written)),
        on_failure=lambda path, reason: print(f"error: skipped {reason}", file=sys.stderr), upright=FLAGS.upright)
  except (inference.WorkdirError, checkpoint.CheckpointError, input_pipeline.DataError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  for path, reason in report.warnings:
    print(f"warning: {path}: {reason}", file=sys.stderr)
  for path, orientation in report.turned.items():
    print(f"note: {path}: turned upright as its EXIF orientation ({orientation}) says; its outputs are upright "
          "(--noupright: the stored pixels).")
  failed = len(report.failures) + len(problems)
  print(f"{len(report.outputs)} images predicted into {FLAGS.output}, {failed} failed.")
  sys.exit(1 if failed else 0)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parse_flags)
