"""Decoder width: the tutorial's pix2pix upsampling filters (512, 256, 128, 64) vs half and a quarter.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/decoder_width.py --workdir runs/decoder
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "grid": {"model.decoder_filters": [(512, 256, 128, 64), (256, 128, 64, 32), (128, 64, 32, 16)]},
  }
