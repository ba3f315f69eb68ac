"""The recipe the ablation evidence points to (docs/ablations.md): the tutorial's recipe, trained 3x longer.

Same model and data as ``configs/default.py``: MobileNetV2 alpha 1.0 encoder with pretrained weights,
frozen; the pix2pix decoder; 128x128; the Oxford-IIIT Pet train split, evaluated on test; Adam 1e-3,
cross-entropy, random flips, batch 64. Only the length changes: 60 epochs instead of 20, exactly 3x the
tutorial's training compute (a frozen encoder costs the same per image; nothing else changed).

Why (measured on the shared sample, one seed each, CPU; see docs/ablations.md):

* Fine-tuning the encoder did not pay at these lengths: alpha 0.35, 175 steps: frozen 0.579 vs fine-tuned
  0.562 validation mIoU; alpha 1.0 on the test split: fine-tuned, batch 16, cosine, 12 epochs (264 steps,
  about 0.7x the tutorial's compute) reached 0.658, the frozen tutorial recipe 0.684.
* The tutorial recipe is under-trained rather than over-fitted: its test mIoU only started to climb
  after ~35 steps (evaluation-mode BatchNorm statistics lagging the weights: 0.28 -> 0.19 over epochs 1-3
  while training mIoU rose), rose from 0.58 to 0.69 over epochs 12-18 and ended at 0.684 (0.692 at
  epoch 19) with the training loss still falling (0.23 -> 0.20 over the last 4 epochs). More steps is the
  one change the evidence supports; how much 3x buys is not measured.

NOT YET MEASURED: this exact configuration has not been trained (each alpha-1.0 run took about an hour
on the shared 2-core CPU). Measure it against the tutorial with::

    python scripts/ablate.py --config configs/default.py --sweep sweeps/best_vs_default.py \\
      --workdir runs/best_vs_default

Offline, on the shared sample, with the shared alpha-1.0 Keras weights, by hand::

    python scripts/train.py --config configs/best.py --workdir runs/best \\
      --config.data.source=folder --config.data.data_dir=../shared/data/oxford_iiit_pet_sample \\
      --config.model.encoder_weights=../shared/weights/mobilenet_v2_1.0_160_no_top_imagenet_dogs_finetuned.h5
"""

import ml_collections

from configs import default
from petseg_jax import ablation

# What differs from the tutorial (configs/default.py); sweeps/best_vs_default.py compares the two.
OVERRIDES = {
    "train.num_epochs": 60,  # 3x the tutorial's 20: its curve was still rising steeply at epoch 20.
    "train.eval_every_epochs": 5,  # Evaluation does not change training; fewer of them save time.
}

# The first recipe tried (measured: 0.658 test mIoU on the shared sample vs the tutorial's 0.684; kept so
# that its run stays reproducible from sweeps/best_vs_default.py).
FINETUNE_12_EPOCHS = {
    "model.freeze_encoder": False,
    "train.batch_size": 16,
    "train.num_epochs": 12,
    "train.lr_schedule": "cosine",
    "train.warmup_steps": 20,
    "train.eval_every_epochs": 3,
}


def get_config() -> ml_collections.ConfigDict:
  """Returns the recommended configuration."""
  return ablation.apply_overrides(default.get_config(), OVERRIDES, "configs/best.py")
