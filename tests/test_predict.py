"""scripts/predict.py: masks at the original size, overlays, triplets for Oxford-layout images, bad files."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image
import pytest

from petseg_jax import inference
from petseg_jax import input_pipeline
from petseg_jax import prediction
from tests import trained_run


@pytest.fixture(scope="session")
def workdir(workers_temp_dir):
  return trained_run.trained_workdir(workers_temp_dir)


def _random_image(rng, height, width, mode="RGB") -> Image.Image:
  return Image.fromarray(rng.integers(0, 256, (height, width, 3), np.uint8)).convert(mode)


@pytest.fixture
def inputs(tmp_path) -> dict[str, Path]:
  """An Oxford-layout folder (a JPEG and a GIF named .jpg, with trimaps) and a loose folder with a PNG, a
  BMP, a zero-byte .jpg and a text file named .jpg."""
  rng = np.random.default_rng(0)
  root = tmp_path / "oxford"
  (root / "images").mkdir(parents=True)
  (root / "annotations" / "trimaps").mkdir(parents=True)
  for name, size, fmt in (("cat_1", (50, 70), "JPEG"), ("dog_2", (29, 41), "GIF")):
    _random_image(rng, *size).save(root / "images" / f"{name}.jpg", format=fmt)
    trimap = rng.integers(1, 4, size, np.uint8)
    Image.fromarray(trimap, mode="L").save(root / "annotations" / "trimaps" / f"{name}.png")
  loose = tmp_path / "loose"
  loose.mkdir()
  _random_image(rng, 45, 33, "RGBA").save(loose / "odd.png")
  _random_image(rng, 32, 32, "L").save(loose / "gray.bmp")
  (loose / "zero.jpg").write_bytes(b"")
  (loose / "text.jpg").write_text("this is not an image\n")
  return {"oxford": root, "loose": loose}


def test_predict_outputs_and_bad_files(workdir, inputs, tmp_path):
  out, single = tmp_path / "out", tmp_path / "single"
  mixed, alone, uncreatable = trained_run.run_scripts(
      ("predict.py", "--workdir", workdir, "--output", out, "--checkpoint", "best", "--batch_size", 3,
       inputs["oxford"] / "images", inputs["loose"]),
      ("predict.py", "--workdir", workdir, "--output", single, inputs["loose"] / "odd.png"),
      ("predict.py", "--workdir", workdir, "--output", "/proc/petseg_out", inputs["loose"] / "odd.png"))
  # An output folder that cannot be made (here: in /proc) is named with its flag.
  assert uncreatable.returncode == 1 and "Traceback" not in uncreatable.stderr
  assert "--output /proc/petseg_out: cannot create it" in uncreatable.stderr, uncreatable.stderr[-2000:]

  # Bad files are reported by name and make the exit code 1; the good files still get their outputs.
  assert mixed.returncode == 1, mixed.stderr
  assert "Traceback" not in mixed.stderr
  assert "zero.jpg" in mixed.stderr and "empty" in mixed.stderr
  assert "text.jpg" in mixed.stderr and "not an image" in mixed.stderr
  originals = {"cat_1": inputs["oxford"] / "images" / "cat_1.jpg",
               "dog_2": inputs["oxford"] / "images" / "dog_2.jpg",
               "odd": inputs["loose"] / "odd.png", "gray": inputs["loose"] / "gray.bmp"}
  for name, path in originals.items():
    with Image.open(path) as image:
      size = image.size
    mask = Image.open(out / f"{name}_mask.png")
    assert mask.mode == "L" and mask.size == size, name  # One byte per pixel, the original size.
    assert set(np.unique(np.asarray(mask))) <= {0, 1, 2}, name
    assert Image.open(out / f"{name}_overlay.png").size == size, name
    # The three-panel figure only where the trimap is known (Oxford layout).
    assert (out / f"{name}_triplet.png").exists() == (name in ("cat_1", "dog_2")), name
  assert not list(out.glob("zero*")) and not list(out.glob("text*"))

  # All files good: exit code 0; the mask does not depend on the batch it was predicted in.
  assert alone.returncode == 0, alone.stderr
  np.testing.assert_array_equal(np.asarray(Image.open(single / "odd_mask.png")),
                                np.asarray(Image.open(out / "odd_mask.png")))


def test_masks_are_the_models_prediction_resized_back(workdir, inputs, tmp_path):
  """The written mask is the model's prediction on the eval-preprocessed image, resized back (nearest)."""
  config = inference.load_run_config(workdir)
  model, variables, _ = inference.restore_model(config, workdir, "latest")
  path = inputs["oxford"] / "images" / "cat_1.jpg"
  report = inference.predict_files(config, model, variables, [path], tmp_path, batch_size=2)
  assert not report.failures and len(report.outputs[str(path)]) == 3
  image = input_pipeline.load_image(path)
  expected = prediction.predict(model, variables, input_pipeline.preprocess_images([image], config.data))[0]
  expected = inference.resize_mask(expected, *image.shape[:2])
  np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "cat_1_mask.png")), expected)


def test_resize_mask_is_nearest_neighbour():
  """Classes are labels, not intensities: a 0 next to a 2 never becomes a 1 (the test above resizes its
  expected mask with resize_mask itself)."""
  mask = np.array([[0, 2], [1, 0]], np.int32)
  np.testing.assert_array_equal(inference.resize_mask(mask, 4, 6), np.repeat(np.repeat(mask, 2, 0), 3, 1))
  stripes = np.tile(np.array([0, 2], np.uint8), (5, 8))  # 5 x 16, alternating columns.
  smaller = inference.resize_mask(stripes, 5, 7)
  assert smaller.shape == (5, 7) and set(np.unique(smaller)) <= {0, 2}


def test_a_photo_with_an_exif_orientation_is_predicted_upright(workdir, inputs, tmp_path):
  """A sideways-stored photo (EXIF orientation 6: viewers turn it 90° clockwise) is predicted as viewers show
  it, its trimap turned alike for the triplet; --noupright (upright=False) predicts the stored pixels."""
  from petseg_jax.data import decode  # pylint: disable=g-import-not-at-top
  config = inference.load_run_config(workdir)
  model, variables, _ = inference.restore_model(config, workdir, "latest")
  root = inputs["oxford"]
  stored = root / "images" / "cat_1.jpg"
  with Image.open(stored) as image:
    exif = image.getexif()
    exif[decode.EXIF_ORIENTATION_TAG] = 6
    image.save(root / "images" / "sideways.jpg", exif=exif, quality=95)
  (root / "annotations" / "trimaps" / "sideways.png").write_bytes(
      (root / "annotations" / "trimaps" / "cat_1.png").read_bytes())
  path = root / "images" / "sideways.jpg"
  assert decode.exif_orientation(path) == 6 and decode.exif_orientation(stored) == 1
  pixels = input_pipeline.load_image(path)  # The stored grid: 50 rows, 70 columns.
  upright = decode.turn_upright(pixels, 6)
  np.testing.assert_array_equal(upright, np.rot90(pixels, k=-1))  # 90° clockwise: 70 rows, 50 columns.
  for turn, image, out in ((True, upright, tmp_path / "upright"), (False, pixels, tmp_path / "stored")):
    report = inference.predict_files(config, model, variables, [path], out, batch_size=2, upright=turn)
    assert report.turned == ({str(path): 6} if turn else {}) and not report.warnings
    expected = prediction.predict(model, variables, input_pipeline.preprocess_images([image], config.data))[0]
    expected = inference.resize_mask(expected, *image.shape[:2])
    np.testing.assert_array_equal(np.asarray(Image.open(out / "sideways_mask.png")), expected)
    assert (out / "sideways_triplet.png").exists()  # The trimap turned alike: its size fits.
  trimap = decode.load_trimap(root / "annotations" / "trimaps" / "sideways.png")
  assert decode.turn_upright(trimap, 6).shape == (70, 50)


def test_expand_inputs_and_output_names(tmp_path):
  (tmp_path / "a.png").write_bytes(b"x")
  (tmp_path / "a.jpg").write_bytes(b"x")
  (tmp_path / "notes.txt").write_text("skip me")
  (tmp_path / "empty").mkdir()
  files, problems = inference.expand_inputs([tmp_path, tmp_path / "a.png", tmp_path / "empty",
                                             tmp_path / "gone.jpg"])
  assert files == [tmp_path / "a.jpg", tmp_path / "a.png"]  # Folder expanded, sorted, no repeats.
  assert [p for p, _ in problems] == [str(tmp_path / "empty"), str(tmp_path / "gone.jpg")]
  assert inference._unique_names(files) == ["a", "a_png"]
  assert inference.trimap_path(tmp_path / "a.png") is None
