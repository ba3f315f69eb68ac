"""Input scaling: [-1, 1] (what Keras MobileNetV2 was trained on) vs [0, 1] (what the tutorial fed it).

    python scripts/ablate.py --config configs/default.py --sweep sweeps/input_range.py --workdir runs/input_range
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "grid": {"data.input_range": ["[-1,1]", "[0,1]"]},
  }
