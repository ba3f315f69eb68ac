"""Tests of the input pipeline: the three sources, messy files, preprocessing, batching, determinism, caching."""

import io
import itertools
import logging
import os
import re
from pathlib import Path
import shutil
import struct
import subprocess
import sys
import tarfile
import zlib

import numpy as np
from PIL import Image
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from configs import default
from petseg_jax import input_pipeline as ip
from petseg_jax.data import decode
from petseg_jax.data import folder_builder
from petseg_jax.data import synthetic
from petseg_jax.data import tfds_source

REPO_ROOT = Path(__file__).resolve().parents[1]

# Real pairs used for small folders: cats and dogs, several breeds (name, official list line).
TRAIN_PAIRS = [
    ("Abyssinian_100", "1 1 1"), ("Bengal_128", "6 1 2"), ("Birman_102", "7 1 3"),
    ("american_bulldog_150", "2 2 1"), ("great_pyrenees_108", "16 2 10"), ("samoyed_147", "30 2 20"),
]
TEST_PAIRS = [("Abyssinian_2", "1 1 1"), ("american_bulldog_2", "2 2 1"), ("Siamese_257", "33 1 11")]


def data_config(**overrides):
  config = default.get_config().data
  config.image_size = 64
  for key, value in overrides.items():
    setattr(config, key, value)
  return config


def synthetic_config(**overrides):
  return data_config(**{"source": "synthetic", "num_synthetic_train": 40, "num_synthetic_eval": 10,
                        "image_size": 32, **overrides})


def make_folder(root: Path, source: Path, train=TRAIN_PAIRS, test=TEST_PAIRS) -> Path:
  """An official-layout folder with copies of some real pairs."""
  (root / "images").mkdir(parents=True)
  (root / "annotations" / "trimaps").mkdir(parents=True)
  for split_file, pairs in (("trainval.txt", train), ("test.txt", test)):
    lines = []
    for name, ids in pairs:
      shutil.copy(source / "images" / f"{name}.jpg", root / "images" / f"{name}.jpg")
      shutil.copy(source / "annotations" / "trimaps" / f"{name}.png",
                  root / "annotations" / "trimaps" / f"{name}.png")
      lines.append(f"{name} {ids}\n")
    (root / "annotations" / split_file).write_text("".join(lines))
  return root


def first_batches(iterable, n):
  return list(itertools.islice(iterable, n))


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k])


@pytest.fixture(scope="module")
def quirks_folder(tmp_path_factory, pets_sample_dir):
  """Real pairs plus the messy-but-valid files: GIF- and RGBA-PNG-named .jpg, grayscale and CMYK JPEGs."""
  root = make_folder(tmp_path_factory.mktemp("quirks"), pets_sample_dir)
  src = pets_sample_dir
  trimaps = root / "annotations" / "trimaps"
  shutil.copy(src / "images" / "Abyssinian_34.jpg", root / "images" / "Abyssinian_34.jpg")  # A GIF.
  shutil.copy(src / "annotations" / "trimaps" / "Abyssinian_34.png", trimaps / "Abyssinian_34.png")
  rgb = Image.open(src / "images" / "Bengal_1.jpg").convert("RGB")
  rgba = rgb.convert("RGBA")
  rgba.putalpha(128)
  rgba.save(root / "images" / "Bengal_9001.jpg", format="PNG")
  rgb.convert("L").save(root / "images" / "Bengal_9002.jpg", format="JPEG", quality=95)
  rgb.convert("CMYK").save(root / "images" / "Bengal_9003.jpg", format="JPEG", quality=95)
  for n in ("9001", "9002", "9003"):
    shutil.copy(src / "annotations" / "trimaps" / "Bengal_1.png", trimaps / f"Bengal_{n}.png")
  with open(root / "annotations" / "trainval.txt", "a") as f:
    f.write("Abyssinian_34 1 1 1\nBengal_9001 6 1 6\nBengal_9002 6 1 6\n")
  with open(root / "annotations" / "test.txt", "a") as f:
    f.write("# a comment line, and a blank line\n\nBengal_9003 6 1 6\n")
  return root


# ----------------------------------------------------------------------------------------------------------
# Decoding and messy files.


def test_load_image_decodes_by_content(quirks_folder, pets_sample_dir):
  images = quirks_folder / "images"
  original = np.asarray(Image.open(pets_sample_dir / "images" / "Bengal_1.jpg").convert("RGB"), np.int32)
  gif = ip.load_image(images / "Abyssinian_34.jpg")
  assert gif.dtype == np.uint8 and gif.shape == (202, 250, 3)
  for name, tolerance in (("Bengal_9001", 0), ("Bengal_9003", 6)):
    decoded = ip.load_image(images / f"{name}.jpg")
    assert decoded.dtype == np.uint8 and decoded.shape == original.shape, name
    assert np.abs(decoded.astype(np.int32) - original).mean() <= tolerance, name  # RGBA: alpha dropped.
  gray = ip.load_image(images / "Bengal_9002.jpg")
  assert gray.shape == original.shape
  np.testing.assert_array_equal(gray[..., 0], gray[..., 1])



@pytest.mark.parametrize("orientation", range(1, 9))
def test_turn_upright_is_what_viewers_show_for_every_exif_orientation(orientation):
  from PIL import ImageOps  # pylint: disable=g-import-not-at-top
  pixels = np.random.default_rng(orientation).integers(0, 256, (3, 5, 3), dtype=np.uint8)  # Asymmetric.
  image = Image.fromarray(pixels)
  exif = image.getexif()
  exif[decode.EXIF_ORIENTATION_TAG] = orientation
  image.info["exif"] = exif.tobytes()
  viewed = np.asarray(ImageOps.exif_transpose(image))
  np.testing.assert_array_equal(decode.turn_upright(pixels, orientation), viewed)
  np.testing.assert_array_equal(decode.turn_upright(pixels[..., :1], orientation), viewed[..., :1])  # A trimap.


def test_rgb_trimaps_are_read_only_when_gray():
  def png(array):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()

  trimap = np.random.default_rng(0).integers(1, 4, (4, 6), dtype=np.uint8)
  gray_rgb = np.repeat(trimap[..., None], 3, axis=-1)
  np.testing.assert_array_equal(decode.decode_trimap_bytes(png(gray_rgb), "gray.png"), trimap)
  for channel in (1, 2):  # Any channel that differs makes it a colour image.
    coloured = gray_rgb.copy()
    coloured[0, 0, channel] = 3 if trimap[0, 0] != 3 else 1
    with pytest.raises(ip.DataError, match=r"colour\.png: trimap is a colour \(RGB\) image"):
      decode.decode_trimap_bytes(png(coloured), "colour.png")


def test_16_bit_images_keep_their_top_8_bits_and_32_bit_ones_are_refused(tmp_path):
  import io  # pylint: disable=g-import-not-at-top
  def encoded(array, image_format):
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format=image_format)
    return buffer.getvalue()
  bright = np.array([[0, 256], [32768, 65535]], np.uint16)
  dark = np.array([[0, 100], [200, 255]], np.uint16)  # A dark 16-bit photo: not 8-bit levels.
  for array in (bright, dark):
    rgb = decode.decode_image_bytes(encoded(array, "PNG"), "x.png")
    np.testing.assert_array_equal(rgb, np.repeat((array >> 8).astype(np.uint8)[..., None], 3, axis=-1))
  with pytest.raises(decode.DataError, match=r"x\.tif: 32-bit integer images .*convert it to an 8-bit"):
    decode.decode_image_bytes(encoded(dark.astype(np.int32), "TIFF"), "x.tif")

def test_quirky_folder_builds_and_keeps_pixels(quirks_folder):
  config = data_config(source="folder", data_dir=str(quirks_folder))
  assert ip.split_size(config, "train") == len(TRAIN_PAIRS) + 3
  assert ip.split_size(config, "test") == len(TEST_PAIRS) + 1
  seen = set()
  for split in ("train", "test"):
    for ex in tfds.as_numpy(ip.raw_dataset(config, split)):
      name = ex["file_name"].decode()
      seen.add(name)
      # What the pipeline decodes is what load_image gives (GIF/PNG/gray/CMYK converted once, losslessly kept).
      np.testing.assert_array_equal(ex["image"], ip.load_image(quirks_folder / "images" / name))
      trimap = decode.load_trimap(quirks_folder / "annotations" / "trimaps" / name.replace(".jpg", ".png"))
      np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], trimap)
  assert {"Abyssinian_34.jpg", "Bengal_9001.jpg", "Bengal_9002.jpg", "Bengal_9003.jpg"} <= seen


def _plant(problem: str, root: Path) -> tuple[str, str]:
  """Plants one problem in a clean folder; returns (offending file name, words the error must contain)."""
  images, trimaps = root / "images", root / "annotations" / "trimaps"
  victim = TRAIN_PAIRS[1][0]
  image, trimap = images / f"{victim}.jpg", trimaps / f"{victim}.png"
  if problem == "truncated":
    data = image.read_bytes()
    image.write_bytes(data[:len(data) // 2])
    return image.name, "truncated"
  if problem == "corrupt":
    data = image.read_bytes()
    # The JPEG signature and JFIF segment, then garbage (fixed, so the test is deterministic).
    image.write_bytes(data[:20] + np.random.default_rng(0).bytes(len(data) - 20))
    return image.name, "corrupt"
  if problem == "corrupt_for_tensorflow":  # PIL decodes it (libjpeg warns); TensorFlow's decoder refuses it.
    import tensorflow as tf  # pylint: disable=g-import-not-at-top
    data = image.read_bytes()
    start = data.index(b"\xff\xda")  # Start of scan: entropy-coded data follows.
    # A stuffed 0xff 0x00 turned into 0xff 0xef: a marker inside the scan data. The first such spot (from the
    # middle on) where PIL still decodes the file and TensorFlow does not; fixed, so the test is deterministic.
    for i in range(data.index(b"\xff\x00", (start + len(data)) // 2), len(data) - 1):
      if data[i:i + 2] != b"\xff\x00":
        continue
      candidate = data[:i + 1] + b"\xef" + data[i + 2:]
      try:
        Image.open(io.BytesIO(candidate)).load()
        tf.io.decode_image(candidate, channels=3).numpy()
      except OSError:
        continue  # PIL refuses it too: the "corrupt" case.
      except tf.errors.InvalidArgumentError:
        image.write_bytes(candidate)
        return image.name, "TensorFlow's JPEG decoder"
    raise AssertionError(f"no corruption of {image} that only TensorFlow refuses")
  if problem == "zero_bytes":
    image.write_bytes(b"")
    return image.name, "empty"
  if problem == "text":
    image.write_text("404 Not Found: this is not an image\n")
    return image.name, "text"
  if problem == "missing_trimap":
    trimap.unlink()
    return trimap.name, "missing trimap"
  if problem == "trimap_size":
    Image.open(trimap).resize((50, 40), Image.Resampling.NEAREST).save(trimap)
    return trimap.name, "50x40"
  if problem in ("trimap_value_0", "trimap_value_4"):
    value = int(problem[-1])
    t = np.asarray(Image.open(trimap)).copy()
    t[5:9, 5:9] = value
    Image.fromarray(t).save(trimap)
    return trimap.name, f"[{value}]"
  if problem == "missing_image":
    with open(root / "annotations" / "trainval.txt", "a") as f:
      f.write("Bengal_777 6 1 6\n")
    return "Bengal_777.jpg", "missing image"
  if problem == "huge_header":  # A PNG header claiming 30000x30000 pixels: PIL refuses it at open.
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data
                                + struct.pack(">I", zlib.crc32(kind + data)))
    image.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
                      + chunk(b"IDAT", zlib.compress(b"\0" * 10)) + chunk(b"IEND", b""))
    return image.name, "too large to decode"
  if problem == "uppercase_jpg":  # Only the case differs: the message says which file to rename.
    image.rename(image.with_suffix(".JPG"))
    return image.name, f"found {image.stem}.JPG instead: rename it to {image.name}"
  if problem == "uppercase_png":
    trimap.rename(trimap.with_suffix(".PNG"))
    return trimap.name, f"found {trimap.stem}.PNG instead: rename it to {trimap.name}"
  raise ValueError(problem)


BAD_CASES = ["truncated", "corrupt", "corrupt_for_tensorflow", "zero_bytes", "text", "missing_trimap", "trimap_size",
             "trimap_value_0", "trimap_value_4", "missing_image", "uppercase_jpg", "uppercase_png", "huge_header"]


@pytest.mark.parametrize("problem", BAD_CASES)
def test_bad_file_is_named_or_skipped(problem, tmp_path, pets_sample_dir, tfds_data_dir, caplog):
  root = make_folder(tmp_path / "pets", pets_sample_dir)
  bad_name, words = _plant(problem, root)
  config = data_config(source="folder", data_dir=str(root))
  with pytest.raises(ip.DataError) as info:
    ip.get_dataset_builder(config)
  message = str(info.value)
  assert bad_name in message and words in message, message
  assert "skip_bad_examples" in message
  # A failed build leaves nothing behind that a later run could pick up.
  layout = folder_builder.check_layout(str(root))
  splits = {s: folder_builder.read_split_list(p) for s, p in layout.lists.items()}
  name = folder_builder.config_name(layout, folder_builder.fingerprint(layout, splits, False))
  assert not [p for p in (tfds_data_dir / "pets_folder" / name).rglob("*") if p.is_file()]
  assert not [p for p in tfds_data_dir.rglob("*incomplete*")]

  config.skip_bad_examples = True
  with caplog.at_level(logging.WARNING):
    num_train = ip.split_size(config, "train")
  expected = len(TRAIN_PAIRS) if problem == "missing_image" else len(TRAIN_PAIRS) - 1
  assert num_train == expected
  assert ip.split_size(config, "test") == len(TEST_PAIRS)
  skips = [r.getMessage() for r in caplog.records if "Skipping bad example" in r.getMessage()]
  assert len(skips) == 1 and bad_name in skips[0], skips
  assert any("Skipped 1 of" in r.getMessage() for r in caplog.records)
  batch = next(iter(ip.EvalInput(config, "train", 4)))
  assert set(np.unique(batch["mask"])) <= {0, 1, 2}


@pytest.mark.parametrize("problem", ["no_dir", "empty_setting", "no_images", "no_list", "empty_list",
                                     "unreadable_images"])
def test_layout_errors_name_the_path(problem, tmp_path, pets_sample_dir, monkeypatch):
  root = make_folder(tmp_path / "pets", pets_sample_dir, train=TRAIN_PAIRS[:1], test=TEST_PAIRS[:1])
  expected = str(root)
  if problem == "no_dir":
    root = tmp_path / "nowhere"
    expected = "nowhere"
  elif problem == "empty_setting":
    root, expected = "", "data_dir is empty"
  elif problem == "no_images":
    shutil.rmtree(root / "images")
    expected = str(root / "images")
  elif problem == "no_list":
    (root / "annotations" / "test.txt").unlink()
    expected = str(root / "annotations" / "test.txt")
  elif problem == "empty_list":
    (root / "annotations" / "trainval.txt").write_text("# only a comment\n\n")
    expected = str(root / "annotations" / "trainval.txt")
  elif problem == "unreadable_images":
    images = str(root / "images")
    real_listdir = os.listdir

    def listdir(path="."):
      if os.path.abspath(path) == images:
        raise PermissionError(13, "Permission denied", path)
      return real_listdir(path)

    # The tests run as root, for whom chmod does not deny reading; simulate what a user would get.
    monkeypatch.setattr(os, "listdir", listdir)
    expected = f"{images}: permission denied"
  with pytest.raises(ip.DataError) as info:
    ip.get_dataset_builder(data_config(source="folder", data_dir=str(root)))
  message = str(info.value)
  assert expected in message and "Expected layout" in message, message


def test_split_list_lines_are_checked(tmp_path):
  path = tmp_path / "trainval.txt"
  path.write_text("Abyssinian_1 1 1 1\nAbyssinian_1 1 1 1\n")
  with pytest.raises(ip.DataError, match="line 2.*listed twice"):
    folder_builder.read_split_list(str(path))
  path.write_text("Abyssinian_1.JPG 1 1 1\n")
  with pytest.raises(ip.DataError, match="line 1.*bare image name"):
    folder_builder.read_split_list(str(path))
  path.write_text("Abyssinian_1 99 1 1\n")
  with pytest.raises(ip.DataError, match="line 1.*CLASS_ID 99"):
    folder_builder.read_split_list(str(path))
  # The ids become the records' "label" and "species": they must agree with each other and the name.
  for text, words in (("Abyssinian_1 26 2 20\n", "CLASS_ID 26 is pug, but 'Abyssinian_1' names Abyssinian"),
                      ("Abyssinian_1 1 2 1\n", "SPECIES 2 does not fit CLASS_ID 1 (Abyssinian, a cat"),
                      ("Abyssinian_1 1 1 x\n", "with integers")):
    path.write_text(text)
    with pytest.raises(ip.DataError, match=f"line 1.*{re.escape(words)}"):
      folder_builder.read_split_list(str(path))
  path.write_text("my_cat_7 1 1 1\n")  # Not an official name: the ids are all there is to go by.
  assert [(e.label, e.species) for e in folder_builder.read_split_list(str(path))] == [(0, 0)]
  path.write_text("Persian_3\nbeagle_4\n")  # Name-only lines: breed and species from the official naming.
  entries = folder_builder.read_split_list(str(path))
  assert [(folder_builder.BREEDS[e.label], e.species) for e in entries] == [("Persian", 0), ("beagle", 1)]
  path.write_bytes(b"\xef\xbb\xbfAbyssinian_1 1 1 1\r\n")  # A byte-order mark and CRLF (Windows editors).
  assert [e.name for e in folder_builder.read_split_list(str(path))] == ["Abyssinian_1"]


def test_an_image_in_both_split_lists_is_refused(tmp_path, pets_sample_dir):
  # Bengal_128 in trainval and test: it would be trained on and then scored as unseen.
  root = make_folder(tmp_path / "pets", pets_sample_dir, train=TRAIN_PAIRS[:2], test=TEST_PAIRS[:1])
  with open(root / "annotations" / "test.txt", "a") as f:
    f.write("Bengal_128 6 1 2\n")
  with pytest.raises(ip.DataError) as info:
    ip.get_dataset_builder(data_config(source="folder", data_dir=str(root)))
  message = str(info.value)
  assert "'Bengal_128'" in message and "more than one split" in message, message
  assert "trainval.txt line 2" in message and "test.txt line 2" in message, message


def test_prepared_folder_is_keyed_by_path_and_content(tmp_path, pets_sample_dir, monkeypatch, caplog):
  a = make_folder(tmp_path / "a" / "pets", pets_sample_dir, train=TRAIN_PAIRS[:2], test=TEST_PAIRS[:1])
  b = make_folder(tmp_path / "b" / "pets", pets_sample_dir, train=TRAIN_PAIRS[:2], test=TEST_PAIRS[:1])
  builder_a = folder_builder.prepare_folder_builder(str(a))
  with caplog.at_level(logging.WARNING):  # The other setting's copy of the same contents is not stale.
    skipping = folder_builder.prepare_folder_builder(str(a), skip_bad_examples=True)
  assert skipping.data_dir != builder_a.data_dir and "earlier prepared" not in caplog.text
  builder_b = folder_builder.prepare_folder_builder(str(b))
  assert builder_a.data_dir != builder_b.data_dir  # Same folder name, different paths: no collision.

  def no_rebuild(*args):
    raise AssertionError("rebuilt an unchanged folder")

  monkeypatch.setattr(folder_builder, "_encode_example", no_rebuild)
  assert folder_builder.prepare_folder_builder(str(a)).data_dir == builder_a.data_dir
  monkeypatch.undo()
  trimap = a / "annotations" / "trimaps" / f"{TRAIN_PAIRS[0][0]}.png"
  t = np.asarray(Image.open(trimap)).copy()
  t[:4, :4] = 3
  Image.fromarray(t).save(trimap)
  os.utime(trimap, ns=(1, 10**18))  # A changed file (size or mtime) gets a new prepared copy.
  caplog.clear()
  with caplog.at_level(logging.WARNING):
    assert folder_builder.prepare_folder_builder(str(a)).data_dir != builder_a.data_dir
  # The copies of the earlier contents are named (both settings'), not deleted: a run may still read them.
  (report,) = [r.getMessage() for r in caplog.records if "earlier prepared copies" in r.getMessage()]
  stale = sorted(Path(d).parent.name for d in (builder_a.data_dir, skipping.data_dir))
  assert f"2 earlier prepared copies of {a}" in report and report.endswith(
      f"{', '.join(stale)}. Runs on the folder as it is now do not use them; delete them once no run started "
      "before the change still reads them."), report
  assert Path(builder_b.data_dir).parent.name not in report and Path(builder_a.data_dir).is_dir()
  # An image changed in place (same name and list lines) gets a new copy too.
  changed_trimap = folder_builder.prepare_folder_builder(str(a)).data_dir
  os.utime(a / "images" / f"{TRAIN_PAIRS[1][0]}.jpg", ns=(1, 10**18))
  assert folder_builder.prepare_folder_builder(str(a)).data_dir not in (changed_trimap, builder_a.data_dir)


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "deleted"])
def test_a_damaged_prepared_copy_is_named_with_what_to_do(damage, tmp_path, pets_sample_dir):
  folder = make_folder(tmp_path / "pets", pets_sample_dir, train=TRAIN_PAIRS[:3], test=TEST_PAIRS[:1])
  config = data_config(source="folder", data_dir=str(folder), image_size=32)
  prepared = Path(ip.get_dataset_builder(config).data_dir)
  (record,) = prepared.glob("*-train.tfrecord-*")
  data = record.read_bytes()
  if damage == "truncated":
    record.write_bytes(data[:len(data) // 2])
  elif damage == "corrupted":  # Record checksums catch changed bytes.
    record.write_bytes(data[:100] + bytes(255 - b for b in data[100:200]) + data[200:])
  else:
    record.unlink()
  train_input = ip.TrainInput(config, 2, seed=0)
  # The folder changes while the run reads its copy (the folder builder's own advice): the error still names
  # the copy that was read, and prepares no new one.
  image = next((folder / "images").iterdir())
  os.utime(image, (image.stat().st_atime, image.stat().st_mtime + 10))
  copies = sorted(prepared.parent.parent.iterdir())
  with pytest.raises(ip.DataError) as raised:
    list(train_input.epoch(0))
  assert sorted(prepared.parent.parent.iterdir()) == copies
  message = str(raised.value)
  assert message.startswith("Reading split 'train' of config.data.source='folder' failed: "), message
  assert f"The prepared copy in {prepared} is damaged" in message and "delete that folder" in message
  assert "function_node" not in message and "[Op:" not in message
  shutil.rmtree(prepared)  # What the message says to do: the next run prepares it anew.
  assert len(list(ip.EvalInput(config, "train", 2))) == 2


# ----------------------------------------------------------------------------------------------------------
# The three sources on real and synthetic pixels.


def test_shared_sample_folder(pets_sample_dir):
  config = data_config(source="folder", data_dir=str(pets_sample_dir), image_size=32)
  lines = {s: len((pets_sample_dir / "annotations" / f).read_text().split("\n")) - 1
           for s, f in (("train", "trainval.txt"), ("test", "test.txt"))}
  assert ip.split_size(config, "train") == lines["train"] == 356
  eval_input = ip.EvalInput(config, "test", 64)
  assert eval_input.num_examples == lines["test"] == 235
  total, counts = 0.0, np.zeros(3)
  for batch in eval_input:
    assert batch["image"].dtype == np.float32 and batch["image"].shape == (64, 32, 32, 3)
    assert batch["mask"].dtype == np.int32 and batch["mask"].shape == (64, 32, 32)
    assert -1.0 <= batch["image"].min() and batch["image"].max() <= 1.0
    assert set(np.unique(batch["mask"])) <= {0, 1, 2}
    counts += np.bincount(batch["mask"][batch["weight"] > 0].ravel(), minlength=3)
    total += batch["weight"].sum()
  assert total == 235
  assert all(counts > 0.05 * counts.sum())  # Pets, background and borders all present.


def _write_official_archives(folder: Path, src: Path) -> None:
  """images.tar.gz / annotations.tar.gz in the official layout, from a few real pairs."""
  with tarfile.open(folder / "images.tar.gz", "w:gz") as tar:
    for name, _ in TRAIN_PAIRS[:4] + TEST_PAIRS[:2]:
      tar.add(src / "images" / f"{name}.jpg", arcname=f"images/{name}.jpg")
  with tarfile.open(folder / "annotations.tar.gz", "w:gz") as tar:
    for name, _ in TRAIN_PAIRS[:4] + TEST_PAIRS[:2]:
      tar.add(src / "annotations" / "trimaps" / f"{name}.png", arcname=f"annotations/trimaps/{name}.png")
    for split_file, pairs in (("trainval.txt", TRAIN_PAIRS[:4]), ("test.txt", TEST_PAIRS[:2])):
      path = folder / split_file
      path.write_text("".join(f"{n} {ids}\n" for n, ids in pairs))
      tar.add(path, arcname=f"annotations/{split_file}")


def test_tfds_source_from_manual_archives(tmp_path, pets_sample_dir, monkeypatch):
  manual = tmp_path / "manual"
  manual.mkdir()
  _write_official_archives(manual, pets_sample_dir)
  builder_cls = tfds.builder_cls("oxford_iiit_pet")
  # tfds checks manually placed archives against the official size/sha256: substitute ours.
  url_infos = {url: tfds.core.download.checksums.compute_url_info(manual / info.filename)
               for url, info in builder_cls.url_infos.items()}
  monkeypatch.setattr(builder_cls, "url_infos", url_infos)
  monkeypatch.setattr(tfds_source, "_network_available", lambda hosts: pytest.fail("probed the network"))
  config = data_config(source="tfds", data_dir=str(tmp_path / "tfds"), manual_dir=str(manual))
  assert ip.split_size(config, "train") == 4 and ip.split_size(config, "test") == 2
  for ex in tfds.as_numpy(ip.raw_dataset(config, "test")):
    name = ex["file_name"].decode()
    np.testing.assert_array_equal(ex["image"], ip.load_image(pets_sample_dir / "images" / name))
    trimap = decode.load_trimap(pets_sample_dir / "annotations" / "trimaps" / name.replace(".jpg", ".png"))
    np.testing.assert_array_equal(ex["segmentation_mask"][..., 0], trimap)
  batches = list(ip.EvalInput(config, "test", 4))
  assert len(batches) == 1 and batches[0]["weight"].tolist() == [1, 1, 0, 0]
  assert set(np.unique(batches[0]["mask"][:2])) == {0, 1, 2}


def test_tfds_source_offline_errors(tmp_path, monkeypatch):
  monkeypatch.setattr(tfds_source, "_network_available", lambda hosts: False)
  config = data_config(source="tfds", data_dir=str(tmp_path / "tfds"))
  with pytest.raises(ip.DataError) as info:
    ip.get_dataset_builder(config)
  message = str(info.value)
  assert "cannot be reached" in message and "manual_dir" in message and "source=folder" in message
  assert "images.tar.gz" in message and str(tmp_path / "tfds" / "downloads" / "manual") in message
  # The bundled sample is small: the way out says what batch it takes (the default config's 64 does not).
  assert "whose 48 training images take --config.train.batch_size=48 or less" in message
  manual = tmp_path / "manual"
  manual.mkdir()
  (manual / "images.tar.gz").write_bytes(b"")
  config.manual_dir = str(manual)
  with pytest.raises(ip.DataError, match="lacks annotations.tar.gz"):
    ip.get_dataset_builder(config)


class _FakePetsBuilder:
  """What raw_dataset uses of a prepared tfds oxford_iiit_pet builder, over in-memory examples."""

  name = "oxford_iiit_pet"

  def __init__(self, data_dir, masks, file_names):
    self.data_dir = str(data_dir)
    self._examples = {"image": np.zeros(masks.shape[:3] + (3,), np.uint8), "segmentation_mask": masks,
                      "file_name": file_names, "label": np.zeros(len(masks), np.int64)}
    self.info = type("Info", (), {"splits": {"test": type("Split", (), {"num_examples": len(masks)})()}})()

  def as_dataset(self, split, shuffle_files, read_config):
    del shuffle_files, read_config
    assert split == "test"
    return tf.data.Dataset.from_tensor_slices(self._examples)


def test_tfds_source_trimap_values_are_checked(tmp_path, monkeypatch):
  masks = np.full((3, 8, 8, 1), 2, np.uint8)
  masks[0, :4] = 1
  masks[1, 2, 5] = 0  # The folder source refuses such a trimap before it builds; tfds' must not pass either.
  masks[1, 6, 0] = 7
  builder = _FakePetsBuilder(tmp_path / "oxford_iiit_pet" / "4.0.0", masks, ["a_1.jpg", "b'ü_2.jpg", "c_3.jpg"])
  monkeypatch.setattr(tfds_source, "prepare_official_builder", lambda *args, **kwargs: builder)
  config = data_config(source="tfds", image_size=32, train_split="test")
  with pytest.raises(ip.DataError) as info:
    list(ip.EvalInput(config, "test", 2))
  message = str(info.value)
  assert "example b'ü_2.jpg: trimap values [0, 7] are outside {1 pet, 2 background, 3 border}" in message
  assert "(2 pixels, first at row 2, column 5)" in message and "split 'test'" in message
  assert builder.data_dir in message and "source=folder" in message and "petseg_jax.DataError" not in message
  with pytest.raises(ip.DataError, match="trimap values"):
    list(ip.TrainInput(config, 2, seed=0).epoch(0))
  masks[1, 2, 5] = masks[1, 6, 0] = 3
  batches = list(ip.EvalInput(config, "test", 2))  # Valid trimaps pass unchanged.
  assert [b["weight"].tolist() for b in batches] == [[1, 1], [1, 0]]
  assert set(np.unique(batches[0]["mask"][0])) == {0, 1}

def test_synthetic_examples_are_deterministic_and_recoverable():
  image, trimap = synthetic.render_example(0, 3, 64)
  again, trimap_again = synthetic.render_example(0, 3, 64)
  np.testing.assert_array_equal(image, again)
  np.testing.assert_array_equal(trimap, trimap_again)
  assert not np.array_equal(image, synthetic.render_example(1, 3, 64)[0])
  assert image.dtype == np.uint8 and image.shape == (64, 64, 3) and trimap.shape == (64, 64)
  images, trimaps = synthetic.generate(16, 64)
  assert set(np.unique(trimaps)) == {1, 2, 3}
  for img, tri in zip(images, trimaps):
    assert (synthetic.mask_from_image(img) == tri).mean() > 0.99
    assert not np.array_equal(tri, tri[:, ::-1])  # Asymmetric: a wrong flip would show.


# ----------------------------------------------------------------------------------------------------------
# Preprocessing.


def test_mask_resize_nearest_keeps_values_bilinear_invents_them():
  # Pet left of a diagonal edge, border right of it, no background; the edge crosses every sub-pixel phase.
  y, x = np.mgrid[:75, :100]
  trimap = tf.constant(np.where(x < 20 + y, 1, 3).astype(np.uint8)[..., None])
  nearest = ip._resize_trimap_to_labels(trimap, 64, "nearest").numpy()
  bilinear = ip._resize_trimap_to_labels(trimap, 64, "bilinear").numpy()
  assert set(np.unique(nearest)) == {0, 2}
  assert set(np.unique(bilinear)) == {0, 1, 2}  # "Background" invented along the edge: the old mistake.


def _nearest(array: np.ndarray, size: int) -> np.ndarray:
  """Nearest-neighbour resize to (size, size), sampling each output pixel's centre (half-pixel centres)."""
  h, w = array.shape[:2]
  rows = np.minimum(np.floor((np.arange(size) + 0.5) * h / size).astype(int), h - 1)
  cols = np.minimum(np.floor((np.arange(size) + 0.5) * w / size).astype(int), w - 1)
  return array[rows][:, cols]


def test_masks_on_real_data_are_the_trimaps_nearest_resized_minus_one(quirks_folder):
  """Every eval mask is its trimap file resized nearest-neighbour, labels = trimap - 1 (no value a resize
  could invent), in the prepared split's order (raw_dataset's, which names the files)."""
  config = data_config(source="folder", data_dir=str(quirks_folder), image_size=32)
  names = [ex["file_name"].decode() for ex in tfds.as_numpy(ip.raw_dataset(config, "train"))]
  batch = next(iter(ip.EvalInput(config, "train", 16)))
  masks = batch["mask"][batch["weight"] > 0]
  listed = folder_builder.read_split_list(str(quirks_folder / "annotations" / "trainval.txt"))
  assert sorted(names) == sorted(f"{e.name}.jpg" for e in listed) and len(masks) == len(names)
  for name, mask in zip(names, masks):
    trimap = decode.load_trimap(quirks_folder / "annotations" / "trimaps" / name.replace(".jpg", ".png"))
    np.testing.assert_array_equal(mask, _nearest(trimap, 32).astype(np.int32) - 1, err_msg=name)


def test_input_ranges():
  images = {}
  for input_range in ("[-1,1]", "[0,1]"):
    batch = next(iter(ip.EvalInput(synthetic_config(input_range=input_range), "test", 10)))
    images[input_range] = batch["image"]
  assert images["[0,1]"].min() >= 0 and images["[0,1]"].max() <= 1
  assert images["[-1,1]"].min() >= -1 and images["[-1,1]"].max() <= 1 and images["[-1,1]"].min() < -0.5
  np.testing.assert_allclose(images["[0,1]"] * 2 - 1, images["[-1,1]"], atol=1e-5)


def test_preprocess_images_matches_eval(quirks_folder):
  config = data_config(source="folder", data_dir=str(quirks_folder))
  names = [ex["file_name"].decode() for ex in tfds.as_numpy(ip.raw_dataset(config, "test"))]
  batch = next(iter(ip.EvalInput(config, "test", 8)))
  images = [ip.load_image(quirks_folder / "images" / n) for n in names]
  np.testing.assert_array_equal(ip.preprocess_images(images, config), batch["image"][:len(names)])


def test_bad_config_values_are_named():
  for field, value in (("source", "s3"), ("image_size", 100), ("input_range", "[0,255]"),
                       ("mask_resize", "cubic")):
    with pytest.raises(ip.DataError, match=f"config.data.{field}"):
      ip.split_size(synthetic_config(**{field: value}), "train")
  with pytest.raises(ip.DataError, match="'validation'.*synthetic"):
    ip.split_size(synthetic_config(), "validation")
  for field, split in (("num_synthetic_eval", "test"), ("num_synthetic_train", "train")):
    with pytest.raises(ip.DataError, match=f"config.data.{field}=0"):
      ip.EvalInput(synthetic_config(**{field: 0}), split, 4)


# ----------------------------------------------------------------------------------------------------------
# Training batches: augmentation, determinism, resume, caching.


def _unaugmented(config, split="train"):
  batch = next(iter(ip.EvalInput(config, split, 1000)))
  keep = batch["weight"] > 0
  return batch["image"][keep], batch["mask"][keep]


def test_flip_keeps_image_and_mask_aligned():
  config = synthetic_config(random_flip=True)
  images, masks = _unaugmented(config)
  flipped = 0
  for batch in ip.TrainInput(config, 8, seed=1).epoch(0):
    for image, mask in zip(batch["image"], batch["mask"]):
      match = [i for i in range(len(images)) if np.array_equal(image, images[i])]
      mirror = [i for i in range(len(images)) if np.array_equal(image, images[i][:, ::-1])]
      assert len(match) + len(mirror) == 1
      if match:
        np.testing.assert_array_equal(mask, masks[match[0]])
      else:
        np.testing.assert_array_equal(mask, masks[mirror[0]][:, ::-1])
        flipped += 1
      pixels = np.round((image + 1) * 127.5).astype(np.uint8)
      assert (synthetic.mask_from_image(pixels) - 1 == mask).mean() > 0.99
  assert 5 <= flipped <= 35  # About half of 40.


def test_random_resized_crop_and_color_jitter():
  config = synthetic_config(random_flip=False, random_resized_crop=True)
  images, _ = _unaugmented(config)
  batches = list(ip.TrainInput(config, 8, seed=0).epoch(0))
  changed = 0
  for batch in batches:
    for image, mask in zip(batch["image"], batch["mask"]):
      changed += not any(np.array_equal(image, i) for i in images)
      pixels = np.round((image + 1) * 127.5).astype(np.uint8)
      assert (synthetic.mask_from_image(pixels) - 1 == mask).mean() > 0.9  # Aligned up to edge resampling.
  assert changed > 20
  assert_batches_equal(batches, list(ip.TrainInput(config, 8, seed=0).epoch(0)))

  config = synthetic_config(random_flip=False, color_jitter=True, input_range="[0,1]")
  images, masks = _unaugmented(config)
  batches = list(ip.TrainInput(config, 8, seed=0).epoch(0))
  jittered = 0
  for batch in batches:
    assert batch["image"].dtype == np.float32 and 0 <= batch["image"].min() and batch["image"].max() <= 1
    for image, mask in zip(batch["image"], batch["mask"]):
      (index,) = [i for i in range(len(masks)) if np.array_equal(mask, masks[i])]  # Masks are not jittered.
      jittered += not np.allclose(image, images[index], atol=1e-6)
      # Brightness moves the mean by at most its delta (contrast keeps the mean; clipping pulls it in).
      assert abs(image.mean() - images[index].mean()) <= ip.BRIGHTNESS_MAX_DELTA + 1e-6
  assert jittered >= 0.9 * sum(len(batch["image"]) for batch in batches)
  assert_batches_equal(batches, list(ip.TrainInput(config, 8, seed=0).epoch(0)))


def test_training_epochs_are_pure_functions_of_seed_and_epoch():
  config = synthetic_config(random_flip=True, random_resized_crop=True, shuffle_buffer=16)
  train = ip.TrainInput(config, 8, seed=3)
  assert (train.num_examples, train.steps_per_epoch) == (40, 5)
  epoch2 = list(train.epoch(2))
  assert len(epoch2) == 5
  assert_batches_equal(epoch2, list(ip.TrainInput(config, 8, seed=3).epoch(2)))  # A fresh object (restart).
  assert_batches_equal(epoch2, list(train.epoch(2)))  # The same object again.
  for start in (1, 4, 5):
    assert_batches_equal(epoch2[start:], list(train.epoch(2, start_step=start)))
  assert not np.array_equal(epoch2[0]["image"], list(train.epoch(3))[0]["image"])
  assert not np.array_equal(epoch2[0]["image"], list(ip.TrainInput(config, 8, seed=4).epoch(2))[0]["image"])
  with pytest.raises(ip.DataError, match="start_step=6"):
    next(train.epoch(0, start_step=6))
  # The augmentation follows the epoch too, not only the order: each example's flip, crop and jitter.
  keys = [ip.epoch_seeds(3, epoch)[1] for epoch in (2, 3)]
  assert not np.array_equal(ip.flip_table(keys[0], 40), ip.flip_table(keys[1], 40))
  assert not np.array_equal(ip.seed_table(keys[0], 40), ip.seed_table(keys[1], 40))


def test_cache_is_filled_once_and_reused(monkeypatch):
  calls = []
  render = synthetic.render_example
  monkeypatch.setattr(synthetic, "render_example", lambda *args: calls.append(args) or render(*args))
  # 39 examples, batch 8: a remainder of 7, and a tiny configured shuffle buffer (the worst case).
  config = synthetic_config(num_synthetic_train=39, shuffle_buffer=1)
  train = ip.TrainInput(config, 8, seed=0)
  # Consume exactly steps_per_epoch batches without exhausting the iterator, as a training loop does.
  assert len(first_batches(train.epoch(0), train.steps_per_epoch)) == 4
  assert len(calls) == 39
  for epoch in (1, 2):
    batches = list(train.epoch(epoch))
    # Full batches only: the remainder of 7 is dropped (a short batch would not split over the devices).
    assert len(batches) == 4 and all(batch["image"].shape[0] == 8 for batch in batches)
  assert len(calls) == 39  # Later epochs come from the cache: nothing decoded or drawn again.
  eval_input = ip.EvalInput(config, "test", 4)
  list(eval_input)
  list(eval_input)
  assert len(calls) == 39 + 10


@pytest.mark.parametrize("batch_size,num_devices", [(5, None), (4, None), (16, None), (4, 2), (6, 3)])
def test_eval_counts_every_example_exactly_once(batch_size, num_devices):
  config = synthetic_config()
  images, masks = _unaugmented(config, "test")
  assert len(images) == 10
  eval_input = ip.EvalInput(config, "test", batch_size, num_devices=num_devices)
  assert eval_input.num_examples == 10
  batches = list(eval_input)
  assert len(batches) == eval_input.num_batches == -(-10 // batch_size)
  seen_images, seen_masks = [], []
  for batch in batches:
    if num_devices:
      assert batch["image"].shape == (num_devices, batch_size // num_devices, 32, 32, 3)
      assert batch["weight"].shape == (num_devices, batch_size // num_devices)
      batch = {k: v.reshape((-1,) + v.shape[2:]) for k, v in batch.items()}
    assert batch["weight"].dtype == np.float32 and batch["image"].shape[0] == batch_size
    seen_images.extend(batch["image"][batch["weight"] > 0])
    seen_masks.extend(batch["mask"][batch["weight"] > 0])
  np.testing.assert_array_equal(np.stack(seen_images), images)  # Each once, in order, none padded in.
  np.testing.assert_array_equal(np.stack(seen_masks), masks)
  assert_batches_equal(batches, list(eval_input))


def test_device_sharded_training_batches():
  config = synthetic_config()
  batch = next(ip.TrainInput(config, 8, seed=0, num_devices=2).epoch(0))
  assert batch["image"].shape == (2, 4, 32, 32, 3) and batch["mask"].shape == (2, 4, 32, 32)
  flat = next(ip.TrainInput(config, 8, seed=0).epoch(0))
  np.testing.assert_array_equal(batch["image"].reshape(flat["image"].shape), flat["image"])
  for cls, args in ((ip.TrainInput, (config, 7)), (ip.EvalInput, (config, "test", 7))):
    with pytest.raises(ip.DataError, match="7 is not divisible by the number of devices 2"):
      cls(*args, **({"seed": 0} if cls is ip.TrainInput else {}), num_devices=2)
  with pytest.raises(ip.DataError, match="larger than the 40 examples"):
    ip.TrainInput(config, 64, seed=0)


# ----------------------------------------------------------------------------------------------------------
# The bundled sample and the show_data script.


def test_bundled_sample():
  root = Path(ip.BUNDLED_SAMPLE_DIR)
  assert root.is_dir() and (root / "LICENSE.md").is_file()
  assert "CC BY-SA 4.0" in (root / "LICENSE.md").read_text()
  assert sum(p.stat().st_size for p in root.rglob("*") if p.is_file()) < 1.5e6
  config = data_config(source="folder", data_dir=str(root), image_size=32)
  assert ip.split_size(config, "train") == 48 and ip.split_size(config, "test") == 24
  for path in sorted((root / "images").iterdir())[:10]:
    header = decode.read_header(path)
    assert header.format == "JPEG" and min(header.width, header.height) == 160


@pytest.mark.parametrize("train_split, eval_split, shared", [
    ("train", "test", 0), ("train[:80%]", "train[80%:]", 0), ("train", "train[80%:]", 10),
    ("train[:50%]+test", "test[:5]", 5), ("train[:30]", "train[20:]", 10)])
def test_shared_examples_of_sliced_splits(train_split, eval_split, shared):
  config = data_config(source="folder", data_dir=str(ip.BUNDLED_SAMPLE_DIR), image_size=32,
                       train_split=train_split, eval_split=eval_split)  # train: 48, test: 24.
  assert ip.shared_examples(config, train_split, eval_split) == shared
  if shared:
    with pytest.raises(ip.DataError, match=rf"share {shared} example\(s\): the evaluation would score images"):
      ip.check_train_eval_disjoint(config)
  else:
    ip.check_train_eval_disjoint(config)


def test_synthetic_splits_overlap_only_when_equal():
  assert ip.shared_examples(synthetic_config(), "train", "test") == 0
  with pytest.raises(ip.DataError, match="config.data.train_split=.test. and config.data.eval_split='test' share 10"):
    ip.check_train_eval_disjoint(synthetic_config(train_split="test", eval_split="test"))


def test_show_data_script(tmp_path):
  out = tmp_path / "show"
  result = subprocess.run(
      [sys.executable, "scripts/show_data.py", "--config", "configs/default.py", "--num", "3", "--output",
       str(out), "--config.data.source=synthetic", "--config.data.image_size=32",
       "--config.data.num_synthetic_train=20"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  assert sorted(p.name for p in out.iterdir()) == ["train_000.png", "train_001.png", "train_002.png"]
  assert "Class histogram of split 'train' (20 examples" in result.stdout
  for name in ip.CLASS_NAMES:
    assert name in result.stdout


@pytest.mark.parametrize("args, message", [
    (("--num", "0", "--output", "{tmp}/show"), "flag --num=0: 0 is not a positive integer"),
    (("--output", "{tmp}/a_file"), "a_file is a file; give a folder (made if missing)."),
    (("--output", "{tmp}/a_file/figures"), "figures lies under {tmp}/a_file, which is a file; give a folder"),
])
def test_show_data_refuses_nonsense_flags_in_one_line(tmp_path, args, message):
  (tmp_path / "a_file").write_text("")
  result = subprocess.run([sys.executable, "scripts/show_data.py", *(a.format(tmp=tmp_path) for a in args),
                           "--config.data.source=synthetic"],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 1 and message.format(tmp=tmp_path) in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr and not (tmp_path / "show").exists()


def test_show_data_augment_with_more_images_than_the_train_split(tmp_path):
  out = tmp_path / "show"
  result = subprocess.run(
      [sys.executable, "scripts/show_data.py", "--config", "configs/default.py", "--num", "6", "--augment",
       "--output", str(out), "--config.data.source=synthetic", "--config.data.image_size=32",
       "--config.data.num_synthetic_train=4"],
      cwd=REPO_ROOT, capture_output=True, text=True, timeout=300, check=False)
  assert result.returncode == 0, result.stderr[-3000:]
  # Every example of the split, once; named apart from the unaugmented images a look without --augment writes.
  assert sorted(p.name for p in out.iterdir()) == [f"train_augmented_{i:03d}.png" for i in range(4)]
