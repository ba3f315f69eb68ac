"""Looks at the data: writes input image / true mask PNGs and prints the class histogram of a split.

  python scripts/show_data.py --config configs/quickstart.py --num 4 --output /tmp/show \
      [--split test] [--augment] [--config.data.source=synthetic]

The images are exactly what the model gets (resized, scaled; with --augment the training augmentation of
epoch 0). The histogram counts the labels of every pixel of the split (evaluation preprocessing).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import TYPE_CHECKING

# Config files import their base as `from configs import default`: make the repo root importable.
REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
import numpy as np

from petseg_jax import cli_flags
from petseg_jax import config_files
from petseg_jax import files

if TYPE_CHECKING:
  from petseg_jax import input_pipeline

FLAGS = flags.FLAGS

cli_flags.define_config_file_flag(sys.argv, config_files.QUICKSTART_CONFIG,
                                  "Configuration file; override fields with --config.section.key=value.")
flags.DEFINE_integer("num", 4, "Number of examples to draw.", lower_bound=1)
flags.DEFINE_string("output", None, "Folder for the PNGs.")
flags.DEFINE_string("split", None, "Split to show (default: config.data.train_split).")
flags.DEFINE_bool("augment", False, "Show training batches (shuffled and augmented, epoch 0) of the train split.")
flags.DEFINE_integer("batch_size", 32, "Batch size used to read the split.", lower_bound=1)
flags.mark_flags_as_required(["output"])


def class_histogram(eval_input: input_pipeline.EvalInput, num_classes: int) -> np.ndarray:
  """Pixel count per class over every (real, not padded) example of an EvalInput."""
  counts = np.zeros(num_classes, np.int64)
  for batch in eval_input:
    weights = np.broadcast_to(batch["weight"][:, None, None], batch["mask"].shape)
    counts += np.bincount(batch["mask"].ravel(), weights=weights.ravel(), minlength=num_classes
                          ).astype(np.int64)[:num_classes]
  return counts


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  config = FLAGS.config
  data = config.data
  split = FLAGS.split or data.train_split
  output = Path(FLAGS.output)
  if problem := files.folder_problem(output, "--output"):
    sys.exit(problem)
  # The data pipeline (TensorFlow, ~6 s to import on 2 cores) loads once the flags are good.
  # pylint: disable=g-import-not-at-top
  from petseg_jax import input_pipeline
  from petseg_jax import plots
  # pylint: enable=g-import-not-at-top
  # The look reads a few batches only: no cache for it to fill in part (TensorFlow warns of a cache left
  # half-filled); the histogram below reads the split through, cached as configured.
  look = data.copy_and_resolve_references()
  look.cache = False
  try:
    if FLAGS.augment:
      if FLAGS.split and FLAGS.split != data.train_split:
        raise app.UsageError("--augment shows the train split (config.data.train_split); drop --split.")
      # Capped by the split size too: TrainInput refuses a batch larger than the split (blaming
      # config.train.batch_size, which this script does not use), and --num may exceed a small split.
      batch_size = min(FLAGS.batch_size, FLAGS.num, input_pipeline.split_size(data, data.train_split))
      batches = input_pipeline.TrainInput(look, batch_size, seed=config.seed).epoch(0)
    else:
      batches = iter(input_pipeline.EvalInput(look, split, FLAGS.batch_size))
    # Augmented batches get names of their own: a look at both in one folder keeps both.
    stem = files.file_name_part(split) + ("_augmented" if FLAGS.augment else "")
    written = 0
    while written < FLAGS.num:
      batch = next(batches, None)
      if batch is None:
        break
      valid = batch["weight"] > 0 if "weight" in batch else np.ones(len(batch["image"]), bool)
      for image, mask in zip(batch["image"][valid], batch["mask"][valid]):
        if written == FLAGS.num:
          break
        path = plots.save_prediction_triplets(image[None], mask[None], None,
                                              output / f"{stem}_{written:03d}.png", input_range=data.input_range)
        print(f"wrote {path}")
        written += 1

    eval_input = input_pipeline.EvalInput(data, split, FLAGS.batch_size)
    counts = class_histogram(eval_input, len(input_pipeline.CLASS_NAMES))
  except input_pipeline.DataError as e:
    sys.exit(f"Data error: {e}")
  except OSError as e:  # The PNGs could not be written.
    sys.exit(f"--output {output}: cannot write {e.filename or output}: {e.strerror or e}")
  total = counts.sum()
  print(f"\nClass histogram of split {split!r} ({eval_input.num_examples} examples, {total} pixels at "
        f"{data.image_size}x{data.image_size}, mask_resize={data.mask_resize}):")
  for name, count in zip(input_pipeline.CLASS_NAMES, counts):
    print(f"  {name:<10} {count:>12d}  {count / max(total, 1):7.2%}")


if __name__ == "__main__":
  app.run(main)
