"""The TensorFlow image-segmentation tutorial, reproduced.

tfds `oxford_iiit_pet`, 128x128, batch 64, 20 epochs, Adam (Keras defaults, lr 1e-3), sparse softmax
cross-entropy from logits, MobileNetV2 alpha 1.0 encoder with ImageNet weights, frozen, random flip.
Every other config starts from this one and changes a few fields.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
  """Returns the tutorial configuration."""
  config = ml_collections.ConfigDict()
  config.seed = 0  # Seeds parameter init, dropout, shuffling and augmentation.

  config.data = data = ml_collections.ConfigDict()
  data.source = "tfds"  # "tfds" | "folder" | "synthetic".
  data.tfds_name = "oxford_iiit_pet:4.*.*"  # Used by source="tfds".
  data.data_dir = ""  # "folder": the extracted official layout; "tfds": tfds data_dir ("" = tfds default).
  data.manual_dir = ""  # "tfds" offline: folder holding images.tar.gz and annotations.tar.gz.
  data.train_split = "train"  # A tfds split spec: "train" (trainval.txt), "test", slices like "train[:80%]".
  data.eval_split = "test"  # Evaluated after each eval_every_epochs; must not overlap train_split.
  data.image_size = 128  # Square side; must be divisible by 32.
  data.input_range = "[-1,1]"  # "[-1,1]" (Keras MobileNetV2 convention) or "[0,1]" (what the tutorial did).
  data.mask_resize = "nearest"  # "nearest" (correct) or "bilinear" (the first tutorial's mistake; ablations).
  data.random_flip = True  # Training only; image and mask flipped together.
  data.random_resized_crop = False  # Training only.
  data.color_jitter = False  # Training only: random brightness/contrast.
  data.shuffle_buffer = 1000  # Examples shuffled among, per epoch (seeded).
  data.cache = True  # Keep decoded, resized examples in memory after the first epoch.
  data.skip_bad_examples = False  # True: skip unreadable/invalid files with a warning instead of failing.
  data.num_synthetic_train = 512  # source="synthetic" only.
  data.num_synthetic_eval = 128  # source="synthetic" only.

  config.model = model = ml_collections.ConfigDict()
  model.num_classes = 3  # 0 = pet, 1 = background, 2 = border.
  model.alpha = 1.0  # MobileNetV2 width multiplier.
  model.encoder_weights = "imagenet"  # "imagenet" | Keras weight file | converted .npz | None.
  model.freeze_encoder = True  # Encoder params and BatchNorm statistics frozen (Keras trainable=False).
  model.decoder_filters = (512, 256, 128, 64)  # The four pix2pix upsample blocks' channels.
  model.dropout = 0.0  # Dropout rate in each upsample block, training only (pix2pix: 0.5; the tutorial: 0).
  model.decoder_bn_momentum = 0.99  # Keras' default; lower (0.9) lets short runs' eval statistics keep up.
  # "fast": matmul/shift convolution formulations on CPU and GPU, plain lax ones elsewhere (TPU); "reference":
  # plain lax everywhere; "explicit": the formulations everywhere. The same function each way (tests).
  model.conv_impl = "fast"
  model.dtype = "float32"  # Compute dtype: "float32" or "bfloat16" (params and loss stay float32).
  # Load parameters and BatchNorm statistics only (not the optimizer) from: a previous run's workdir or its
  # checkpoints/ (the latest checkpoint), its checkpoints_best/ (the best), one step's directory, or a Keras file
  # (.keras, .h5, .weights.h5) of the tutorial U-Net these model settings describe.
  model.init_from = ""

  config.train = train = ml_collections.ConfigDict()
  train.batch_size = 64  # Global batch, split over all local devices.
  train.num_epochs = 20
  train.num_train_steps = -1  # > 0 overrides num_epochs.
  train.learning_rate = 1e-3  # Adam (Keras defaults otherwise: epsilon 1e-7).
  train.lr_schedule = "constant"  # "constant" | "cosine" (to 0 at the end); either after warmup_steps.
  train.warmup_steps = 0  # Linear warmup from 0 over this many steps.
  train.weight_decay = 0.0  # > 0 uses AdamW.
  train.loss = "cross_entropy"  # "cross_entropy" | "cross_entropy+dice" | "focal".
  train.class_weights = ()  # e.g. (0.4, 0.4, 0.2): the tutorial's sample weights ((2, 2, 1) / 5).
  # Parameters whose path matches one of these regexes (each must match one) form the encoder group (big_vision
  # style): frozen while model.freeze_encoder is True (with the BatchNorm layers whose scale and bias they match
  # on running statistics, as Keras' trainable=False), else trained at encoder_lr_multiplier times the rate.
  train.frozen_params = ("encoder/.*",)
  train.unfreeze_after_epochs = -1  # >= 0: fine-tune the encoder from this epoch on.
  train.encoder_lr_multiplier = 1.0  # The group's learning-rate multiplier when trained (unfrozen or never frozen).
  train.eval_every_epochs = 1  # Evaluate eval_split (metrics.jsonl, figure, best checkpoint) every N epochs, and last.
  train.log_every_steps = 10  # TensorBoard train/* means and the progress bar's loss every N steps.
  train.checkpoint_every_steps = 500  # Also at the end, and on SIGINT/SIGTERM.
  train.keep_checkpoints = 3  # Latest checkpoints kept in checkpoints/ (the best is kept apart).
  train.num_figure_examples = 3  # Sample-prediction figure after each evaluation; 0 disables.
  return config
