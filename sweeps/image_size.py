"""Input resolution: 128 x 128 (the tutorial) vs 224 x 224 (MobileNetV2's ImageNet resolution).

Metrics are computed at the training resolution (masks resized to it), so they compare how well each model
fits its own label maps; 224 costs about 3x the compute per image.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/image_size.py --workdir runs/image_size
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "grid": {"data.image_size": [128, 224]},
  }
