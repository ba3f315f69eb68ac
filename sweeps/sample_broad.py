"""One-factor-at-a-time ablation of the tutorial recipe on the offline pet sample, sized for a CPU.

The baseline is the tutorial's recipe with the alpha-0.35 ImageNet encoder (frozen, [-1, 1] inputs,
nearest masks, cross-entropy, flips, Adam 1e-3); every other variant changes one thing. 5 epochs of the
285 training pets at batch 8 (35 full batches per epoch, 175 steps), validated on the 71 held-out trainval
pets. Variants are ordered by how much they matter for choosing a recipe, so a sweep cut short still answers
the main questions.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/sample_broad.py --workdir runs/broad
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  common = _common.common(where)
  if where == "sample":
    common.update({"train.num_epochs": 5, "train.batch_size": 8})
  return {
      "seeds": [0],
      "overrides": common,
      "variants": {
          "baseline": {},
          "finetune": {"model.freeze_encoder": False},
          "decoder_half": {"model.decoder_filters": (256, 128, 64, 32)},
          "finetune_enc_lr_0.1": {"model.freeze_encoder": False, "train.encoder_lr_multiplier": 0.1},
          "flip+crop": {"data.random_resized_crop": True},
          "ce+dice": {"train.loss": "cross_entropy+dice"},
          "finetune_cosine": {"model.freeze_encoder": False, "train.lr_schedule": "cosine",
                              "train.warmup_steps": 20},
          "input_0_1": {"data.input_range": "[0,1]"},
          "unfreeze_after_2": {"train.unfreeze_after_epochs": 2},
          "weighted_ce_2_2_1": {"train.class_weights": (2.0, 2.0, 1.0)},
          "bilinear_masks": {"data.mask_resize": "bilinear"},
      },
  }
