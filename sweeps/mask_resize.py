"""Mask resizing: nearest neighbour (labels stay labels) vs bilinear (the first tutorial's mistake).

Bilinear interpolation blends the label ids at boundaries and rounds the blend to an id, so e.g. pixels
between pet (0) and border (2) become background (1): the training targets get wrong thin rims.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/mask_resize.py --workdir runs/mask_resize
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "grid": {"data.mask_resize": ["nearest", "bilinear"]},
  }
