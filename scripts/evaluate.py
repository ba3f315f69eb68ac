"""Evaluates a trained checkpoint: ``python scripts/evaluate.py --workdir DIR [--checkpoint latest|best|N]``.

The run's saved config (DIR/config.json) is the default of --config; ``--config.x=y`` overrides it, e.g.
``--config.data.source=folder --config.data.data_dir=PATH`` evaluates any folder in the official
Oxford-IIIT Pet layout. Every image of the split is evaluated exactly once, with the training loop's eval
step. Prints a table and, as its last line, one JSON object; then writes the confusion matrix to
DIR/eval/<split>_<step>_confusion.{json,png}, the tag <split> prefixed by the data's name for other data
and suffixed by other data settings (e.g. test_image_size-160) and another model.dtype or model.conv_impl
(test_model.dtype-bfloat16), see ``inference.data_tag``; the JSON records the settings used. The logic
lives in ``petseg_jax/inference.py``.
"""

import json
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
import tensorflow as tf

from configs import default
from petseg_jax import checkpoint
from petseg_jax import cli_flags
from petseg_jax import inference
from petseg_jax import input_pipeline

FLAGS = flags.FLAGS

flags.DEFINE_string("workdir", None, "Workdir of a training run (scripts/train.py --workdir).")
flags.DEFINE_string("checkpoint", "latest",
                    "Which checkpoint: 'latest', 'best' (best mIoU on the run's eval split) or a step.")
flags.DEFINE_string("split", None, "Split to evaluate; default: the run's config.data.eval_split.")
flags.mark_flags_as_required(["workdir"])
_SAVED_CONFIG, _CONFIG_ERROR = cli_flags.define_run_config_flag(sys.argv, fallback=default.get_config())


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  tf.config.set_visible_devices([], "GPU")  # TensorFlow reads data only; the accelerators are JAX's.
  try:
    if _CONFIG_ERROR is not None:
      raise _CONFIG_ERROR
    config = FLAGS.config
    split = FLAGS.split or config.data.eval_split
    model, variables, step = inference.restore_model(config, FLAGS.workdir, FLAGS.checkpoint)
    logging.info("Evaluating step %d of %s on split %r of %s", step, FLAGS.workdir, split, config.data.source)
    result, confusion, num_images = inference.evaluate_checkpoint(config, model, variables, split)
  except (inference.WorkdirError, checkpoint.CheckpointError, input_pipeline.DataError, OSError) as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  eval_dir = Path(FLAGS.workdir) / inference.EVAL_DIR
  # Name the files and are recorded: another dtype's numbers must not overwrite these.
  overrides = inference.data_overrides(config.data, _SAVED_CONFIG.data)
  numerics = inference.model_overrides(config.model, _SAVED_CONFIG.model)
  tag = inference.data_tag(config.data, _SAVED_CONFIG.data, split, overrides={**overrides, **numerics})
  where = config.data.data_dir or config.data.source
  # The results first, the files after: a workdir that cannot be written loses the files, not the numbers.
  print(f"Checkpoint step {step} ({FLAGS.checkpoint}) of {FLAGS.workdir}; split {split!r} of {where}")
  print(inference.format_evaluation(result, num_images), flush=True)
  data = {"split": split, "source": config.data.source, "data_dir": config.data.data_dir,
          "workdir": str(FLAGS.workdir), "data_config": config.data.to_dict(),
          "data_overrides": overrides, "model_overrides": numerics}
  summary = json.dumps(inference.summary_record(result, num_images, step))
  try:
    inference.save_confusion(confusion, result, eval_dir, tag, step, data)
  except inference.WorkdirError as e:
    print(summary, flush=True)  # The last line stays the results' JSON.
    print(f"error: {e}", file=sys.stderr)
    sys.exit(1)
  # Named once written (a workdir that cannot be written names no files).
  print("Confusion matrix: " + ", ".join(str(p) for p in inference.confusion_paths(eval_dir, tag, step)))
  print(summary)


if __name__ == "__main__":
  app.run(main, flags_parser=cli_flags.parse_flags)
