"""The recipe the ablation evidence points to (docs/ablations.md), within 3x the tutorial's training compute.

Same model and data as ``configs/default.py``: MobileNetV2 alpha 1.0 encoder with pretrained weights, frozen;
the pix2pix decoder; 128x128; the Oxford-IIIT Pet train split, evaluated on test; Adam 1e-3. What changes:

* batch 16 instead of 64, 54 epochs instead of 20: at most 3x the tutorial's training images (2.72x on the
  full train split, 2.97x on the shared sample's trainval; tests/test_configs.py checks the bound), 4x
  smaller steps;
* a cosine learning-rate decay after 50 warm-up steps instead of a constant rate;
* decoder BatchNorm momentum 0.9 instead of Keras' 0.99, so the running statistics that evaluation uses keep
  up with the weights in a short run;
* random resized crops on top of the flips, and cross-entropy + soft Dice instead of cross-entropy alone.

Why (sweeps/best_search.py, one seed each, alpha 1.0 on the shared sample: 285 trainval pets for training,
the 71 held out for validation, so the test split stayed untouched): final validation mIoU of the tutorial
0.622 (20 epochs); the tutorial trained 3x longer 0.617 (it peaked at 0.684 at epoch 30, then fell: more of
the same recipe is not the answer); batch 16 + cosine + BN momentum 0.9 0.689, already 0.693 after 10
epochs; the same with crops and Dice **0.722**; the same without them but the encoder unfrozen for the last
two thirds (encoder learning rate x0.1) 0.703.

Measured on the shared sample's test split, trained on its trainval (sweeps/best_vs_default.py, README
"Results"): test mIoU **0.740**, pixel accuracy 0.898, against the tutorial's 0.684 and 0.875::

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
    "train.batch_size": 16,
    "train.num_epochs": 54,  # 54 epochs at batch 16 = 2.97x the tutorial's 20 at batch 64 (remainders dropped).
    "train.lr_schedule": "cosine",
    "train.warmup_steps": 50,
    "model.decoder_bn_momentum": 0.9,
    "data.random_resized_crop": True,
    "train.loss": "cross_entropy+dice",
    "train.eval_every_epochs": 6,  # Evaluation does not change training; fewer of them save time.
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
