"""Augmentation: none vs random flip (the tutorial) vs flip + random resized crop.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/augmentation.py --workdir runs/augment
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "variants": {
          "none": {"data.random_flip": False},
          "flip": {},
          "flip+crop": {"data.random_resized_crop": True},
      },
  }
