"""Procedurally drawn "pets": textured blobs on a textured background, with Oxford-style trimaps.

Each example is a pure function of (seed, index, size), drawn with NumPy in well under a millisecond at
128x128, so any number of examples costs no files and little time (it is used for benchmarks and tests).

The task is learnable on purpose, even by a small frozen-encoder model in ~100 steps:
  * pet: a union of 2-4 ellipses (body, head, ears/tail) in a warm colour (red > blue) with a spotty texture;
  * background: a cool colour (blue > red) with stripes and smooth noise;
  * border: a dark outline band of ~5 px (at 128 px) around the pet's boundary, like the "not classified"
    band of the real trimaps.
Textures scale brightness only, so the colour rule "dark -> border, else red > blue -> pet" recovers the mask
from the image almost exactly (`mask_from_image`, used by tests to check image/mask alignment).
"""

from __future__ import annotations

import numpy as np

# Trimap values, as in the Oxford-IIIT Pet annotations.
PET, BACKGROUND, BORDER = 1, 2, 3

# Seeds of the synthetic splits: the test split is drawn from a different stream than the training split.
SPLIT_SEEDS = {"train": 0, "test": 1}

_DARK = 0.25  # Border pixels are darker than this in every channel; pets and background are brighter.


def _smooth_noise(rng: np.random.Generator, size: int, cells: int) -> np.ndarray:
  """Smooth noise in [-1, 1] of shape (size, size): a random cells x cells grid, bilinearly upsampled."""
  grid = rng.uniform(-1.0, 1.0, (cells, cells)).astype(np.float32)
  pos = np.linspace(0.0, cells - 1.0, size, dtype=np.float32)
  i0 = np.minimum(pos.astype(np.int32), cells - 2)
  f = pos - i0
  rows = grid[i0] * (1 - f)[:, None] + grid[i0 + 1] * f[:, None]  # (size, cells)
  return rows[:, i0] * (1 - f)[None, :] + rows[:, i0 + 1] * f[None, :]


def _ellipse_distance(x: np.ndarray, y: np.ndarray, cx: float, cy: float, a: float, b: float,
                      theta: float) -> np.ndarray:
  """Approximate signed distance (in the units of x, y) to an ellipse's outline; negative inside."""
  c, s = float(np.cos(theta)), float(np.sin(theta))
  u = ((x - cx) * c + (y - cy) * s) / a
  v = (-(x - cx) * s + (y - cy) * c) / b
  return (np.sqrt(u * u + v * v) - 1.0) * min(a, b)


def render_example(seed: int, index: int, size: int) -> tuple[np.ndarray, np.ndarray]:
  """Draws synthetic example `index` of the stream `seed`.

  Args:
    seed: stream seed (e.g. SPLIT_SEEDS[split]).
    index: example number (>= 0).
    size: side of the square image in pixels.

  Returns:
    image uint8 (size, size, 3) RGB, trimap uint8 (size, size) with 1 pet, 2 background, 3 border.
  """
  rng = np.random.default_rng([int(seed) & 0xFFFFFFFF, int(index)])
  coords = (np.arange(size, dtype=np.float32) + 0.5) / size
  y, x = coords[:, None], coords[None, :]

  # Pet shape: a body, a head on its long axis, and 0-2 small ears/tail; placed off-centre so it is asymmetric.
  u = lambda lo, hi: float(rng.uniform(lo, hi))  # Python floats keep the arrays float32.
  cx, cy = u(0.35, 0.65), u(0.35, 0.65)
  a, b = u(0.25, 0.36), u(0.17, 0.26)
  theta = u(0, np.pi)
  dist = _ellipse_distance(x, y, cx, cy, a, b, theta)
  direction = theta + (np.pi if rng.random() < 0.5 else 0.0) + u(-0.6, 0.6)
  hr = u(0.11, 0.17)
  hx, hy = cx + 0.85 * a * np.cos(direction), cy + 0.85 * a * np.sin(direction)
  dist = np.minimum(dist, _ellipse_distance(x, y, hx, hy, hr, hr * u(0.75, 1.0), u(0, np.pi)))
  for _ in range(int(rng.integers(0, 3))):
    ang = u(0, 2 * np.pi)
    px, py = hx + hr * np.cos(ang), hy + hr * np.sin(ang)
    dist = np.minimum(dist, _ellipse_distance(x, y, px, py, u(0.03, 0.06), u(0.015, 0.03), ang))
  dist_px = dist * size
  half_band = max(1.0, size / 50.0)
  trimap = np.full((size, size), BACKGROUND, np.uint8)
  trimap[dist_px < -half_band] = PET
  trimap[np.abs(dist_px) <= half_band] = BORDER

  # Background: cool colour (blue > red), stripes and smooth noise modulate brightness only.
  bg_color = rng.uniform([0.05, 0.30, 0.55], [0.30, 0.70, 0.90]).astype(np.float32)
  freq, phase, angle = u(5, 14), u(0, 2 * np.pi), u(0, np.pi)
  stripes = np.sin(2 * np.pi * freq * (x * float(np.cos(angle)) + y * float(np.sin(angle))) + phase)
  bg_shade = 1.0 + 0.10 * stripes + 0.10 * _smooth_noise(rng, size, 4)
  # Pet: warm colour (red > blue) with dark spots and fine noise.
  pet_color = rng.uniform([0.70, 0.30, 0.00], [1.00, 0.60, 0.25]).astype(np.float32)
  spots = _smooth_noise(rng, size, 12)
  pet_shade = 0.95 - 0.20 * (spots > 0.5) + 0.05 * _smooth_noise(rng, size, 24)

  image = np.where((trimap == PET)[..., None], pet_color * pet_shade[..., None], bg_color * bg_shade[..., None])
  outline = u(0.04, 0.12)
  image[trimap == BORDER] = outline
  image += 0.02 * rng.standard_normal(image.shape, dtype=np.float32)
  image = np.clip(np.round(image * 255.0), 0, 255).astype(np.uint8)
  return image, trimap


def mask_from_image(image: np.ndarray) -> np.ndarray:
  """Recovers the trimap of a synthetic image from colours alone (dark -> border, red > blue -> pet).

  Works on uint8 (..., 3) images; agrees with the drawn trimap on ~all pixels (tests use it to check that
  augmentations keep image and mask aligned).
  """
  img = image.astype(np.int32)
  trimap = np.where(img[..., 0] > img[..., 2], PET, BACKGROUND).astype(np.uint8)
  trimap[img.max(axis=-1) < int(_DARK * 255)] = BORDER
  return trimap


def generate(num: int, size: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
  """Draws examples 0..num-1 of stream `seed`: images uint8 (num, S, S, 3), trimaps uint8 (num, S, S)."""
  images = np.empty((num, size, size, 3), np.uint8)
  trimaps = np.empty((num, size, size), np.uint8)
  for i in range(num):
    images[i], trimaps[i] = render_example(seed, i, size)
  return images, trimaps
