"""The Flax model equals the Keras tutorial model: layers, encoder taps, whole U-Net, real weights."""

from __future__ import annotations

import functools
import os
import zipfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from petseg_jax import weights
from petseg_jax.models import TAP_NAMES, MobileNetV2Encoder, UNet
from petseg_jax.models.layers import ConvTranspose3x3s2, DepthwiseConv3x3

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
WEIGHTS_035 = SHARED / "weights" / "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_0.35_224_no_top.h5"
WEIGHTS_100 = SHARED / "weights" / "mobilenet_v2_1.0_160_no_top_imagenet_dogs_finetuned.h5"
PETS = SHARED / "data" / "oxford_iiit_pet_sample" / "images"


def relative_error(a, b) -> float:
  a = np.asarray(a, np.float64)
  b = np.asarray(b, np.float64)
  return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


def _random(shape, seed=0):
  return np.random.default_rng(seed).uniform(-1, 1, shape).astype(np.float32)


def _random_variables(module, image_shape, seed=0):
  """Random NumPy values in the shapes of ``module.init``'s variables (an eager init dispatches op by op,
  ~30 s for a U-Net)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), jnp.zeros(image_shape))
  leaves, treedef = jax.tree.flatten(shapes)
  return jax.tree.unflatten(treedef, [_random(leaf.shape, seed + i) for i, leaf in enumerate(leaves)])


# ----------------------------------------------------------------------------- fast == reference layers


@pytest.mark.parametrize("stride,padding,size", [(1, "same", 16), (2, "valid", 17), (1, "same", 7)])
def test_depthwise_fast_equals_reference_forward_and_grads(stride, padding, size):
  x = _random((2, size, size, 8))
  fast = DepthwiseConv3x3(strides=stride, padding=padding, impl="fast")
  ref = DepthwiseConv3x3(strides=stride, padding=padding, impl="reference")
  variables = fast.init(jax.random.key(0), x)
  np.testing.assert_allclose(fast.apply(variables, x), ref.apply(variables, x), atol=1e-5)

  def loss(module, v, x):
    return jnp.sum(jnp.sin(module.apply(v, x)))

  g_fast = jax.grad(lambda v, x: loss(fast, v, x), argnums=(0, 1))(variables, x)
  g_ref = jax.grad(lambda v, x: loss(ref, v, x), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    assert relative_error(a, b) < 1e-5


@pytest.mark.parametrize("use_bias", [False, True])
def test_conv_transpose_fast_equals_reference_forward_and_grads(use_bias):
  x = _random((2, 5, 6, 7))
  fast = ConvTranspose3x3s2(4, use_bias=use_bias, impl="fast", bias_init=jax.nn.initializers.normal(1.0))
  ref = ConvTranspose3x3s2(4, use_bias=use_bias, impl="reference")
  variables = fast.init(jax.random.key(1), x)
  y = fast.apply(variables, x)
  assert y.shape == (2, 10, 12, 4)
  np.testing.assert_allclose(y, ref.apply(variables, x), atol=1e-5)
  g_fast = jax.grad(lambda v, x: jnp.sum(jnp.sin(fast.apply(v, x))), argnums=(0, 1))(variables, x)
  g_ref = jax.grad(lambda v, x: jnp.sum(jnp.sin(ref.apply(v, x))), argnums=(0, 1))(variables, x)
  for a, b in zip(jax.tree.leaves(g_fast), jax.tree.leaves(g_ref)):
    assert relative_error(a, b) < 1e-5


def test_layers_equal_keras_layers():
  keras = pytest.importorskip("keras")
  x = _random((2, 8, 8, 6), seed=3)
  k_dw = keras.layers.DepthwiseConv2D(3, strides=1, padding="same", use_bias=False)
  k_dw.build(x.shape)
  k_kernel = _random((3, 3, 6, 1), seed=4)
  k_dw.set_weights([k_kernel])
  ours = DepthwiseConv3x3()
  y = ours.apply({"params": {"kernel": k_kernel.transpose(0, 1, 3, 2)}}, x)
  assert relative_error(y, k_dw(x)) < 1e-5

  k_ct = keras.layers.Conv2DTranspose(5, 3, strides=2, padding="same", use_bias=True)
  k_ct.build(x.shape)
  kernel, bias = _random((3, 3, 5, 6), seed=5), _random((5,), seed=6)
  k_ct.set_weights([kernel, bias])
  for impl in ("fast", "reference"):
    y = ConvTranspose3x3s2(5, use_bias=True, impl=impl).apply(
        {"params": {"kernel": kernel.transpose(0, 1, 3, 2), "bias": bias}}, x)
    assert relative_error(y, k_ct(x)) < 1e-5, impl


# ----------------------------------------------------------------------------- encoder == Keras MobileNetV2


@pytest.mark.parametrize("alpha,size", [(0.35, 96), (1.0, 128), (1.4, 160), (0.35, 160), (1.0, 96)])
def test_encoder_equals_keras_random_weights(alpha, size):
  pytest.importorskip("keras")
  from tests.keras_reference import keras_encoder, randomize_keras_weights

  base, taps_model = keras_encoder(alpha, size)
  randomize_keras_weights(base, seed=int(alpha * 100) + size)
  x = _random((2, size, size, 3), seed=size)
  expected = taps_model(x, training=False)
  variables = weights.encoder_variables_from_keras(base, alpha)
  taps = jax.jit(lambda v, x: MobileNetV2Encoder(alpha).apply(v, x))(variables, x)
  assert set(taps) == set(TAP_NAMES)
  for name, want in zip(TAP_NAMES, expected):
    assert taps[name].shape == tuple(want.shape), name
    assert relative_error(taps[name], want) < 1e-4, name


def test_encoder_batch_norms_frozen_by_name_equal_keras_non_trainable_layers():
  """Training mode with some BatchNorm layers ``trainable=False`` in Keras: those normalize with their moving
  statistics and keep them, the others use the batch's and update theirs; ours the same by name."""
  pytest.importorskip("keras")
  from tests.keras_reference import keras_encoder, randomize_keras_weights

  alpha, size = 0.35, 96
  frozen = ("bn_Conv1", "expanded_conv_depthwise_BN", "block_2_project_BN", "block_16_depthwise_BN")
  base, taps_model = keras_encoder(alpha, size)
  randomize_keras_weights(base, seed=5)
  variables = weights.encoder_variables_from_keras(base, alpha)
  for name in frozen:
    base.get_layer(name).trainable = False
  x = _random((4, size, size, 3), seed=6)
  expected = taps_model(x, training=True)
  encoder = MobileNetV2Encoder(alpha)
  taps, updates = jax.jit(lambda v, x: encoder.apply(v, x, train=True, frozen_batch_norms=frozen,
                                                     mutable=["batch_stats"]))(variables, x)
  for name, want in zip(TAP_NAMES, expected):
    assert relative_error(taps[name], want) < 1e-4, name
  before, after = variables["batch_stats"], updates["batch_stats"]
  for name in before:
    moved = not np.array_equal(before[name]["mean"], after[name]["mean"])
    assert moved == (name not in frozen), name
    keras_moved = not np.allclose(base.get_layer(name).moving_mean.numpy(), before[name]["mean"])
    assert keras_moved == moved, name
  # Every layer frozen by name is the frozen encoder.
  all_frozen = encoder.apply(variables, x, train=True, frozen_batch_norms=tuple(before), mutable=["batch_stats"])
  for name, tap in encoder.apply(variables, x).items():
    assert relative_error(all_frozen[0][name], tap) < 1e-5, name
  with pytest.raises(ValueError, match=r"frozen_batch_norms: \['block_1_BN'\] are not BatchNorm layers of the "
                                       r"encoder \(they are 'bn_Conv1', 'expanded_conv_depthwise_BN', \.\.\."):
    jax.eval_shape(lambda: encoder.apply(variables, x, train=True, frozen_batch_norms=("block_1_BN",),
                                         mutable=["batch_stats"]))


@pytest.mark.parametrize("path,message", [
    ("bn_Conv1", r"'bn_Conv1' is not an 'encoder/\.\.\.' or 'decoder/\.\.\.' layer path"),
    ("encoder/block_1_expand", r"\['block_1_expand'\] are not BatchNorm layers of the encoder"),
    ("decoder/up_4/bn", r"\['up_4/bn'\] are not BatchNorm layers of the decoder \(they are \['up_0/bn', "),
])
def test_unet_frozen_batch_norms_that_name_no_batch_norm_are_refused(path, message):
  model = UNet(alpha=0.35, decoder_filters=(16, 16, 8, 8))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  with pytest.raises(ValueError, match=message):
    jax.eval_shape(lambda v: model.apply(v, jnp.zeros((1, 32, 32, 3)), train=True, frozen_batch_norms=(path,),
                                         mutable=["batch_stats"]), variables)


def test_tap_resolutions_at_128():
  model = MobileNetV2Encoder(1.0)
  shapes = jax.eval_shape(lambda: model.init_with_output(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))[0]
  assert [shapes[n].shape[1] for n in TAP_NAMES] == [64, 32, 16, 8, 4]
  assert [shapes[n].shape[-1] for n in TAP_NAMES] == [96, 144, 192, 576, 320]


def test_input_size_not_divisible_by_32_is_a_clear_error():
  with pytest.raises(ValueError, match="divisible by 32"):
    MobileNetV2Encoder(0.35).init(jax.random.key(0), jnp.zeros((1, 100, 100, 3)))
  with pytest.raises(ValueError, match="positive height and width.*0x0"):
    jax.eval_shape(MobileNetV2Encoder(0.35).init, jax.random.key(0), jnp.zeros((1, 0, 0, 3)))


@pytest.mark.parametrize("field,value", [
    ("alpha", 0.0), ("alpha", -1.0), ("num_classes", 0), ("decoder_filters", (64, 32, 16, 0)),
    ("decoder_filters", (64, 32, 16)), ("dropout", 1.0), ("dropout", -0.1), ("decoder_bn_momentum", 1.5),
    ("conv_impl", "fastest"), ("dtype", "float16"),
])
def test_unusable_model_config_names_the_field(field, value):
  from configs import default  # pylint: disable=g-import-not-at-top
  from petseg_jax import models  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model[field] = value
  with pytest.raises(ValueError, match=rf"config\.model\.{field}="):
    models.create_model(config.model)


def test_training_reports_unusable_model_config_as_config_error():
  from configs import default  # pylint: disable=g-import-not-at-top
  from petseg_jax import config_checks  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.data.source = "synthetic"
  config.model.alpha = 0.0
  with pytest.raises(config_checks.ConfigError, match=r"config\.model\.alpha=0\.0"):  # One line in scripts/train.py.
    config_checks.validate_config(config, num_devices=1)


def test_model_config_variants_build():
  from configs import default  # pylint: disable=g-import-not-at-top
  from petseg_jax import models  # pylint: disable=g-import-not-at-top
  config = default.get_config()
  config.model.update(alpha=0.75, num_classes=5, decoder_filters=(64, 32, 16, 8), dtype="bfloat16",
                      dropout=0.5)
  model = models.create_model(config.model)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 96, 160, 3)))  # Non-square works.
  logits = jax.eval_shape(model.apply, shapes, jnp.zeros((2, 96, 160, 3)))
  assert logits.shape == (2, 96, 160, 5) and logits.dtype == jnp.float32


def test_dropout_is_random_in_training_and_off_in_inference():
  x = jnp.asarray(np.random.default_rng(0).uniform(-1, 1, (2, 32, 32, 3)), jnp.float32)

  model = functools.partial(UNet, alpha=0.35, decoder_filters=(16, 16, 8, 8))
  variables = jax.jit(model().init)(jax.random.key(0), x)  # Dropout has no parameters.

  @functools.partial(jax.jit, static_argnums=(0, 1))  # Op by op, this test took ~100 s on 2 cores.
  def logits(dropout, train, seed):
    out = model(dropout=dropout).apply(variables, x, train=train, mutable=["batch_stats"] if train else False,
                                       rngs={"dropout": jax.random.key(seed)})
    return out[0] if train else out

  assert not np.allclose(logits(0.5, True, 1), logits(0.5, True, 2))  # A mask per key.
  np.testing.assert_array_equal(logits(0.0, True, 1), logits(0.0, True, 2))  # The keys change nothing else.
  np.testing.assert_array_equal(logits(0.5, False, 1), logits(0.5, False, 2))
  np.testing.assert_array_equal(logits(0.5, False, 1), logits(0.0, False, 1))  # Same params: inference ignores it.


# ----------------------------------------------------------------------------- whole U-Net == Keras tutorial


@pytest.mark.parametrize("alpha,size,impl", [(1.0, 128, "fast"), (0.35, 96, "fast"), (0.35, 96, "reference")])
def test_unet_equals_keras_tutorial_model(alpha, size, impl):
  pytest.importorskip("keras")
  from tests.keras_reference import keras_unet, randomize_keras_weights

  k_model = keras_unet(alpha, size)
  randomize_keras_weights(k_model, seed=7)
  x = _random((2, size, size, 3), seed=8)
  expected = np.asarray(k_model(x, training=False))
  variables = weights.unet_variables_from_keras(k_model)
  logits = jax.jit(lambda v, x: UNet(alpha=alpha, impl=impl).apply(v, x))(variables, x)
  assert logits.shape == (2, size, size, 3)
  assert relative_error(logits, expected) < 1e-4


def test_parameter_counts_match_keras_tutorial_model():
  """model.summary() of the tutorial model: 6,504,227 total, 4,660,323 trainable (alpha 1.0, 128x128)."""
  variables = jax.eval_shape(lambda: UNet(alpha=1.0).init(jax.random.key(0), jnp.zeros((1, 128, 128, 3))))
  count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
  total = count(variables)
  trainable = count(variables["params"]["decoder"])
  assert (total, trainable) == (6_504_227, 4_660_323)
  keras = pytest.importorskip("keras")
  from tests.keras_reference import keras_unet

  k_model = keras_unet(1.0, 128)
  assert k_model.count_params() == total
  assert sum(int(np.prod(w.shape)) for w in k_model.trainable_weights) == trainable
  del keras


# ----------------------------------------------------------------------------- real ImageNet weights


def _pet_batch(size: int) -> np.ndarray:
  from PIL import Image

  names = ["Abyssinian_1.jpg", "american_bulldog_10.jpg", "Bengal_1.jpg"]
  images = [np.asarray(Image.open(PETS / n).convert("RGB").resize((size, size), Image.BILINEAR))
            for n in names]
  return np.stack(images).astype(np.float32) / 127.5 - 1.0


@pytest.mark.parametrize("path,alpha", [(WEIGHTS_035, 0.35), (WEIGHTS_100, 1.0)])
def test_real_weights_give_keras_taps_on_real_pets(path, alpha):
  if not path.exists() or not PETS.exists():
    pytest.skip(f"shared weights/data not found beside the repo ({SHARED})")
  pytest.importorskip("keras")
  from tests.keras_reference import keras_encoder

  _, taps_model = keras_encoder(alpha, 128, weights=str(path))
  x = _pet_batch(128)
  expected = taps_model(x, training=False)
  variables = weights.encoder_variables_from_keras(str(path), alpha)
  taps = jax.jit(lambda v, x: MobileNetV2Encoder(alpha).apply(v, x))(variables, x)
  for name, want in zip(TAP_NAMES, expected):
    assert relative_error(taps[name], want) < 1e-4, name


# ----------------------------------------------------------------------------- conversion errors and formats


def test_wrong_alpha_names_layer_and_shapes():
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  with pytest.raises(weights.WeightsError, match=r"Conv1.*\(3, 3, 3, 16\).*\(3, 3, 3, 32\).*alpha=0.35"):
    weights.encoder_variables_from_keras(str(WEIGHTS_035), 1.0)


def test_missing_layer_is_named(tmp_path):
  h5py = pytest.importorskip("h5py")
  path = tmp_path / "partial.h5"
  with h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [b"Conv1"]
    g = f.create_group("Conv1")
    g.attrs["weight_names"] = [b"Conv1/kernel:0"]
    g.create_dataset("Conv1/kernel:0", data=np.zeros((3, 3, 3, 16), np.float32))
  with pytest.raises(weights.WeightsError, match="layer 'bn_Conv1' is missing"):
    weights.encoder_variables_from_keras(str(path), 0.35)


def test_missing_file_and_no_imagenet_alpha():
  with pytest.raises(weights.WeightsError, match="does not exist"):
    weights.load_encoder_variables("/nonexistent/weights.h5", 1.0)
  with pytest.raises(weights.WeightsError, match="only for alpha in"):
    weights.load_encoder_variables("imagenet", 0.6)


def test_imagenet_in_any_capitalisation_asks_keras_for_the_imagenet_weights():
  # alpha 0.6 has no ImageNet weights: the error comes before any download, and says it is about ImageNet.
  for spec in ("ImageNet", "IMAGENET"):
    with pytest.raises(weights.WeightsError, match=r"ImageNet MobileNetV2 weights only for alpha"):
      weights.load_encoder_variables(spec, 0.6)


def test_imagenet_and_missing_file_errors_fit_a_script_caller(monkeypatch):
  """scripts/convert_keras_weights.py passes alpha_setting="--alpha": no training-config ways out."""
  with pytest.raises(weights.WeightsError, match="got config.model.alpha=0.6. Set config.model.alpha to one "
                     "of those, or model.encoder_weights=None"):
    weights.encoder_variables_from_keras("imagenet", 0.6)
  monkeypatch.setattr(weights, "_keras_mobilenet", lambda alpha, source: pytest.fail("asked Keras"))
  with pytest.raises(weights.WeightsError, match=r"got --alpha=0.6. Set --alpha to one of those.$"):
    weights.encoder_variables_from_keras("imagenet", 0.6, alpha_setting="--alpha")
  with pytest.raises(weights.WeightsError, match=r"does not exist. Give 'imagenet' or a Keras weight file"):
    weights.encoder_variables_from_keras("/nonexistent/enc.h5", 0.35, alpha_setting="--alpha")

  def offline(alpha, source):
    raise OSError("URL fetch failure: network unreachable")

  monkeypatch.setattr(weights, "_keras_mobilenet", offline)
  with pytest.raises(weights.WeightsError, match="Offline, convert a Keras weight file of alpha 0.35 instead") as info:
    weights.encoder_variables_from_keras("imagenet", 0.35, alpha_setting="--alpha")
  assert "encoder_weights" not in str(info.value) and "None" not in str(info.value)


def test_imagenet_offline_error_names_the_ways_out(monkeypatch):
  def offline(alpha, source):
    raise OSError("URL fetch failure: network unreachable")

  monkeypatch.setattr(weights, "_keras_mobilenet", offline)
  with pytest.raises(weights.WeightsError, match="(?s)Offline.*Keras weight file.*bundled.*None"):
    weights.encoder_variables_from_keras("imagenet", 0.35)
  # Another alpha: its own file's name, and not the bundled alpha-0.35 weights, which it would refuse.
  with pytest.raises(weights.WeightsError) as info:
    weights.encoder_variables_from_keras("imagenet", 1.0)
  assert "mobilenet_v2_weights_tf_dim_ordering_tf_kernels_1.0_224_no_top.h5" in str(info.value)
  assert "0.35" not in str(info.value)


# Keras' MobileNetV2 widths of each ImageNet alpha: Conv1's filters and block_16_project's (0.35 and 0.5
# share Conv1's 16).
KERAS_WIDTHS = {0.35: (16, 112), 0.5: (16, 160), 0.75: (24, 240), 1.0: (32, 320), 1.3: (40, 416),
                1.4: (48, 448)}


@pytest.mark.parametrize("alpha", sorted(KERAS_WIDTHS))
def test_the_alpha_of_keras_weights_is_read_from_their_widths(alpha):
  first, last = KERAS_WIDTHS[alpha]
  layers = {"Conv1": {"kernel": np.zeros((3, 3, 3, first))},
            "block_16_project": {"kernel": np.zeros((1, 1, 6 * last, last))}}
  assert weights._infer_alpha(layers) == alpha  # pylint: disable=protected-access


def test_converted_npz_roundtrip_and_alpha_check(tmp_path):
  variables = _random_variables(MobileNetV2Encoder(0.35), (1, 32, 32, 3), seed=3)
  path = tmp_path / "enc.npz"
  weights.save_encoder_variables(path, variables, 0.35)
  loaded = weights.load_encoder_variables(str(path), 0.35)
  jax.tree.map(np.testing.assert_array_equal, loaded, variables)
  with pytest.raises(weights.WeightsError, match="alpha=0.35.*config.model.alpha=1.0"):
    weights.load_encoder_variables(str(path), 1.0)


@pytest.mark.parametrize("name", ["enc.h5", "enc.weights.h5", "enc.keras", "enc.npz"])
@pytest.mark.parametrize("content", ["text", "truncated"])
def test_unreadable_weight_files_are_named_with_the_way_out(tmp_path, name, content):
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  path = tmp_path / name
  if content == "text":
    path.write_text("not weights")
  else:  # The first half of a real file of that format.
    source = weights.BUNDLED_ENCODER_WEIGHTS if name.endswith(".npz") else WEIGHTS_035
    data = Path(source).read_bytes()
    path.write_bytes(data[:len(data) // 2])
  with pytest.raises(weights.WeightsError, match=rf"(?s){path}.*(damaged|truncated).*(again|Re-save)"):
    weights.load_encoder_variables(str(path), 0.35)


def test_weight_file_suffixes_are_read_in_any_case(tmp_path):
  """ENC.KERAS, ENC.WEIGHTS.H5 and ENC.NPZ are read as their lower-case names are (Keras itself reads
  lower-case suffixes only: it is given a lower-case name)."""
  from tests.keras_reference import keras_encoder, randomize_keras_weights  # pylint: disable=g-import-not-at-top
  base, _ = keras_encoder(0.35, 96)
  randomize_keras_weights(base, seed=3)
  base.save(tmp_path / "enc.keras")
  base.save_weights(tmp_path / "enc.weights.h5")
  (tmp_path / "enc.npz").write_bytes(Path(weights.BUNDLED_ENCODER_WEIGHTS).read_bytes())
  for name in ("enc.keras", "enc.weights.h5", "enc.npz"):
    (tmp_path / name.upper()).write_bytes((tmp_path / name).read_bytes())
    lower = weights.load_encoder_variables(str(tmp_path / name), 0.35)
    upper = weights.load_encoder_variables(str(tmp_path / name.upper()), 0.35)
    assert jax.tree.all(jax.tree.map(np.array_equal, lower, upper)), name
  assert not jax.tree.all(jax.tree.map(np.array_equal, lower, weights.load_encoder_variables(
      str(tmp_path / "enc.keras"), 0.35)))  # The randomized file is not the bundled one.


def test_legacy_h5_under_keras3_names_and_zip_under_h5_name(tmp_path):
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  expected = weights.encoder_variables_from_keras(str(WEIGHTS_035), 0.35)
  for name in ("enc.weights.h5", "enc.keras"):  # Legacy files are read by content, whatever the suffix.
    path = tmp_path / name
    path.write_bytes(WEIGHTS_035.read_bytes())
    jax.tree.map(np.testing.assert_array_equal, weights.load_encoder_variables(str(path), 0.35), expected)
  zipped = tmp_path / "model.h5"
  with zipfile.ZipFile(zipped, "w") as z:
    z.writestr("config.json", "{}")
  with pytest.raises(weights.WeightsError, match=r"zip archive.*'\.keras' suffix"):
    weights.load_encoder_variables(str(zipped), 0.35)
  with pytest.raises(weights.WeightsError, match="is a directory"):
    weights.load_encoder_variables(str(tmp_path), 0.35)
  # A converted .npz given as a Keras file (convert_keras_weights.py --source): it needs no conversion.
  with pytest.raises(weights.WeightsError, match=r"already a converted encoder.*model\.encoder_weights"):
    weights.encoder_variables_from_keras(str(weights.BUNDLED_ENCODER_WEIGHTS), 0.35)


def _legacy_whole_unet_file(path, duplicate_conv1=False):
  """The layout tf.keras 2 writes for the tutorial U-Net's ``save_weights("unet.h5")`` (checked against a file
  that tf_keras 2.21 wrote): the MobileNetV2 ``down_stack`` is one layer group, "model", listing its layers'
  weights as "<layer>/<variable>:0"; a pix2pix block, "sequential", likewise; the last layer on its own."""
  import h5py  # pylint: disable=g-import-not-at-top
  with h5py.File(WEIGHTS_035, "r") as source, h5py.File(path, "w") as f:
    f.attrs["layer_names"] = [b"input_2", b"model", b"sequential", b"conv2d_transpose_4"] + (
        [b"model_1"] if duplicate_conv1 else [])
    f.create_group("input_2").attrs["weight_names"] = []
    model = f.create_group("model")
    names = []
    for layer in source.attrs["layer_names"]:
      for w in source[layer].attrs["weight_names"]:
        model.create_dataset(w, data=source[layer][w][()])
        names.append(w.encode() if isinstance(w, str) else w)
    model.attrs["weight_names"] = names
    block = f.create_group("sequential")
    block.attrs["weight_names"] = [b"conv2d_transpose/kernel:0", b"batch_normalization/gamma:0"]
    block.create_dataset("conv2d_transpose/kernel:0", data=np.zeros((3, 3, 512, 56), np.float32))
    block.create_dataset("batch_normalization/gamma:0", data=np.ones(512, np.float32))
    last = f.create_group("conv2d_transpose_4")
    last.attrs["weight_names"] = [b"conv2d_transpose_4_1/kernel:0"]  # A uniquified prefix (TF1 graphs).
    last.create_dataset("conv2d_transpose_4_1/kernel:0", data=np.zeros((3, 3, 3, 112), np.float32))
    if duplicate_conv1:  # A second nested MobileNetV2.
      other = f.create_group("model_1")
      other.attrs["weight_names"] = [b"Conv1/kernel:0", b"bn_Conv1/gamma:0"]
      other.create_dataset("Conv1/kernel:0", data=np.zeros((3, 3, 3, 16), np.float32))
      other.create_dataset("bn_Conv1/gamma:0", data=np.ones(16, np.float32))


def test_the_encoder_of_a_whole_legacy_unet_file_is_read_by_its_layer_names(tmp_path):
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  expected = weights.load_encoder_variables(str(WEIGHTS_035), 0.35)
  path = tmp_path / "unet.h5"
  _legacy_whole_unet_file(path)
  jax.tree.map(np.testing.assert_array_equal, weights.load_encoder_variables(str(path), 0.35), expected)
  # A plain layer's group names the layer, whatever prefix its variables carry (TF1 uniquified names).
  layers = weights.read_keras_h5(path)
  assert layers["conv2d_transpose_4"].keys() == {"kernel"} and layers["batch_normalization"].keys() == {"gamma"}
  _legacy_whole_unet_file(path, duplicate_conv1=True)
  with pytest.raises(weights.WeightsError, match=r"layer 'Conv1' appears in both 'model' and 'model_1'"):
    weights.load_encoder_variables(str(path), 0.35)


def test_the_encoder_of_a_whole_keras3_unet_weights_file_is_read_from_its_nested_mobilenet(tmp_path):
  """``model.save_weights("unet.weights.h5")`` of the tutorial model in Keras 3: stored by object path, so
  the encoder is read by loading its nested group into a Keras MobileNetV2 (its U-Net taps)."""
  pytest.importorskip("keras")
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  from petseg_jax import keras_reference  # pylint: disable=g-import-not-at-top
  path = tmp_path / "unet.weights.h5"
  keras_reference.keras_unet(alpha=0.35, image_size=96, weights=str(WEIGHTS_035)).save_weights(path)
  expected = weights.load_encoder_variables(str(WEIGHTS_035), 0.35)
  jax.tree.map(np.testing.assert_array_equal, weights.load_encoder_variables(str(path), 0.35), expected)
  with pytest.raises(weights.WeightsError) as info:
    weights.load_encoder_variables(str(path), 1.0)
  message = str(info.value)
  assert str(path) in message and "whole Keras model" in message and "layers/functional" in message
  assert "looks like alpha=0.35" in message and "model.save('model.keras')" in message


def test_keras3_weights_file_of_another_alpha_says_which(tmp_path):
  keras = pytest.importorskip("keras")
  path = tmp_path / "enc.weights.h5"
  keras.applications.MobileNetV2(input_shape=(96, 96, 3), alpha=1.0, include_top=False,
                                 weights=None).save_weights(path)
  with pytest.raises(weights.WeightsError) as info:
    weights.load_encoder_variables(str(path), 0.35)
  message = str(info.value)
  assert str(path) in message and "looks like alpha=1.0" in message and "config.model.alpha" in message
  assert "value=[" not in message and len(message) < 1000  # Keras' message dumps whole arrays.
  # scripts/convert_keras_weights.py names its own flag instead.
  with pytest.raises(weights.WeightsError, match="Check --alpha against the file") as info:
    weights.encoder_variables_from_keras(str(path), 0.35, alpha_setting="--alpha")
  assert "config.model" not in str(info.value)


def test_weight_file_is_opened_once_before_keras_reads_it(tmp_path, monkeypatch):
  """Legacy or Keras 3, a file's checks (layout, readability, the alpha hint) share one h5py opening."""
  h5py = pytest.importorskip("h5py")
  legacy = tmp_path / "partial.h5"
  with h5py.File(legacy, "w") as f:
    f.attrs["layer_names"] = [b"Conv1"]
    f.create_group("Conv1").attrs["weight_names"] = [b"Conv1/kernel:0"]
    f["Conv1"].create_dataset("Conv1/kernel:0", data=np.zeros((3, 3, 3, 16), np.float32))
  keras3 = tmp_path / "enc.weights.h5"  # The Keras 3 layout: no 'layer_names', variables under paths.
  with h5py.File(keras3, "w") as f:
    f.create_dataset("layers/conv2d/vars/0", data=np.zeros((3, 3, 3, 32), np.float32))

  def keras_refuses(alpha, source):
    raise ValueError(f"Layer 'Conv1' expected a kernel of another shape for alpha={alpha}")

  opened = []
  real_file = h5py.File
  monkeypatch.setattr(h5py, "File", lambda path, *args, **kwargs: opened.append(path) or real_file(
      path, *args, **kwargs))
  monkeypatch.setattr(weights, "_keras_mobilenet", keras_refuses)
  with pytest.raises(weights.WeightsError, match="layer 'bn_Conv1' is missing"):
    weights.encoder_variables_from_keras(str(legacy), 0.35)
  assert len(opened) == 1, opened
  opened.clear()
  with pytest.raises(weights.WeightsError, match="looks like alpha=1.0.*Check config.model.alpha"):
    weights.encoder_variables_from_keras(str(keras3), 0.35)
  assert len(opened) == 1, opened

def test_npz_with_foreign_arrays_is_refused(tmp_path):
  variables = _random_variables(MobileNetV2Encoder(0.35), (1, 32, 32, 3), seed=3)
  path = tmp_path / "enc.npz"
  weights.save_encoder_variables(path, {**variables, "extra": {"x": np.zeros(3)}}, 0.35)
  with pytest.raises(weights.WeightsError, match=r"enc.npz: holds \['extra/x'\]"):
    weights.load_encoder_variables(str(path), 0.35)


def test_convert_script_writes_loadable_npz_into_a_new_directory(tmp_path, monkeypatch):
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  from tests import trained_run  # pylint: disable=g-import-not-at-top
  monkeypatch.delenv("PYTHONPATH", raising=False)  # The script must find this checkout by itself.
  output = tmp_path / "new_dir" / "enc.npz"
  (result,) = trained_run.run_scripts(
      ("convert_keras_weights.py", "--source", WEIGHTS_035, "--alpha", 0.35, "--output", output))
  assert result.returncode == 0, result.stderr
  jax.tree.map(np.testing.assert_array_equal, weights.load_encoder_variables(str(output), 0.35),
               weights.load_encoder_variables(weights.BUNDLED_ENCODER_WEIGHTS, 0.35))


def test_convert_script_names_its_alpha_flag_when_the_file_differs(tmp_path):
  """The alpha-0.35 file converted with --alpha 1.0 (or 'imagenet' with an alpha Keras has no weights for):
  the error names --alpha, not a config field this command does not have."""
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  from tests import trained_run  # pylint: disable=g-import-not-at-top
  result, imagenet = trained_run.run_scripts(
      ("convert_keras_weights.py", "--source", WEIGHTS_035, "--alpha", 1.0, "--output", tmp_path / "enc.npz"),
      ("convert_keras_weights.py", "--source", "imagenet", "--alpha", 0.6, "--output", tmp_path / "in.npz"))
  assert result.returncode != 0 and "Traceback" not in result.stderr, result.stderr
  assert "look like alpha=0.35" in result.stderr and "set --alpha=0.35" in result.stderr, result.stderr
  assert "config.model" not in result.stderr and not (tmp_path / "enc.npz").exists()
  # An alpha without ImageNet weights: this command's flag again, no training-config field.
  assert imagenet.returncode != 0 and "Traceback" not in imagenet.stderr, imagenet.stderr
  assert "Set --alpha to one of those" in imagenet.stderr and "encoder_weights" not in imagenet.stderr


# ----------------------------------------------------------------------------- a whole Keras U-Net's file


@pytest.fixture(scope="module")
def keras_unet_files(tmp_path_factory):
  """The tutorial U-Net (alpha 0.35, random weights) saved each way Keras saves it, its input and its logits."""
  pytest.importorskip("keras")
  h5py = pytest.importorskip("h5py")
  from tests.keras_reference import keras_unet, randomize_keras_weights  # pylint: disable=g-import-not-at-top

  model = keras_unet(0.35, 96)
  randomize_keras_weights(model, seed=11)
  directory = tmp_path_factory.mktemp("keras_unet")
  model.save(directory / "unet.keras")
  model.save(directory / "unet.h5")  # Keras 3 writes a whole model in the legacy HDF5 format.
  model.save_weights(directory / "unet.weights.h5")
  # tf.keras 2's save_weights("unet.h5"): the legacy file's 'model_weights' group, as the file's root (the
  # layout of a file tf_keras 2.21 wrote; such files load the same, checked by hand).
  with h5py.File(directory / "unet.h5", "r") as whole, h5py.File(directory / "legacy.h5", "w") as legacy:
    group = whole["model_weights"]
    legacy.attrs.update(group.attrs)
    for key in group:
      whole.copy(group[key], legacy, key)
  (directory / "legacy_named.weights.h5").write_bytes((directory / "legacy.h5").read_bytes())
  for name in ("unet.keras", "unet.weights.h5"):  # Upper-case suffixes: Keras reads lower-case ones only.
    (directory / name.upper()).write_bytes((directory / name).read_bytes())
  x = _random((2, 96, 96, 3), seed=12)
  return directory, x, np.asarray(model(x, training=False))


@pytest.mark.parametrize("name", ["unet.keras", "unet.h5", "unet.weights.h5", "legacy.h5", "legacy_named.weights.h5",
                                  "UNET.KERAS", "UNET.WEIGHTS.H5"])
def test_a_whole_keras_unet_file_gives_the_same_function(keras_unet_files, name):
  directory, x, expected = keras_unet_files
  assert weights.is_keras_file(directory / name)
  variables = weights.unet_variables_from_keras_file(directory / name, 0.35)
  logits = jax.jit(UNet(alpha=0.35).apply)(variables, x)
  assert relative_error(logits, expected) < 1e-4


def test_the_input_size_a_keras_model_file_records(keras_unet_files, tmp_path):
  directory, _, _ = keras_unet_files
  sizes = {name: weights.keras_file_image_size(directory / name)
           for name in ("unet.keras", "unet.h5", "UNET.KERAS", "unet.weights.h5", "legacy.h5")}
  # Whole models record their input layer; weight files (Keras 3's, and the legacy layout) do not.
  assert sizes == {"unet.keras": 96, "unet.h5": 96, "UNET.KERAS": 96, "unet.weights.h5": None, "legacy.h5": None}
  cut = tmp_path / "cut.keras"
  cut.write_bytes((directory / "unet.keras").read_bytes()[:50_000])
  assert weights.keras_file_image_size(cut) is None  # The weight reading names the damage.
  assert weights.keras_file_image_size(tmp_path / "missing.h5") is None


def test_a_keras_unet_file_of_another_model_names_the_settings(keras_unet_files):
  directory, _, _ = keras_unet_files
  with pytest.raises(weights.WeightsError) as info:
    weights.unet_variables_from_keras_file(directory / "legacy.h5", 1.0)
  message = str(info.value)
  assert "legacy.h5: does not load into the tutorial U-Net with alpha=1.0" in message, message
  assert "looks like alpha=0.35" in message and "config.model.alpha" in message, message
  with pytest.raises(weights.WeightsError, match=r"unet.keras: .*decoder_filters=\(256, 128, 64, 32\)"):
    weights.unet_variables_from_keras_file(directory / "unet.keras", 0.35, decoder_filters=(256, 128, 64, 32))
  with pytest.raises(weights.WeightsError, match="nothing.keras does not exist"):
    weights.unet_variables_from_keras_file(directory / "nothing.keras", 0.35)
  assert not weights.is_keras_file(directory)  # A run's workdir, whatever its name.
  # What Keras would report from deep inside is named first: a damaged file, an encoder's file.
  cut = directory / "cut.keras"
  cut.write_bytes((directory / "unet.keras").read_bytes()[:50_000])
  with pytest.raises(weights.WeightsError, match=r"cut.keras: not a Keras 3 '.keras' archive .* damaged, truncated"):
    weights.unet_variables_from_keras_file(cut, 0.35)
  renamed = directory / "archive.h5"
  renamed.write_bytes((directory / "unet.keras").read_bytes())
  with pytest.raises(weights.WeightsError, match=r"archive.h5: is a zip archive.*Name it with the '.keras' suffix"):
    weights.unet_variables_from_keras_file(renamed, 0.35)
  if WEIGHTS_035.exists():
    with pytest.raises(weights.WeightsError, match=r"no U-Net decoder: a MobileNetV2's weights\? .*encoder_weights"):
      weights.unet_variables_from_keras_file(WEIGHTS_035, 0.35)


@pytest.fixture(scope="module")
def imported_run(keras_unet_files, tmp_path_factory):
  """scripts/import_keras_unet.py run on unet.keras, without and with the input range: (workdir, results)."""
  from tests import trained_run  # pylint: disable=g-import-not-at-top
  directory, _, _ = keras_unet_files
  workdir = tmp_path_factory.mktemp("imported") / "run"
  command = ("import_keras_unet.py", "--source", directory / "unet.keras", "--workdir", workdir,
             "--config.model.alpha=0.35")
  return workdir, command, trained_run.run_scripts(command, command + ("--config.data.input_range=[0,1]",))


def test_import_script_writes_a_run_that_gives_the_keras_logits(keras_unet_files, imported_run):
  from petseg_jax import inference  # pylint: disable=g-import-not-at-top
  from tests import trained_run  # pylint: disable=g-import-not-at-top
  directory, x, expected = keras_unet_files
  workdir, command, (unsaid, imported) = imported_run
  # How the inputs were scaled is not in the file, and a wrong guess gives a wrong model: it must be said.
  assert unsaid.returncode != 0 and "--config.data.input_range='[0,1]'" in unsaid.stderr, unsaid.stderr
  assert "Traceback" not in unsaid.stderr
  assert imported.returncode == 0, imported.stderr
  assert f"Evaluate it: python scripts/evaluate.py --workdir {workdir}" in imported.stdout
  config = inference.load_run_config(workdir)
  assert config.data.input_range == "[0,1]" and config.model.encoder_weights == ""
  # The size the Keras model was built for, which unet.keras records (the config's default is 128).
  assert config.data.image_size == 96 and "inputs 96x96 in [0,1]" in imported.stdout
  assert "the run takes config.data.image_size=96 from it (the config says 128)" in imported.stdout
  assert config.model.init_from == str((directory / "unet.keras").resolve())
  model, variables, step = inference.restore_model(config, workdir, "latest")
  assert step == 0
  assert relative_error(jax.jit(model.apply)(variables, x), expected) < 1e-4
  (again,) = trained_run.run_scripts(command + ("--config.data.input_range=[0,1]",))
  assert again.returncode == 1 and "holds a run's checkpoints already" in again.stderr, again.stderr
  assert "Traceback" not in again.stderr


def test_export_script_writes_the_run_as_a_keras_model_of_the_same_function(imported_run, tmp_path):
  keras = pytest.importorskip("keras")
  from petseg_jax import inference  # pylint: disable=g-import-not-at-top
  from tests import trained_run  # pylint: disable=g-import-not-at-top
  from tests.keras_reference import keras_unet  # pylint: disable=g-import-not-at-top
  workdir, _, _ = imported_run
  outputs = [tmp_path / "out" / "unet.keras", tmp_path / "unet.weights.h5", tmp_path / "unet.npz"]
  results = trained_run.run_scripts(
      *[("export_keras_unet.py", "--workdir", workdir, "--output", output) for output in outputs])
  for result in results[:2]:
    assert result.returncode == 0 and "its logits equal the run's within" in result.stdout, result.stderr
  assert results[2].returncode == 1 and "name the Keras file '.keras'" in results[2].stderr, results[2].stderr
  assert "Traceback" not in results[2].stderr
  assert sorted(p.name for p in tmp_path.rglob("*")) == ["out", "unet.keras", "unet.weights.h5"]  # No temporaries.
  config = inference.load_run_config(workdir)
  model, variables, _ = inference.restore_model(config, workdir, "latest")
  x = np.random.default_rng(13).uniform(0, 1, (2, 96, 96, 3)).astype(np.float32)  # Its [0,1] inputs.
  ours = jax.jit(model.apply)(variables, x)
  whole = keras.models.load_model(outputs[0], compile=False)
  assert relative_error(whole(x, training=False), ours) < 1e-4
  weights_only = keras_unet(0.35, 96)
  weights_only.load_weights(outputs[1])
  assert relative_error(weights_only(x, training=False), ours) < 1e-4


def test_variables_of_another_model_do_not_go_into_a_keras_unet():
  pytest.importorskip("keras")
  from tests.keras_reference import keras_unet  # pylint: disable=g-import-not-at-top
  variables = _random_variables(UNet(alpha=0.35), (1, 64, 64, 3))
  with pytest.raises(weights.WeightsError, match=r"Keras layer 'block_1_project': .*\(1, 1, 48, 8\)"):
    weights.unet_variables_to_keras(variables, keras_unet(0.5, 64))
  with pytest.raises(weights.WeightsError, match=r"has 3 upsample blocks; the variables have 4"):
    weights.unet_variables_to_keras(variables, keras_unet(0.35, 64, decoder_filters=(256, 128, 64)))


def test_bundled_weights_equal_the_keras_file():
  if not WEIGHTS_035.exists():
    pytest.skip("shared weights not found")
  bundled = weights.load_encoder_variables(weights.BUNDLED_ENCODER_WEIGHTS, 0.35)
  from_keras = weights.encoder_variables_from_keras(str(WEIGHTS_035), 0.35)
  jax.tree.map(np.testing.assert_array_equal, bundled, from_keras)


def test_merge_encoder_variables_replaces_only_the_encoder():
  model = UNet(alpha=0.35)
  variables = _random_variables(model, (1, 64, 64, 3))
  encoder = jax.tree.map(lambda x: np.full(x.shape, 0.5, np.float32),
                         {k: variables[k]["encoder"] for k in ("params", "batch_stats")})
  merged = weights.merge_encoder_variables(variables, encoder)
  assert all(np.all(np.asarray(x) == 0.5) for x in jax.tree.leaves(merged["params"]["encoder"]))
  jax.tree.map(np.testing.assert_array_equal, merged["params"]["decoder"], variables["params"]["decoder"])


# ----------------------------------------------------------------------------- BatchNorm folded for inference


def _variables_with_real_statistics(model, size, seed=0):
  """The model's initial kernels (activations stay of order 1, so rounding differences do not grow from layer
  to layer as with uniform ones) and BatchNorms of other than identity statistics: scales and variances in
  [0.5, 1.5], means and biases in [-0.5, 0.5]."""
  variables = jax.jit(model.init)(jax.random.key(seed), jnp.zeros((1, size, size, 3)))
  rng = np.random.default_rng(seed)

  def batch_norm(path, x):
    name = path[-1].key
    if path[-2].key == "last" or name == "kernel":
      return x
    low = 0.5 if name in ("var", "scale") else -0.5
    return rng.uniform(low, low + 1, x.shape).astype(np.float32)
  return jax.tree_util.tree_map_with_path(batch_norm, variables)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_folded_batch_norm_is_the_same_function(dtype):
  """UNet(batch_norm_folded=True) on fold_batch_norm's variables gives the unfolded model's logits: to
  float32 rounding, and in bfloat16 no further from the float32 model than the unfolded bfloat16 model is."""
  from petseg_jax.models import fold_batch_norm

  size = 64
  model = UNet(alpha=0.35, decoder_filters=(64, 32, 32, 16))
  variables = _variables_with_real_statistics(model, size)
  x = _random((2, size, size, 3), seed=3)
  apply = jax.jit(lambda m, v, x: m.apply(v, x), static_argnums=0)
  reference = apply(model, variables, x)
  folded_variables = fold_batch_norm(variables)
  assert set(folded_variables) == {"params"}
  assert set(folded_variables["params"]["encoder"]["block_1_expand_BN"]) == {"bias"}
  assert set(folded_variables["params"]["decoder"]["up_0"]["bn"]) == {"bias"}
  if dtype == "float32":
    assert relative_error(apply(model.clone(batch_norm_folded=True), folded_variables, x), reference) < 1e-5
  else:
    low = model.clone(dtype=jnp.bfloat16)
    unfolded_error = relative_error(apply(low, variables, x), reference)
    folded_error = relative_error(apply(low.clone(batch_norm_folded=True), folded_variables, x), reference)
    assert 0 < folded_error < 1.5 * unfolded_error, (folded_error, unfolded_error)


def test_folding_refuses_what_it_cannot_fold():
  from petseg_jax.models import fold_batch_norm

  model = UNet(alpha=0.35, decoder_filters=(32, 16, 16, 16))
  variables = _variables_with_real_statistics(model, 32)
  with pytest.raises(ValueError, match="'params' and 'batch_stats'.*got collections \\['params'\\]"):
    fold_batch_norm({"params": variables["params"]})
  params = dict(variables["params"]["encoder"])
  del params["block_2_project"]
  broken = {"params": {**variables["params"], "encoder": params}, "batch_stats": variables["batch_stats"]}
  with pytest.raises(ValueError, match="BatchNorm encoder/block_2_project_BN .*needs the kernel "
                                       "encoder/block_2_project/kernel.*found none"):
    fold_batch_norm(broken)
  with pytest.raises(ValueError, match="batch_norm_folded=True is for inference only"):
    model.clone(batch_norm_folded=True).apply(fold_batch_norm(variables), jnp.zeros((1, 32, 32, 3)), train=True,
                                              rngs={"dropout": jax.random.key(0)}, mutable=["batch_stats"])
