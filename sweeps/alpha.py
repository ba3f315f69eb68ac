"""Encoder width: MobileNetV2 alpha 0.35 vs 1.0 (the tutorial's), each pretrained, frozen and fine-tuned.

Offline, alpha 1.0 loads ../shared/weights' alpha-1.0 file (ImageNet, top blocks fine-tuned on dogs).

    python scripts/ablate.py --config configs/default.py --sweep sweeps/alpha.py --workdir runs/alpha
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  variants = {}
  for alpha in (0.35, 1.0):
    variants[f"alpha_{alpha:g}_frozen"] = _common.encoder(alpha, where)
    variants[f"alpha_{alpha:g}_finetune"] = {**_common.encoder(alpha, where), "model.freeze_encoder": False}
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "variants": variants,
  }
