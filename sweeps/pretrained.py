"""ImageNet-pretrained vs randomly initialized encoder, each frozen and fine-tuned, alpha 0.35.

A frozen random encoder shows how much the decoder alone can do with random features.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/pretrained.py --workdir runs/pretrained
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "variants": {
          "pretrained_frozen": {},
          "pretrained_finetune": {"model.freeze_encoder": False},
          "random_frozen": {"model.encoder_weights": ""},
          "random_finetune": {"model.encoder_weights": "", "model.freeze_encoder": False},
      },
  }
