"""Input pipeline: Oxford-IIIT Pet (tfds, an extracted folder, or synthetic pets) -> NumPy batches.

Three sources give one feature dict (`image` uint8 HxWx3, `segmentation_mask` uint8 HxWx1 trimap,
`file_name`, and `label`/`species` where known), selected by `config.data.source`:
  * "tfds": the official tfds `oxford_iiit_pet` (downloaded, or prepared from archives placed in the manual dir);
  * "folder": an extracted folder in the official layout (`config.data.data_dir`), through our tfds builder;
  * "synthetic": procedurally drawn pets (`petseg_jax.data.synthetic`), no files needed.

Preprocessing follows the TensorFlow segmentation tutorial with its mistakes fixed (the old behaviour stays
available as config for ablations): images are resized bilinearly, masks with nearest neighbour
(`mask_resize="bilinear"` resizes the trimap bilinearly and rounds, inventing classes at boundaries), labels
are trimap - 1 (0 pet, 1 background, 2 border), images are scaled to `input_range`.

The decoded and resized split is cached (uint8) once per `TrainInput`/`EvalInput`; every epoch is derived
from that cache. A training epoch is a pure function of (seed, epoch): the shuffle seed is derived from both,
and each example's augmentation (flip decision, stateless-op seeds) is looked up by its id in tables drawn
from (seed, epoch), so `epoch(e, start_step)` resumes exactly, in the same or a new process. (The tf.data
shuffle also depends on TensorFlow's global seed, which this project never sets.)
"""

from __future__ import annotations

import codecs
import re
from typing import Iterator, Sequence

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from petseg_jax.data import decode
from petseg_jax.data import folder_builder
from petseg_jax.data import synthetic
from petseg_jax.data import tfds_source
from petseg_jax.data.errors import DataError
from petseg_jax.data.settings import INPUT_RANGES, MASK_RESIZES, SOURCES, check_data_config  # Re-exported.
from petseg_jax.metrics import CLASS_NAMES  # ("pet", "background", "border"): label = trimap - 1.

try:
  # Data work runs on the CPU; keep TensorFlow off the accelerators JAX uses.
  tf.config.set_visible_devices([], "GPU")
except RuntimeError:
  pass  # TensorFlow's devices were initialised already (by another import); nothing we can change now.


__all__ = [
    "BUNDLED_SAMPLE_DIR", "CLASS_NAMES", "DataError", "EvalInput", "INPUT_RANGES", "MASK_RESIZES", "SOURCES",
    "TrainInput", "check_data_config", "get_dataset_builder", "load_image", "preprocess_images", "raw_dataset",
    "split_size",
]

BUNDLED_SAMPLE_DIR = folder_builder.BUNDLED_SAMPLE_DIR

# Optional training augmentations (config.data.random_resized_crop / color_jitter).
CROP_AREA_RANGE = (0.5, 1.0)  # Fraction of the image area kept by random_resized_crop.
CROP_ASPECT_RANGE = (3 / 4, 4 / 3)
BRIGHTNESS_MAX_DELTA = 0.2  # Fraction of the full intensity range.
CONTRAST_RANGE = (0.8, 1.2)

load_image = decode.load_image


# ---------------------------------------------------------------------------------------------------------
# Config and sources.


def get_dataset_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder:
  """Returns the prepared tfds builder of source "tfds" or "folder" (preparing it on first use).

  Raises:
    DataError: for source "synthetic" (it has no builder) and for every data problem.
  """
  check_data_config(data_config)
  if data_config.source == "tfds":
    return tfds_source.prepare_official_builder(data_config.tfds_name, data_dir=data_config.data_dir,
                                                manual_dir=data_config.manual_dir)
  if data_config.source == "folder":
    return folder_builder.prepare_folder_builder(data_config.data_dir,
                                                 skip_bad_examples=data_config.skip_bad_examples)
  raise DataError("config.data.source='synthetic' has no tfds builder; use raw_dataset() or split_size().")


def _synthetic_num(data_config: ml_collections.ConfigDict, split: str) -> int:
  if split not in synthetic.SPLIT_SEEDS:
    raise DataError(f"Split {split!r} does not exist for source 'synthetic'; use one of "
                    f"{tuple(synthetic.SPLIT_SEEDS)}.")
  field = "num_synthetic_train" if split == "train" else "num_synthetic_eval"
  num = data_config[field]
  # Why: 0 examples would give an evaluation of no batches (metrics of nothing) instead of an error.
  if not isinstance(num, (int, np.integer)) or num <= 0:
    raise DataError(f"config.data.{field}={num!r} must be a positive number of synthetic examples.")
  return int(num)


def split_size(data_config: ml_collections.ConfigDict, split: str,
               builder: tfds.core.DatasetBuilder | None = None) -> int:
  """Number of examples of `split` (tfds split syntax like "train[:80%]" works for tfds/folder sources).

  ``builder``: ``get_dataset_builder(data_config)`` where the caller has it already (else it is prepared here).
  """
  check_data_config(data_config)
  if data_config.source == "synthetic":
    return _synthetic_num(data_config, split)
  return int(_split_info(builder or get_dataset_builder(data_config), split).num_examples)


def _prepared_builder(data_config: ml_collections.ConfigDict) -> tfds.core.DatasetBuilder | None:
  """``get_dataset_builder(data_config)``, None for source "synthetic"."""
  return None if data_config.source == "synthetic" else get_dataset_builder(data_config)


def _split_info(builder: tfds.core.DatasetBuilder, split: str) -> tfds.core.SplitInfo:
  """``builder``'s info on ``split`` (tfds split syntax); DataError naming the splits if it does not exist."""
  try:
    return builder.info.splits[split]
  except (KeyError, ValueError, AssertionError) as e:
    raise DataError(f"Split {split!r} does not exist in {builder.name}; available: "
                    f"{sorted(builder.info.splits.keys())} ({e}).") from e


def shared_examples(data_config: ml_collections.ConfigDict, split_a: str, split_b: str) -> int:
  """How many examples the two splits (tfds split syntax: "train[:80%]", "train[:50%]+test") have in common."""
  check_data_config(data_config)
  if data_config.source == "synthetic":  # Each split is drawn from its own seed: equal names or nothing.
    return _synthetic_num(data_config, split_a) if split_a == split_b else 0
  builder = get_dataset_builder(data_config)
  ranges = [[(i.filename, i.skip, i.skip + i.take) for i in _split_info(builder, split).file_instructions]
            for split in (split_a, split_b)]
  return sum(max(0, min(end_a, end_b) - max(start_a, start_b))
             for file_a, start_a, end_a in ranges[0] for file_b, start_b, end_b in ranges[1] if file_a == file_b)


def check_train_eval_disjoint(data_config: ml_collections.ConfigDict) -> None:
  """Raises DataError if ``train_split`` and ``eval_split`` share examples.

  Training evaluates (and picks its best checkpoint) on ``eval_split``: images it trained on would inflate
  every number. To score a run on training images on purpose, use scripts/evaluate.py --split.
  """
  shared = shared_examples(data_config, data_config.train_split, data_config.eval_split)
  if shared:
    raise DataError(
        f"config.data.train_split={data_config.train_split!r} and config.data.eval_split="
        f"{data_config.eval_split!r} share {shared} example(s): the evaluation would score images the model "
        "trained on. Use disjoint splits, e.g. train_split='train[:80%]' and eval_split='train[80%:]'.")


def _render_synthetic(seed, index, size):
  # Looked up at call time so tests can count calls (the cache must make later epochs skip this).
  return synthetic.render_example(int(seed), int(index), int(size))


def raw_dataset(data_config: ml_collections.ConfigDict, split: str,
                builder: tfds.core.DatasetBuilder | None = None) -> tf.data.Dataset:
  """The undecorated examples of a split, in a fixed order (``builder`` as for ``split_size``).

  Yields {"image": uint8 (H, W, 3), "segmentation_mask": uint8 (H, W, 1) trimap 1/2/3, "file_name": string};
  synthetic examples are drawn at `image_size`, files keep their own size. For source "tfds", a trimap value
  outside {1, 2, 3} fails the iteration (TrainInput and EvalInput raise it as a DataError naming the example).
  """
  check_data_config(data_config)
  if data_config.source == "synthetic":
    num, seed, size = _synthetic_num(data_config, split), synthetic.SPLIT_SEEDS[split], data_config.image_size

    def draw(index):
      image, trimap = tf.numpy_function(_render_synthetic, [seed, index, size], (tf.uint8, tf.uint8),
                                        stateful=False)
      image.set_shape([size, size, 3])
      trimap.set_shape([size, size])
      return {"image": image, "segmentation_mask": trimap[..., None],
              "file_name": tf.strings.format("synthetic_{}_{}.png", (split, index))}

    return tf.data.Dataset.range(num).map(draw, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  builder = builder or get_dataset_builder(data_config)
  read_config = tfds.ReadConfig(try_autocache=False, shuffle_seed=None)  # We cache after resizing ourselves.
  _split_info(builder, split)  # A split that does not exist: the error naming those that do.
  ds = builder.as_dataset(split=split, shuffle_files=False, read_config=read_config)
  ds = ds.map(lambda ex: {k: ex[k] for k in ("image", "segmentation_mask", "file_name")})
  if data_config.source == "tfds":
    # The folder builder checks every trimap before it builds; tfds' prepared files are checked here, as read.
    ds = ds.map(_check_trimap_fn(builder, split), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  return ds


# A DataError raised inside the tf.data graph reaches Python as a tf.errors.InvalidArgumentError; its message
# sits between these markers so that _as_numpy can raise it again as a DataError.
_ERROR_START, _ERROR_END = "<<petseg_jax.DataError ", " petseg_jax.DataError>>"


def _check_trimap_fn(builder: tfds.core.DatasetBuilder, split: str):
  """A map fn failing (message by decode.check_trimap_values) on a trimap value outside {1, 2, 3}.

  Costs one reduction per example (once per split with config.data.cache); the message is built only on failure.
  """
  what_to_do = (f"The prepared tfds data in {builder.data_dir} is damaged or not the official one: delete that "
                "folder and run again to prepare it from the official archives, or use an extracted copy "
                "(--config.data.source=folder, which checks every trimap before it builds).")

  def message(mask: np.ndarray, file_name: bytes) -> bytes:
    # decode.check_trimap_values words it, as for the folder source; this runs only for a bad trimap.
    try:
      decode.check_trimap_values(mask[..., 0], f"tfds {builder.name} split {split!r}, example "
                                 f"{file_name.decode('utf-8', errors='replace')}")
    except DataError as e:
      return f"{_ERROR_START}{e}. {what_to_do}{_ERROR_END}".encode()
    return b""

  def fn(example):
    mask = example["segmentation_mask"]
    valid = (mask >= 1) & (mask <= 3)
    ok = tf.reduce_all(valid)
    text = tf.cond(ok, lambda: tf.constant(""),
                   lambda: tf.numpy_function(message, [mask, example["file_name"]], tf.string, stateful=False))
    with tf.control_dependencies([tf.debugging.Assert(ok, [text])]):
      return dict(example, segmentation_mask=tf.identity(mask))

  return fn


def _damaged_copy_error(data_config: ml_collections.ConfigDict, split: str, error: tf.errors.OpError,
                        where: str) -> DataError:
  """The DataError for the prepared copy in ``where`` whose files fail to read (truncated, corrupted or missing
  records)."""
  # TensorFlow wraps the reader's words in its op's names: "{{function_node ...}} <words> [Op:...] name: ".
  reason = re.sub(r"\{\{function_node [^}]*\}\}|\[Op:\w+\]( name:)?", "", error.message).strip()
  return DataError(
      f"Reading split {split!r} of config.data.source={data_config.source!r} failed: {reason}\n"
      f"The prepared copy in {where} is damaged (a file was cut short, changed or deleted after it was "
      "prepared, e.g. by a full disk): delete that folder and run again to prepare it anew.")


def _as_numpy(ds: tf.data.Dataset, data_config: ml_collections.ConfigDict, split: str,
              builder: tfds.core.DatasetBuilder | None) -> Iterator[dict[str, np.ndarray]]:
  """tfds.as_numpy(ds), raising the DataErrors of the graph (see _ERROR_START) and damaged files as DataError.

  ``builder`` is the one ``ds`` reads (None for source "synthetic"): the error names its folder. Not prepared
  again here: its folder may have changed since, and preparing would make a new copy and name that one.
  """
  iterator = iter(tfds.as_numpy(ds))
  while True:
    try:
      batch = next(iterator)
    except StopIteration:
      return
    except tf.errors.InvalidArgumentError as e:
      match = re.search(re.escape(_ERROR_START) + "(.*?)" + re.escape(_ERROR_END), e.message, re.DOTALL)
      if match is None:
        raise
      # Assert prints its string C-escaped (quotes, non-ASCII bytes as octal): undo that.
      text = codecs.escape_decode(match.group(1).encode("utf-8"))[0].decode("utf-8", errors="replace")
      raise DataError(text) from e
    except (tf.errors.DataLossError, tf.errors.NotFoundError) as e:
      if builder is None:
        raise
      raise _damaged_copy_error(data_config, split, e, builder.data_dir) from e
    yield batch


# ---------------------------------------------------------------------------------------------------------
# Preprocessing.


def _resize_image(image: tf.Tensor, size: int) -> tf.Tensor:
  """Bilinear resize (the tutorial's tf.image.resize default), rounded back to uint8 for a compact cache."""
  image = tf.image.resize(image, [size, size], method="bilinear")
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def _resize_trimap_to_labels(trimap: tf.Tensor, size: int, mask_resize: str) -> tf.Tensor:
  """Trimap (H, W, 1) values 1/2/3 -> labels uint8 (size, size) values 0 pet / 1 background / 2 border."""
  if mask_resize == "nearest":
    trimap = tf.image.resize(trimap, [size, size], method="nearest")
  else:
    # The first tutorial's mistake, kept for ablations: interpolating labels invents classes at boundaries
    # (every pet|border edge, 1|3, blends through 2 and gains a line of "background" inside the border).
    trimap = tf.image.resize(tf.cast(trimap, tf.float32), [size, size], method="bilinear")
    trimap = tf.cast(tf.clip_by_value(tf.round(trimap), 1.0, 3.0), tf.uint8)
  return trimap[..., 0] - 1


def _decode_resize_fn(data_config: ml_collections.ConfigDict):
  size, mask_resize = data_config.image_size, data_config.mask_resize

  def fn(index, example):
    return {"id": index, "image": _resize_image(example["image"], size),
            "mask": _resize_trimap_to_labels(example["segmentation_mask"], size, mask_resize)}

  return fn


def _scale_images(images: tf.Tensor, input_range: str) -> tf.Tensor:
  images = tf.cast(images, tf.float32)
  if input_range == "[-1,1]":
    return images / 127.5 - 1.0
  return images / 255.0


def _finalize_fn(input_range: str):
  def fn(batch):
    return {"image": _scale_images(batch["image"], input_range), "mask": tf.cast(batch["mask"], tf.int32)}
  return fn


def preprocess_images(images: Sequence[np.ndarray], data_config: ml_collections.ConfigDict) -> np.ndarray:
  """uint8 RGB images of any size -> float32 (N, S, S, 3), exactly the evaluation preprocessing."""
  check_data_config(data_config)
  out = []
  for i, image in enumerate(images):
    image = np.asarray(image)
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[-1] != 3:
      raise DataError(f"preprocess_images: image {i} is {image.dtype} {image.shape}; expected uint8 (H, W, 3) RGB "
                      "(use load_image to read files).")
    out.append(_resize_image(tf.constant(image), data_config.image_size))
  if not out:
    return np.zeros((0, data_config.image_size, data_config.image_size, 3), np.float32)
  return _scale_images(tf.stack(out), data_config.input_range).numpy()


def _base_dataset(data_config: ml_collections.ConfigDict, split: str,
                  builder: tfds.core.DatasetBuilder | None) -> tf.data.Dataset:
  """{"id": int64, "image": uint8 (S, S, 3), "mask": uint8 (S, S)} in split order, cached if config.data.cache.

  Built once per TrainInput/EvalInput: each epoch is derived from this object, so its in-memory cache (filled
  during the first full pass) is shared by all later epochs.
  """
  ds = raw_dataset(data_config, split, builder).enumerate()
  ds = ds.map(_decode_resize_fn(data_config), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  if data_config.cache:
    ds = ds.cache()
  return ds


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1  # Per-element ops are small; parallelism comes from map.
  return options


def _check_batch(batch_size: int, num_devices: int | None) -> None:
  if not isinstance(batch_size, (int, np.integer)) or batch_size <= 0:
    raise DataError(f"batch_size={batch_size!r} must be a positive integer.")
  if num_devices is not None:
    if num_devices <= 0:
      raise DataError(f"num_devices={num_devices!r} must be positive.")
    if batch_size % num_devices:
      raise DataError(f"Batch size {batch_size} is not divisible by the number of devices {num_devices}; use a "
                      f"multiple of {num_devices} (config.train.batch_size is the global batch).")


def _shard(batch: dict[str, np.ndarray], num_devices: int | None) -> dict[str, np.ndarray]:
  """(B, ...) -> (num_devices, B // num_devices, ...) for pmap; a view, no copy."""
  if num_devices is None:
    return batch
  return {k: v.reshape((num_devices, v.shape[0] // num_devices) + v.shape[1:]) for k, v in batch.items()}


# ---------------------------------------------------------------------------------------------------------
# Training.


def epoch_seeds(seed: int, epoch: int) -> tuple[int, np.ndarray]:
  """(shuffle seed, augmentation key uint32 (3,)) of one epoch: a pure function of (seed, epoch)."""
  state = np.random.SeedSequence([int(seed) % 2**64, int(epoch), 0x9E75]).generate_state(5, np.uint32)
  shuffle_seed = int(state[0]) << 31 | int(state[1]) >> 1  # tf.data wants a non-negative int64.
  return shuffle_seed, state[2:]


def flip_table(key: np.ndarray, num_examples: int) -> np.ndarray:
  """bool (num_examples,): whether each example (by id) is flipped in the epoch with this key."""
  return np.random.default_rng([*key, 0]).random(num_examples) < 0.5


def seed_table(key: np.ndarray, num_examples: int) -> np.ndarray:
  """int64 (num_examples, 3, 2): stateless-op seeds (crop, brightness, contrast) of each example (by id)."""
  return np.random.default_rng([*key, 1]).integers(0, 2**62, (num_examples, 3, 2), dtype=np.int64)


def _example_augment_fn(data_config: ml_collections.ConfigDict, seeds: np.ndarray):
  """Per-example crop / colour jitter with stateless random ops seeded from a per-epoch table (by id)."""
  size = data_config.image_size
  crop, jitter = data_config.random_resized_crop, data_config.color_jitter
  table = tf.constant(seeds)

  def fn(example):
    seeds = tf.gather(table, example["id"])
    image, mask = example["image"], example["mask"][..., None]
    if crop:
      begin, crop_size, _ = tf.image.stateless_sample_distorted_bounding_box(
          [size, size, 3], bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]), seed=seeds[0],
          min_object_covered=0.0, aspect_ratio_range=CROP_ASPECT_RANGE, area_range=CROP_AREA_RANGE,
          max_attempts=10, use_image_if_no_bounding_boxes=True)
      image = _resize_image(tf.slice(image, begin, crop_size), size)
      mask = tf.image.resize(tf.slice(mask, begin, [crop_size[0], crop_size[1], 1]), [size, size],
                             method="nearest")
    if jitter:
      x = tf.cast(image, tf.float32) / 255.0
      x = tf.image.stateless_random_brightness(x, BRIGHTNESS_MAX_DELTA, seeds[1])
      x = tf.image.stateless_random_contrast(x, CONTRAST_RANGE[0], CONTRAST_RANGE[1], seeds[2])
      image = tf.clip_by_value(x, 0.0, 1.0) * 255.0  # float32 in [0, 255]; scaled like uint8 later.
    return {"id": example["id"], "image": image, "mask": mask[..., 0]}

  return fn


def _flip_fn(flips: np.ndarray):
  """The tutorial's random horizontal flip: one decision per example (looked up by id), image and mask together.

  A precomputed table instead of per-example stateless random ops: the same purity, several times the
  cached throughput.
  """
  table = tf.constant(flips)

  def fn(example):
    image, mask = tf.cond(tf.gather(table, example["id"]),
                          lambda: (tf.reverse(example["image"], [1]), tf.reverse(example["mask"], [1])),
                          lambda: (example["image"], example["mask"]))
    return {"id": example["id"], "image": image, "mask": mask}

  return fn


class TrainInput:
  """The training split, decoded, resized and cached once; `epoch()` gives the batches of one epoch.

  Attributes:
    num_examples: examples in the training split.
    steps_per_epoch: full batches per epoch (the remainder is dropped).
  """

  def __init__(self, data_config: ml_collections.ConfigDict, batch_size: int, *, seed: int,
               num_devices: int | None = None):
    check_data_config(data_config)
    _check_batch(batch_size, num_devices)
    self._config = data_config
    self.batch_size = int(batch_size)
    self.num_devices = num_devices
    self.seed = int(seed)
    self.split = data_config.train_split
    self._builder = _prepared_builder(data_config)  # Prepared once; read by every epoch.
    self.num_examples = split_size(data_config, self.split, self._builder)
    self.steps_per_epoch = self.num_examples // self.batch_size
    if self.steps_per_epoch == 0:
      raise DataError(f"Batch size {batch_size} is larger than the {self.num_examples} examples of split "
                      f"{self.split!r}: no full training batch. Lower config.train.batch_size.")
    self._base = _base_dataset(data_config, self.split, self._builder)
    # A shuffle buffer larger than one batch makes the (drop-remainder) epoch read its input to the end before
    # the last full batch comes out, so the cache is completed even if the caller stops right after that
    # batch (e.g. itertools.islice) instead of exhausting the iterator.
    self.shuffle_buffer = max(int(data_config.shuffle_buffer), 2 * self.batch_size)

  def epoch(self, epoch: int, start_step: int = 0) -> Iterator[dict[str, np.ndarray]]:
    """Batches of one epoch, a pure function of (seed, epoch); `start_step` skips the first batches.

    Yields:
      {"image": float32 (B, S, S, 3), "mask": int32 (B, S, S)}; with num_devices the leading dims are
      (num_devices, B // num_devices).
    """
    if not 0 <= start_step <= self.steps_per_epoch:
      raise DataError(f"start_step={start_step} is outside 0..{self.steps_per_epoch} (steps per epoch).")
    shuffle_seed, key = epoch_seeds(self.seed, epoch)
    config = self._config
    ds = self._base.shuffle(self.shuffle_buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
    # Skipping before augmentation is exact (augmentation is keyed by example id) and saves its work.
    ds = ds.skip(start_step * self.batch_size)
    if config.random_resized_crop or config.color_jitter:
      ds = ds.map(_example_augment_fn(config, seed_table(key, self.num_examples)),
                  num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    if config.random_flip:
      ds = ds.map(_flip_fn(flip_table(key, self.num_examples)), num_parallel_calls=tf.data.AUTOTUNE,
                  deterministic=True)
    ds = ds.batch(self.batch_size, drop_remainder=True)
    ds = ds.map(_finalize_fn(config.input_range), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
    for batch in _as_numpy(ds, config, self.split, self._builder):
      yield _shard(batch, self.num_devices)


# ---------------------------------------------------------------------------------------------------------
# Evaluation.


class EvalInput:
  """An evaluation split, decoded, resized and cached once; iterate it as often as needed.

  Every example is yielded exactly once; the last batch is padded to full size with weight 0.

  Attributes:
    num_examples: examples in the split.
    num_batches: batches per pass (ceil(num_examples / batch_size)).
  """

  def __init__(self, data_config: ml_collections.ConfigDict, split: str, batch_size: int, *,
               num_devices: int | None = None):
    check_data_config(data_config)
    _check_batch(batch_size, num_devices)
    self._config = data_config
    self.split = split
    self.batch_size = int(batch_size)
    self.num_devices = num_devices
    self._builder = _prepared_builder(data_config)
    self.num_examples = split_size(data_config, split, self._builder)
    self.num_batches = -(-self.num_examples // self.batch_size)
    self._base = _base_dataset(data_config, split, self._builder)

  def __iter__(self) -> Iterator[dict[str, np.ndarray]]:
    """Yields {"image": float32 (B, S, S, 3), "mask": int32 (B, S, S), "weight": float32 (B,)} (sharded
    like TrainInput with num_devices); padded examples are zeros with weight 0."""
    ds = self._base.map(lambda ex: {"image": ex["image"], "mask": ex["mask"]})
    ds = ds.batch(self.batch_size)
    ds = ds.map(_finalize_fn(self._config.input_range), num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
    ds = ds.prefetch(tf.data.AUTOTUNE).with_options(_options())
    for batch in _as_numpy(ds, self._config, self.split, self._builder):
      yield _shard(_pad_batch(batch, self.batch_size), self.num_devices)


def _pad_batch(batch: dict[str, np.ndarray], batch_size: int) -> dict[str, np.ndarray]:
  """Adds "weight" (1 real, 0 padding) and pads a short last batch with zeros to `batch_size`."""
  n = batch["image"].shape[0]
  weight = np.zeros((batch_size,), np.float32)
  weight[:n] = 1.0
  if n < batch_size:
    batch = {k: np.concatenate([v, np.zeros((batch_size - n,) + v.shape[1:], v.dtype)]) for k, v in batch.items()}
  return dict(batch, weight=weight)
