"""Frozen encoder (the tutorial) vs fine-tuned from the start vs unfrozen halfway, alpha 0.35.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/freeze.py --workdir runs/freeze
    python scripts/ablate.py --config configs/default.py --sweep sweeps/freeze.py:tfds --workdir runs/freeze_tfds
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  common = _common.common(where)
  half = common["train.num_epochs"] // 2
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": common,
      "variants": {
          "frozen": {},
          "finetune": {"model.freeze_encoder": False},
          "finetune_enc_lr_0.1": {"model.freeze_encoder": False, "train.encoder_lr_multiplier": 0.1},
          f"unfreeze_after_{half}": {"train.unfreeze_after_epochs": half},
      },
  }
