"""Using a trained workdir: its config and checkpoint, evaluation of a split, prediction on image files, export.

The library side of ``scripts/evaluate.py``, ``scripts/predict.py`` and ``scripts/export_keras_unet.py``.
Evaluation runs the training loop's own ``train.eval_step``/``train.evaluation_sums`` on ``input_pipeline.EvalInput``
(every image exactly once), BatchNorm folded as there and in ``prediction.Predictor``, so its numbers are those
the run logged for the same checkpoint and data.
Prediction preprocesses images with ``input_pipeline.preprocess_images`` (the evaluation preprocessing) and
predicts batches padded to one fixed shape, whatever the images' sizes (``prediction.Predictor``). Export writes the
run's model as the tutorial's Keras U-Net, checked against it first.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Sequence

import jax
import ml_collections
import numpy as np
from PIL import Image

from petseg_jax import checkpoint
from petseg_jax import config_files
from petseg_jax import files as files_lib
from petseg_jax import input_pipeline
from petseg_jax import metrics as metrics_lib
from petseg_jax import models
from petseg_jax import parallel
from petseg_jax import plots
from petseg_jax import prediction
from petseg_jax import train
from petseg_jax.data import decode

EVAL_DIR = "eval"
# Data fields an evaluation's file name shows already (the data's name, the split), so not in its suffix.
_NAMED_DATA_FIELDS = ("source", "data_dir", "eval_split")
# config.model fields an evaluation may override (the checkpoint fits either way) that change its numbers.
NUMERICS_FIELDS = ("dtype", "conv_impl")
# Longer override suffixes are cut and completed by a hash, to stay well within file-name limits.
_MAX_SUFFIX_CHARS = 80
# Files a folder argument of predict expands to (case-insensitive). Named files are tried whatever their
# extension: decoding goes by content.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")


class WorkdirError(ValueError):
  """A workdir, checkpoint or config that cannot be used; the message says which and what to do."""


# --- the run: config and variables -----------------------------------------------------------------------

def _lists_to_tuples(value: Any) -> Any:
  """config.json stores tuples as lists; config fields (and --config.x=y overrides) want tuples."""
  if isinstance(value, dict):
    return {k: _lists_to_tuples(v) for k, v in value.items()}
  if isinstance(value, list):
    return tuple(_lists_to_tuples(v) for v in value)
  return value


def load_run_config(workdir: str | os.PathLike) -> ml_collections.ConfigDict:
  """The configuration saved by the training run in ``workdir`` (tuples restored).

  Raises:
    WorkdirError: the workdir does not exist or holds no readable config.json.
  """
  path = Path(workdir)
  if not path.is_dir():
    raise WorkdirError(f"--workdir {workdir} {'is a file' if path.exists() else 'does not exist'}; pass the "
                       "workdir of a training run (scripts/train.py --workdir).")
  # A step directory is what a user sees in the run's tree; name the two flags that select it instead of
  # failing on its missing config.json. (Not accepted as is: --checkpoint would then be ignored, and the
  # evaluation's files would land inside the checkpoint.)
  for step_dir in () if (path / checkpoint.CONFIG_FILE).exists() else (path, *path.parents):
    if step_dir.name.isdigit() and step_dir.parent.name in (checkpoint.LATEST_DIR, checkpoint.BEST_DIR):
      run = step_dir.parent.parent
      raise WorkdirError(f"--workdir {workdir} is a checkpoint (step {step_dir.name}) of a run, not its "
                         f"workdir; pass the run's workdir and the step: --workdir {run} --checkpoint "
                         f"{step_dir.name}")
  try:
    config = checkpoint.read_config(path)
  except checkpoint.CheckpointError as e:
    raise WorkdirError(str(e)) from e
  config = ml_collections.ConfigDict(_lists_to_tuples(config.to_dict()))
  missing = _missing_fields(config)
  if missing:
    raise WorkdirError(
        f"{path / checkpoint.CONFIG_FILE} lacks the config field(s) {', '.join(missing)} (written by another "
        "version of petseg_jax, or edited). Add them with the values the run used; the defaults are in "
        f"{config_files.DEFAULT_CONFIG}.")
  return config


def _missing_fields(config: ml_collections.ConfigDict) -> list[str]:
  """The fields of ``configs/default.py`` (every field a run's config has) that ``config`` lacks."""
  if not config_files.DEFAULT_CONFIG.is_file():  # Installed without the repository's configs/.
    return []
  default = config_files.load_config(config_files.DEFAULT_CONFIG)
  have = config_files.flat_config(config_files.config_to_dict(config))
  return sorted(set(config_files.flat_config(config_files.config_to_dict(default))) - set(have))


def restore_model(config: ml_collections.ConfigDict, workdir: str | os.PathLike, which: str | int
                  ) -> tuple[models.UNet, dict[str, Any], int]:
  """``(model, {"params", "batch_stats"}, step)`` of checkpoint ``which`` ("latest" | "best" | step).

  Raises:
    WorkdirError: no such checkpoint, it does not fit the model of ``config``, or ``config.data`` has an invalid
      value (e.g. an ``image_size`` override the U-Net cannot take).
  """
  try:
    input_pipeline.check_data_config(config.data)
  except input_pipeline.DataError as e:
    raise WorkdirError(str(e)) from e
  try:
    variables, step = checkpoint.restore_variables(workdir, which)
  except checkpoint.CheckpointError as e:
    raise WorkdirError(str(e)) from e
  try:
    model = train.create_model(config)
  except ValueError as e:  # A hand-edited config.json (or one of another version) that describes no U-Net.
    raise WorkdirError(f"The run's config ({Path(workdir) / checkpoint.CONFIG_FILE} with the overrides given) "
                       f"describes no U-Net: {e}") from e
  mismatched = train.mismatched_collections(model, config.data.image_size, variables)
  if mismatched:
    raise WorkdirError(
        f"The checkpoint of step {step} in {workdir} does not fit the model of the config: its "
        f"{mismatched[0]} differ. Do not override config.model.* fields (alpha, decoder_filters, "
        "num_classes) of a trained run.")
  return model, variables, step


# --- export ----------------------------------------------------------------------------------------------

# Largest |Keras logits - ours| / max|ours| an exported float32 model may show on random inputs.
EXPORT_TOLERANCE = 1e-4


def export_keras_unet(config: ml_collections.ConfigDict, variables: dict[str, Any], path: str | os.PathLike
                      ) -> float:
  """Writes the run's model as the tutorial's Keras U-Net, after checking that Keras computes its function.

  The Keras model (``keras_reference.keras_unet`` of ``config.model``'s alpha, decoder_filters and num_classes,
  float32) gets ``variables`` (``weights.unet_variables_to_keras``); its logits on two random images of
  ``config.data``'s size and input range are compared with the float32 ``UNet``'s, and only then is it saved,
  atomically, in the format ``path``'s ending picks (``.keras``, ``.h5``, ``.weights.h5``). Its inputs are
  scaled as ``config.data.input_range`` says; a bfloat16-trained run is exported in float32 (its weights are).
  Training-only settings are not carried: the Keras model has no Dropout and Keras' BatchNorm momentum (0.99)
  whatever ``model.dropout`` and ``model.decoder_bn_momentum`` were (the same function in inference; set them in
  Keras to fine-tune it as the run trained).

  Returns:
    The largest difference between the two models' logits, relative to the largest logit.

  Raises:
    WorkdirError: ``path`` has no Keras ending, the models differ, or the file cannot be written.
    weights.WeightsError: the variables do not fit the Keras model of ``config.model``.
  """
  from petseg_jax import keras_reference  # pylint: disable=g-import-not-at-top  # Imports Keras.
  from petseg_jax import weights  # pylint: disable=g-import-not-at-top

  path = Path(path)
  if not path.name.endswith((".keras", ".h5")):
    raise WorkdirError(f"{path}: name the Keras file '.keras' (Keras 3's format), '.h5' (legacy whole model) or "
                       "'.weights.h5' (weights only).")
  m, size = config.model, config.data.image_size
  keras_model = keras_reference.keras_unet(m.alpha, size, m.num_classes, decoder_filters=tuple(m.decoder_filters))
  weights.unet_variables_to_keras(variables, keras_model)
  low = 0.0 if config.data.input_range == "[0,1]" else -1.0
  images = np.random.default_rng(0).uniform(low, 1.0, (2, size, size, 3)).astype(np.float32)
  float32_model = models.create_model(ml_collections.ConfigDict({**m.to_dict(), "dtype": "float32"}))
  # Full float32 products on GPUs too (their default is TF32), for Keras' JAX backend as well.
  with jax.default_matmul_precision("highest"):
    ours = np.asarray(jax.jit(float32_model.apply)(variables, images), np.float64)
    theirs = np.asarray(keras_model(images, training=False), np.float64)
  difference = float(np.max(np.abs(theirs - ours)) / max(float(np.max(np.abs(ours))), 1e-12))
  if not difference <= EXPORT_TOLERANCE:
    raise WorkdirError(f"The Keras model does not compute this model's function (logits differ by "
                       f"{difference:.2g} of their scale); {path} was not written.")
  try:
    path.parent.mkdir(parents=True, exist_ok=True)
    with files_lib.atomic_path(path) as temporary:
      if path.name.endswith(".weights.h5"):
        keras_model.save_weights(temporary)
      else:
        keras_model.save(temporary)
  except OSError as e:
    raise WorkdirError(f"Cannot write {path} ({e}).") from e
  return difference


# --- evaluation ------------------------------------------------------------------------------------------

def data_overrides(data_config: ml_collections.ConfigDict, saved_data_config: ml_collections.ConfigDict
                   ) -> dict[str, Any]:
  """``{field: value}`` of the data settings that differ from the run's saved ones, sorted by field."""
  changed = config_files.differences(saved_data_config.to_dict(), data_config.to_dict())
  return {key: now for key, (_, now) in changed.items()}


def model_overrides(model_config: ml_collections.ConfigDict, saved_model_config: ml_collections.ConfigDict
                    ) -> dict[str, Any]:
  """``{"model.<field>": value}`` of the settings that change an evaluation's numbers without changing the
  checkpoint's model (``model.dtype``, ``model.conv_impl``) where they differ from the run's saved ones."""
  return {f"model.{field}": model_config[field] for field in NUMERICS_FIELDS
          if field in saved_model_config and model_config[field] != saved_model_config[field]}


def _name_part(value: Any) -> str:
  """A config value as a file-name part: ``160``, ``bilinear``, ``0-1`` for ``"[0,1]"``, ``none`` for ""."""
  text = "-".join(map(str, value)) if isinstance(value, (tuple, list)) else str(value)
  return re.sub(r"[^A-Za-z0-9_.]+", "-", text).strip("-") or "none"


def data_tag(data_config: ml_collections.ConfigDict, saved_data_config: ml_collections.ConfigDict,
             split: str, *, overrides: Mapping[str, Any] | None = None) -> str:
  """File-name tag of an evaluation: the split, e.g. ``test``, the run's own data with its own settings (a
  split with characters unfit for a file name, e.g. ``train[:80%]``, as ``files.file_name_part`` writes it).

  Other data is prefixed by its name (the data folder's, with a short hash of its full path, since e.g.
  two tfds folders are both called ``tensorflow_datasets``; or the source's): ``pets_sample-1a2b3c_test``.
  Other data settings (``--config.data.image_size=160``...) are appended as ``field-value``:
  ``test_image_size-160``. So evaluations of the same checkpoint with other data or settings do not
  overwrite each other's files, and the name says what differed.

  ``overrides``, if given, is ``data_overrides(data_config, saved_data_config)`` computed by the caller
  (scripts/evaluate.py also records it), possibly with ``model_overrides``' entries, appended the same way
  (``test_model.dtype-bfloat16``).
  """
  tag = files_lib.file_name_part(split)
  if (data_config.source, data_config.data_dir) != (saved_data_config.source, saved_data_config.data_dir):
    if data_config.data_dir and data_config.source != "synthetic":  # Synthetic data reads no folder.
      path = str(Path(data_config.data_dir).expanduser().resolve())
      tag = f"{Path(path).name}-{hashlib.sha1(path.encode()).hexdigest()[:6]}_{tag}"
    else:
      tag = f"{data_config.source}_{tag}"
  if overrides is None:
    overrides = data_overrides(data_config, saved_data_config)
  settings = {key: value for key, value in overrides.items() if key not in _NAMED_DATA_FIELDS}
  suffix = "_".join(f"{key}-{_name_part(value)}" for key, value in settings.items())
  if len(suffix) > _MAX_SUFFIX_CHARS:
    digest = hashlib.sha1(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:6]
    suffix = f"{suffix[:_MAX_SUFFIX_CHARS - 7]}-{digest}"
  if suffix:
    tag = f"{tag}_{suffix}"
  return re.sub(r"[^A-Za-z0-9_.-]+", "-", tag)


def evaluate_checkpoint(config: ml_collections.ConfigDict, model: models.UNet, variables: dict[str, Any],
                        split: str) -> tuple[dict[str, Any], np.ndarray, int]:
  """Metrics of ``variables`` on ``split`` of ``config.data`` with the training loop's eval step.

  Batches of ``config.train.batch_size`` over all local devices, as in training.

  Returns:
    ``(metrics, confusion, num_images)``: ``metrics`` as ``metrics.compute_metrics`` plus "loss";
    ``confusion`` the summed (C, C) matrix, rows true class, columns predicted.
  """
  eval_input = input_pipeline.EvalInput(config.data, split, config.train.batch_size,
                                        num_devices=jax.local_device_count())
  # BatchNorm folded, as the training loop's evaluation and Predictor run the model.
  buffers, layout = parallel.replicate_state(models.fold_batch_norm(variables))
  p_eval_step = train.pmapped_eval_step(config, model.clone(batch_norm_folded=True), layout)
  sums, _ = train.evaluation_sums(p_eval_step, buffers, eval_input)
  return train.eval_metrics(sums), sums["confusion"], eval_input.num_examples


def confusion_paths(directory: str | os.PathLike, tag: str, step: int) -> tuple[Path, Path]:
  """``<directory>/<tag>_<step>_confusion.{json,png}``: where ``save_confusion`` writes."""
  # Not Path.with_suffix: a tag may hold dots (model.dtype-bfloat16, a folder named pets.v2), and the suffix
  # would replace everything after the last one.
  stem = f"{tag}_{step}_confusion"
  return Path(directory) / f"{stem}.json", Path(directory) / f"{stem}.png"


def save_confusion(confusion: np.ndarray, result: dict[str, Any], directory: str | os.PathLike, tag: str,
                   step: int, extra: dict[str, Any]) -> tuple[Path, Path]:
  """Writes ``confusion_paths(directory, tag, step)``; returns both paths.

  Raises:
    WorkdirError: a file or ``directory`` cannot be written (the message names the path).
  """
  json_path, png_path = confusion_paths(directory, tag, step)
  record = {**extra, "checkpoint_step": step, "class_names": list(input_pipeline.CLASS_NAMES),
            "confusion": confusion.tolist(), "rows": "true class", "columns": "predicted class",
            "metrics": result}
  target = json_path
  try:
    Path(directory).mkdir(parents=True, exist_ok=True)
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    target = png_path
    plots.save_confusion_matrix(confusion, png_path, class_names=input_pipeline.CLASS_NAMES)
  except OSError as e:  # str(e) names the directory or file that failed.
    raise WorkdirError(f"Cannot write the confusion matrix to {target}: {e}") from e
  return json_path, png_path


def summary_record(result: dict[str, Any], num_images: int, step: int) -> dict[str, Any]:
  """The one-line JSON summary of an evaluation (the last line evaluate.py prints)."""
  return {"pixel_accuracy": result["pixel_accuracy"], "miou": result["miou"], "iou": result["iou"],
          "dice": result["dice"], "num_images": num_images, "checkpoint_step": step}


def format_evaluation(result: dict[str, Any], num_images: int) -> str:
  """``metrics.format_metrics_table`` plus the loss."""
  return metrics_lib.format_metrics_table(result, num_images) + f"\n{'loss':<14} {result['loss']:>8.4f}"


# --- prediction ------------------------------------------------------------------------------------------

def expand_inputs(paths: Iterable[str | os.PathLike]) -> tuple[list[Path], list[tuple[str, str]]]:
  """Files to predict: named files as given, folders expanded to their image files (sorted, not recursive).

  Returns:
    ``(files, problems)``: ``files`` without repeats; ``problems`` lists ``(path, reason)`` for missing
    paths and folders without image files.
  """
  files, problems = [], []
  for path in map(Path, paths):
    if path.is_dir():
      found = sorted(p for p in path.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
      if not found:
        problems.append((str(path), f"folder holds no image files ({', '.join(IMAGE_EXTENSIONS)})"))
      files.extend(found)
    elif path.exists():
      files.append(path)
    else:
      problems.append((str(path), "no such file or folder"))
  unique = {path.resolve(): path for path in reversed(files)}  # The first occurrence wins.
  return [path for path in files if unique[path.resolve()] is path], problems


def trimap_path(image_path: str | os.PathLike) -> Path | None:
  """``<root>/annotations/trimaps/NAME.png`` of an image ``<root>/images/NAME.*`` if it exists, else None."""
  image_path = Path(image_path)
  if image_path.parent.name != "images":
    return None
  path = image_path.parent.parent / "annotations" / "trimaps" / (image_path.stem + ".png")
  return path if path.is_file() else None


def _unique_names(files: Sequence[Path]) -> list[str]:
  """Output names: the file stem, made unique (a.jpg and a.png, or the same name in two folders)."""
  names, used = [], set()
  for path in files:
    name = path.stem
    if name in used:
      name = f"{path.stem}_{path.suffix.lstrip('.').lower() or 'noext'}"
    base, i = name, 2
    while name in used:
      name, i = f"{base}_{i}", i + 1
    used.add(name)
    names.append(name)
  return names


def resize_mask(mask: np.ndarray, height: int, width: int) -> np.ndarray:
  """A class mask resized to (height, width) with nearest neighbour (uint8)."""
  return np.asarray(Image.fromarray(mask.astype(np.uint8)).resize((width, height), Image.NEAREST))


@dataclasses.dataclass
class PredictReport:
  """What ``predict_files`` did: outputs per predicted file, ``(path, reason)`` per failed file (the reason
  names the file) and per warning."""
  outputs: dict[str, list[Path]] = dataclasses.field(default_factory=dict)
  failures: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  warnings: list[tuple[str, str]] = dataclasses.field(default_factory=list)
  turned: dict[str, int] = dataclasses.field(default_factory=dict)  # Path → EXIF orientation it was turned by.


def _write_outputs(path: Path, name: str, image: np.ndarray, mask: np.ndarray, output_dir: Path,
                   report: PredictReport, orientation: int) -> list[Path]:
  """The outputs of ``image`` (turned by EXIF ``orientation``, its trimap then turned alike)."""
  height, width = image.shape[:2]
  full_mask = resize_mask(mask, height, width)
  written = [output_dir / f"{name}_mask.png", output_dir / f"{name}_overlay.png"]
  Image.fromarray(full_mask, mode="L").save(written[0])
  Image.fromarray(plots.overlay(image, full_mask)).save(written[1])
  trimap_file = trimap_path(path)
  if trimap_file is not None:
    try:
      trimap = decode.turn_upright(decode.load_trimap(trimap_file), orientation)
      if trimap.shape != (height, width):
        raise input_pipeline.DataError(f"{trimap_file}: trimap is {trimap.shape[1]}x{trimap.shape[0]}, "
                                       f"the image {width}x{height}")
    except input_pipeline.DataError as e:
      report.warnings.append((str(path), f"no triplet figure: {e}"))
    else:
      written.append(plots.save_prediction_triplets(image[None], (trimap - 1)[None], full_mask[None],
                                                    output_dir / f"{name}_triplet.png"))
  return written


def predict_files(config: ml_collections.ConfigDict, model: models.UNet, variables: dict[str, Any],
                  files: Sequence[Path], output_dir: str | os.PathLike, batch_size: int,
                  on_done: Callable[[Path, list[Path]], None] | None = None,
                  on_failure: Callable[[str, str], None] | None = None, upright: bool = True) -> PredictReport:
  """Predicts each file and writes ``<name>_mask.png``, ``<name>_overlay.png`` and, when its trimap is
  known (Oxford layout), ``<name>_triplet.png`` into ``output_dir``.

  Images are decoded by content, preprocessed as in evaluation and predicted in batches padded to
  ``batch_size`` (one compilation). Masks are class ids 0/1/2, one byte per pixel, resized back to the
  image's size with nearest neighbour. Unreadable files are recorded in the report and skipped.

  With ``upright`` an image with an EXIF orientation (a phone photo taken sideways) is turned as viewers show
  it before it is predicted: the pet upright, as in the training images, and the mask and figures as the user
  sees the photo (``report.turned`` lists them). ``upright=False`` predicts the stored pixel grid, as the data
  pipeline reads images.
  """
  output_dir = Path(output_dir)
  output_dir.mkdir(parents=True, exist_ok=True)
  report = PredictReport()
  names = dict(zip(files, _unique_names(files)))

  def fail(path: Path, reason: str) -> None:
    report.failures.append((str(path), reason))
    if on_failure:
      on_failure(str(path), reason)

  predictor = prediction.Predictor(model, variables)
  for start in range(0, len(files), batch_size):
    chunk = []
    for path in files[start:start + batch_size]:
      try:
        image = input_pipeline.load_image(path)
      except input_pipeline.DataError as e:
        fail(path, str(e))
        continue
      orientation = decode.exif_orientation(path) if upright else 1
      if orientation != 1:
        report.turned[str(path)] = orientation
      chunk.append((path, decode.turn_upright(image, orientation), orientation))
    if not chunk:
      continue
    images = input_pipeline.preprocess_images([image for _, image, _ in chunk], config.data)
    padded = np.zeros((batch_size,) + images.shape[1:], images.dtype)
    padded[:len(images)] = images
    masks = predictor(padded)
    for (path, image, orientation), mask in zip(chunk, masks):
      try:
        written = _write_outputs(path, names[path], image, mask, output_dir, report, orientation)
      except OSError as e:
        fail(path, f"{path}: cannot write its outputs to {output_dir} ({e})")
        continue
      report.outputs[str(path)] = written
      if on_done:
        on_done(path, written)
  return report
