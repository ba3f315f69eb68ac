"""Frozen encoder (the tutorial) vs fine-tuned from the start vs unfrozen halfway vs its first blocks frozen
(the rest fine-tuned), alpha 0.35.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/freeze.py --workdir runs/freeze
    python scripts/ablate.py --config configs/default.py --sweep sweeps/freeze.py:tfds --workdir runs/freeze_tfds
"""

from sweeps import _common

FIRST_BLOCKS = ("encoder/(Conv1|bn_Conv1|expanded_conv_.*|block_[1-3]_.*)/.*",)


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
          # Conv1 to block 3 frozen (the layers of the first two taps, and block 3's stride-8 depthwise and
          # projection), BatchNorm included; blocks 4-16 train.
          "frozen_to_block_3": {"train.frozen_params": FIRST_BLOCKS},
      },
  }
