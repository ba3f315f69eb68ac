"""Tests for petseg_jax.plots."""

import numpy as np
from PIL import Image
import pytest

from petseg_jax import plots


def _read_png(path):
  assert path.is_file() and path.stat().st_size > 0
  with Image.open(path) as img:
    assert img.format == "PNG"
    return np.asarray(img.convert("RGB"))


def _batch(n=2, size=32, seed=0):
  rng = np.random.default_rng(seed)
  images = rng.uniform(-1, 1, (n, size, size, 3)).astype(np.float32)
  masks = rng.integers(0, 3, (n, size, size)).astype(np.int32)
  return images, masks


def test_prediction_triplets_size_and_colours(tmp_path):
  images, masks = _batch()
  masks[0] = 0  # Row 0's true mask is all "pet": its panel centre must be the pet colour.
  logits = np.eye(3, dtype=np.float32)[masks] * 4.0
  logits[0] = np.eye(3, dtype=np.float32)[2] * 4.0  # Row 0 predicted all "border": the third panel shows it.
  path = plots.save_prediction_triplets(images, masks[..., None], logits, tmp_path / "sub" / "triplets.png")
  pixels = _read_png(path)
  # 3 panels x 2 rows of 3 inches at 100 dpi, plus 0.4 inch for the legend.
  assert pixels.shape == (2 * 300 + 40, 3 * 300, 3)
  assert pixels.std() > 10  # Not blank.
  true_centre = pixels[165:175, 445:455].reshape(-1, 3)  # Row 0, column 1 (true mask).
  np.testing.assert_array_equal(true_centre, np.broadcast_to(plots.PALETTE[0], true_centre.shape))
  predicted_centre = pixels[165:175, 745:755].reshape(-1, 3)  # Row 0, column 2 (the logits' argmax).
  np.testing.assert_array_equal(predicted_centre, np.broadcast_to(plots.PALETTE[2], predicted_centre.shape))


def test_model_inputs_are_shown_as_the_pixels_they_came_from():
  np.testing.assert_array_equal(
      plots._images_to_uint8(np.array([-1.0, 0.0, 1.0], np.float32), "[-1,1]"), [0, 128, 255])
  np.testing.assert_array_equal(
      plots._images_to_uint8(np.array([0.0, 0.5, 1.0], np.float32), "[0,1]"), [0, 128, 255])


def test_prediction_triplets_optional_panels_and_errors(tmp_path):
  images, masks = _batch(n=1)
  uint8_images = ((images + 1) * 127.5).astype(np.uint8)
  path = plots.save_prediction_triplets(uint8_images, masks, None, tmp_path / "data.png", dpi=50)
  assert _read_png(path).shape == (150 + 20, 2 * 150, 3)
  with pytest.raises(ValueError, match="input_range"):
    plots.save_prediction_triplets(images, masks, masks, tmp_path / "x.png", input_range="[0,255]")
  with pytest.raises(ValueError, match="do not match images"):
    plots.save_prediction_triplets(images, masks[:, :16], masks, tmp_path / "x.png")
  with pytest.raises(ValueError, match="class ids must be in"):
    plots.save_prediction_triplets(images, masks + 1, masks, tmp_path / "x.png")


def _recorded(monkeypatch, method: str) -> list[str]:
  """The first arguments of every ``matplotlib.axes.Axes.<method>`` call from now on (the call still runs)."""
  from matplotlib.axes import Axes  # pylint: disable=g-import-not-at-top
  calls, original = [], getattr(Axes, method)

  def record(self, *args, **kwargs):
    calls.append(args[2] if method == "text" else args[0])
    return original(self, *args, **kwargs)

  monkeypatch.setattr(Axes, method, record)
  return calls


def test_training_curves(tmp_path, monkeypatch):
  history = [
      {"epoch": 1, "step": 10, "train_loss": 0.9, "eval_loss": 0.8, "eval_miou": 0.4,
       "eval_pixel_accuracy": 0.7},
      {"epoch": 2, "step": 20, "train_loss": 0.6},  # No evaluation this epoch.
      {"epoch": 3, "step": 30, "train_loss": 0.5, "eval_loss": 0.55, "eval_miou": 0.55,
       "eval_pixel_accuracy": 0.8, "eval_dice": 0.7},
  ]
  pixels = _read_png(plots.save_training_curves(history, tmp_path / "curves.png"))
  assert pixels.shape == (450, 1200, 3)
  assert pixels.std() > 10
  # Without "epoch" in every row the x axis is the step.
  labels = _recorded(monkeypatch, "set_xlabel")
  pixels = _read_png(plots.save_training_curves([{"step": 5, "train_loss": 1.0}], tmp_path / "steps.png"))
  assert pixels.shape == (450, 1200, 3)
  assert labels and set(labels) == {"Step"}, labels
  # Named by the split it evaluated on (the tutorial's configs evaluate on "test"), else "Validation".
  titles = _recorded(monkeypatch, "set_title")
  plots.save_training_curves(history, tmp_path / "test.png", eval_split="test")
  plots.save_training_curves(history, tmp_path / "validation.png")
  assert titles == ["Training and Eval (test) Loss", "Eval (test) metrics", "Training and Validation Loss",
                    "Validation metrics"], titles
  with pytest.raises(ValueError, match="empty"):
    plots.save_training_curves([], tmp_path / "x.png")
  with pytest.raises(ValueError, match="no row has any"):
    plots.save_training_curves([{"epoch": 1, "lr": 0.1}], tmp_path / "x.png")


def test_confusion_matrix_figure(tmp_path, monkeypatch):
  cm = np.array([[50, 3, 1], [2, 80, 5], [0, 0, 0]])  # Last row empty: shown as 0, not NaN.
  for normalize in (True, False):
    texts = _recorded(monkeypatch, "text")
    pixels = _read_png(plots.save_confusion_matrix(cm, tmp_path / f"cm_{normalize}.png", normalize=normalize))
    assert pixels.shape == (500, 550, 3)
    assert pixels.std() > 10
    # Cells row by row: fractions of the row (with the count) or the counts.
    expected = ([f"{f:.3f}\n({c})" for f, c in zip([50 / 54, 3 / 54, 1 / 54, 2 / 87, 80 / 87, 5 / 87, 0, 0, 0],
                                                    cm.ravel())] if normalize else [str(c) for c in cm.ravel()])
    assert texts == expected, texts
    monkeypatch.undo()
  with pytest.raises(ValueError, match="does not match"):
    plots.save_confusion_matrix(np.ones((2, 2)), tmp_path / "x.png")


def test_overlay_and_colorize():
  rng = np.random.default_rng(1)
  image = rng.integers(0, 256, (8, 10, 3)).astype(np.uint8)
  mask = rng.integers(0, 3, (8, 10)).astype(np.int32)
  colors = plots.colorize_mask(mask)
  assert colors.shape == (8, 10, 3) and colors.dtype == np.uint8
  np.testing.assert_array_equal(colors, plots.PALETTE[mask])

  out = plots.overlay(image, mask, alpha=0.5)
  assert out.shape == image.shape and out.dtype == np.uint8
  expected = np.round(0.5 * image.astype(np.float64) + 0.5 * colors.astype(np.float64))
  assert np.abs(out.astype(np.float64) - expected).max() <= 1
  np.testing.assert_array_equal(plots.overlay(image, mask, alpha=0.0), image)
  np.testing.assert_array_equal(plots.overlay(image, mask, alpha=1.0), colors)
  # Batched.
  assert plots.overlay(np.stack([image, image]), np.stack([mask, mask])).shape == (2, 8, 10, 3)

  with pytest.raises(ValueError, match="does not match image"):
    plots.overlay(image, mask[:4])
  with pytest.raises(ValueError, match="uint8 RGB"):
    plots.overlay(image.astype(np.float32), mask)
  with pytest.raises(ValueError, match="shifted to 0..2"):
    plots.colorize_mask(mask + 1)
  with pytest.raises(ValueError, match="integer class ids"):
    plots.colorize_mask(mask.astype(np.float32))
