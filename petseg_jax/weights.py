"""Keras ⇄ Flax weights: the MobileNetV2 encoder and the tutorial U-Net in, the U-Net out.

Keras layer names are kept as Flax module names, so conversion is a rename of each layer's variables:
``kernel``/``depthwise_kernel`` → ``kernel``, ``gamma`` → ``scale``, ``beta`` → ``bias``,
``moving_mean``/``moving_variance`` → ``batch_stats`` ``mean``/``var``. Two layouts differ: depthwise
kernels are (3, 3, C, 1) in Keras and (3, 3, 1, C) here, and ``Conv2DTranspose`` kernels are
(3, 3, out, in) in Keras and (3, 3, in, out) here.

Converted encoder weights are stored as ``.npz`` files (flattened ``params/...`` and ``batch_stats/...``
arrays plus the width ``alpha``); ``scripts/convert_keras_weights.py`` writes them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import json
import os
import warnings
from pathlib import Path
import tempfile
import zipfile
from typing import Any, Callable, Iterator, Mapping, Sequence, TypeVar

import flax
import jax
import jax.numpy as jnp
import numpy as np

from petseg_jax import files
from petseg_jax.models.mobilenet_v2 import MobileNetV2Encoder, make_divisible

Variables = dict[str, Any]
LayerArrays = dict[str, dict[str, np.ndarray]]  # Keras layer name → variable name → array.
T = TypeVar("T")

# The stock ImageNet alpha-0.35 encoder, converted from Keras (Apache-2.0, see assets/WEIGHTS_LICENSE.md).
BUNDLED_ENCODER_WEIGHTS = str(Path(__file__).parent / "assets" / "mobilenet_v2_0.35_imagenet.npz")
# Widths for which keras.applications publishes ImageNet MobileNetV2 weights.
IMAGENET_ALPHAS = (0.35, 0.5, 0.75, 1.0, 1.3, 1.4)
# Where a training config sets the encoder width: the default alpha_setting of the conversion functions.
_CONFIG_ALPHA = "config.model.alpha"
# The array of a converted .npz that holds its alpha (beside the encoder's flattened variables).
_ALPHA_ENTRY = "__alpha__"

_KERAS_TO_FLAX = {
    "kernel": ("params", "kernel"),
    "depthwise_kernel": ("params", "kernel"),
    "bias": ("params", "bias"),
    "gamma": ("params", "scale"),
    "beta": ("params", "bias"),
    "moving_mean": ("batch_stats", "mean"),
    "moving_variance": ("batch_stats", "var"),
}


class WeightsError(ValueError):
  """A weight source that cannot be used: missing file, wrong alpha, missing layer, wrong shape."""


def _var_name(name: str) -> str:
  """'block_1_expand/kernel:0' → 'kernel'."""
  return name.split("/")[-1].split(":")[0]


def _infer_alpha(layers: LayerArrays) -> float | None:
  """The ImageNet alpha whose first conv width matches the weights, if one does."""
  if "Conv1" not in layers or "kernel" not in layers["Conv1"]:
    return None
  width = layers["Conv1"]["kernel"].shape[-1]
  last = layers.get("block_16_project", {}).get("kernel")
  for alpha in IMAGENET_ALPHAS:
    if make_divisible(32 * alpha) == width and (
        last is None or last.shape[-1] == make_divisible(int(320 * alpha))):
      return alpha
  return None


_SUBLAYER_ORDER = ("expand", "expand_BN", "depthwise", "depthwise_BN", "project", "project_BN")


def _network_order(layer: str) -> tuple[int, int, str]:
  """Sort key putting MobileNetV2 layer names in network order (so errors name the first problem)."""
  if layer in ("Conv1", "bn_Conv1"):
    return (-1, int(layer != "Conv1"), layer)
  if layer.startswith("expanded_conv_"):
    block, rest = 0, layer[len("expanded_conv_"):]
  elif layer.startswith("block_"):
    number, _, rest = layer[len("block_"):].partition("_")
    block = int(number) if number.isdigit() else 99
  else:
    return (99, 0, layer)
  return (block, _SUBLAYER_ORDER.index(rest) if rest in _SUBLAYER_ORDER else 9, layer)


def read_keras_h5(path: str | os.PathLike) -> LayerArrays:
  """Reads a legacy Keras HDF5 weight file (the layout ``keras.applications`` downloads) by layer name."""
  import h5py  # Only needed for this file format.

  path = Path(path)
  try:
    with h5py.File(path, "r") as f:
      group = _legacy_group(f)
      if group is None:
        raise _not_legacy_h5(path)
      return _read_legacy_group(group, path)
  except OSError as e:
    raise _unreadable_hdf5(path, e) from None


def _legacy_group(f: Any) -> Any:
  """The group of an open HDF5 file holding the layers of the legacy Keras layout, or None if not that layout."""
  group = f["model_weights"] if "model_weights" in f else f
  return group if "layer_names" in group.attrs else None


def _read_legacy_group(group: Any, path: Path) -> LayerArrays:
  """The arrays of a legacy Keras HDF5 layer group by layer name; read errors are WeightsErrors naming ``path``."""
  text = lambda raw: raw.decode() if isinstance(raw, bytes) else str(raw)
  try:
    layers: LayerArrays = {}
    group_of: dict[str, str] = {}  # Layer → the file's layer group that holds it.
    for group_name in map(text, group.attrs["layer_names"]):
      names = [text(raw) for raw in group[group_name].attrs.get("weight_names", [])]
      # A nested model's group (the tutorial's down_stack in a whole U-Net's file) lists the weights of many
      # layers, named "<layer>/<variable>:0": each goes under its own layer. A plain layer's group is named
      # by the layer (its variables may carry a uniquified prefix, e.g. "Conv1_1/kernel:0").
      owners = {w.split("/")[-2] if "/" in w else group_name for w in names}
      for w in names:
        layer = w.split("/")[-2] if len(owners) > 1 else group_name
        if group_of.setdefault(layer, group_name) != group_name:
          raise WeightsError(f"{path}: layer '{layer}' appears in both '{group_of[layer]}' and '{group_name}' "
                             "(two nested models?); give a file with one MobileNetV2.")
        layers.setdefault(layer, {})[_var_name(w)] = np.asarray(group[group_name][w])
    return layers
  except OSError as e:
    raise _unreadable_hdf5(path, e) from None
  except KeyError as e:  # 'layer_names' or 'weight_names' naming a group or dataset the file lacks.
    raise WeightsError(
        f"{path}: malformed Keras HDF5 weight file ({e}). Download or export it again.") from None


def _not_legacy_h5(path: Path) -> WeightsError:
  return WeightsError(
      f"{path}: not a legacy Keras HDF5 weight file (no 'layer_names' attribute). Keras 3 "
      "'.weights.h5' and '.keras' files are read through Keras; name them with those suffixes.")


def read_keras_model(model: Any) -> LayerArrays:
  """Collects the weights of a Keras model (and of its nested sub-models) by layer name."""
  layers: LayerArrays = {}

  def visit(layer: Any) -> None:
    children = getattr(layer, "layers", None)
    if children:  # A sub-model (e.g. the tutorial's down_stack): descend, its layers keep their names.
      for child in children:
        visit(child)
      return
    arrays = {_var_name(w.path if hasattr(w, "path") else w.name): np.asarray(w.numpy())
              for w in layer.weights}
    if arrays:
      layers[layer.name] = arrays

  visit(model)
  return layers


def keras_imagenet_file_name(alpha: float) -> str:
  """The name of the no-top ImageNet weight file ``keras.applications.MobileNetV2`` downloads (input size 224)."""
  return f"mobilenet_v2_weights_tf_dim_ordering_tf_kernels_{float(alpha)}_224_no_top.h5"


def _keras_mobilenet(alpha: float, weights: str) -> Any:
  """A Keras MobileNetV2 (no top) of ``alpha`` with ``weights`` ("imagenet" or a Keras weight file) loaded."""
  # keras_reference imports Keras: only when Keras itself must read the weights. Weights do not depend on
  # the image size.
  from petseg_jax import keras_reference  # pylint: disable=g-import-not-at-top

  return keras_reference.keras_encoder(alpha, 224, weights)[0]


def _read_source(source: Any, alpha: float, alpha_setting: str = _CONFIG_ALPHA) -> LayerArrays:
  if not isinstance(source, (str, os.PathLike)):
    return read_keras_model(source)
  # The ways out through model.encoder_weights (None, a converted .npz) exist only in a training config.
  from_config = alpha_setting == _CONFIG_ALPHA
  # Any capitalisation (as None's): "ImageNet" is the dataset's own spelling, and no file is named so.
  if str(source).lower() == "imagenet" and not Path(source).exists():
    if alpha not in IMAGENET_ALPHAS:
      raise WeightsError(
          f"Keras publishes ImageNet MobileNetV2 weights only for alpha in {IMAGENET_ALPHAS}; got "
          f"{alpha_setting}={alpha}. Set {alpha_setting} to one of those"
          + (", or model.encoder_weights=None for a random encoder." if from_config else "."))
    try:
      return read_keras_model(_keras_mobilenet(alpha, "imagenet"))
    except Exception as e:  # Keras raises a bare URL/OS error offline.
      # The file keras.applications downloads for this alpha: copied from a machine with network, it works here.
      example = f"{keras_imagenet_file_name(alpha)}, which keras.applications downloads"
      bundled = (f", at the bundled converted alpha-0.35 weights ({BUNDLED_ENCODER_WEIGHTS})" if alpha == 0.35
                 else "")
      way_out = (f"point model.encoder_weights at a Keras weight file of alpha {alpha} (e.g. {example}){bundled}, "
                 "or set it to None for a randomly initialised encoder." if from_config else
                 f"convert a Keras weight file of alpha {alpha} instead of 'imagenet' (e.g. {example}).")
      raise WeightsError(
          f"Could not get the ImageNet MobileNetV2 (alpha={alpha}) weights through keras.applications "
          f"({type(e).__name__}: {e}). Offline, {way_out}") from None
  path = Path(source)
  if not path.is_file():
    what = "is a directory, not a file" if path.is_dir() else "does not exist"
    takes = ("model.encoder_weights takes 'imagenet', a Keras weight file (.h5, .weights.h5, .keras), a "
             "converted .npz file, or None." if from_config else
             "Give 'imagenet' or a Keras weight file (.h5, .weights.h5, .keras).")
    raise WeightsError(f"Encoder weight file {path} {what}. {takes}")
  # Dispatch on the content as well as the name: a legacy file saved or renamed as '.weights.h5' is common,
  # and a damaged file must be reported as such, not as a bare error from deep inside h5py or Keras.
  probe = _probe_hdf5(path)
  if probe.legacy_layers is not None:
    return probe.legacy_layers
  name = path.name.lower()  # Suffixes in any case; Keras is given a lower-case name (_named_for_keras).
  if name.endswith(".keras"):
    if not zipfile.is_zipfile(path):
      raise _not_a_keras_archive(path, "(.h5, .weights.h5, .npz)")
    import keras

    try:
      with _named_for_keras(path, ".keras") as source:
        return read_keras_model(keras.models.load_model(source, compile=False))
    except Exception as e:  # Keras raises many types (ValueError, TypeError, KeyError...) for bad archives.
      raise WeightsError(f"{path}: Keras cannot load this '.keras' file ({_first_line(e)}).") from None
  if name.endswith(".weights.h5"):
    if probe.open_error is not None:
      raise _unreadable_hdf5(path, probe.open_error)
    hint = _alpha_hint(probe.conv1_alphas, alpha)
    if probe.nested_models:
      layers = _read_nested_mobilenet(path, probe.nested_models, alpha)
      if layers is None:
        raise WeightsError(
            f"{path}: holds a whole Keras model's weights (nested models: {', '.join(probe.nested_models)}), "
            f"and none of them loads into a Keras MobileNetV2 with alpha={alpha} or into its U-Net taps.{hint} "
            f"Check {alpha_setting} against the file; or save that model with model.save('model.keras') and "
            "give the '.keras' file, which records each layer's name.")
      return layers
    try:
      with _named_for_keras(path, ".weights.h5") as source:
        model = _keras_loading(lambda: _keras_mobilenet(alpha, str(source)))
    except ValueError as e:
      raise WeightsError(f"{path}: does not load into a Keras MobileNetV2 with alpha={alpha} "
                         f"({_first_line(e)}).{hint} Check {alpha_setting} against the file.") from None
    return read_keras_model(model)
  if zipfile.is_zipfile(path):
    with zipfile.ZipFile(path) as archive:
      converted = f"{_ALPHA_ENTRY}.npy" in archive.namelist()  # What save_encoder_variables writes.
    if converted:
      raise WeightsError(f"{path}: is already a converted encoder (.npz), not a Keras weight file: it needs "
                         "no conversion; give it to model.encoder_weights as it is.")
    raise _keras_archive_named_otherwise(path)
  if probe.open_error is not None:
    raise _unreadable_hdf5(path, probe.open_error)
  raise _not_legacy_h5(path)


def _read_nested_mobilenet(path: Path, groups: tuple[str, ...], alpha: float) -> LayerArrays | None:
  """The MobileNetV2 nested in a whole Keras 3 model's ``.weights.h5`` (e.g. the tutorial U-Net's
  ``down_stack``) by layer name; None if no group of ``groups`` holds one of ``alpha``.

  Keras 3 stores a weight file by object path (``layers/functional/layers/conv2d/vars/0``), not by layer name,
  so only the architecture that saved a group can read it. Each nested model's group is copied into a file of
  its own and loaded into a Keras MobileNetV2 of ``alpha``, or into the sub-model of its U-Net taps (which
  the tutorial nests: the MobileNetV2 cut at ``block_16_project``); the first that loads is read.
  """
  import h5py

  from petseg_jax import keras_reference  # pylint: disable=g-import-not-at-top  # Imports Keras.

  candidates = keras_reference.keras_encoder(alpha, 224)  # As _keras_mobilenet, and its U-Net taps.
  with tempfile.TemporaryDirectory() as tmp, h5py.File(path, "r") as source:
    for group in groups:
      nested = Path(tmp) / f"{group.replace('/', '_')}.weights.h5"
      with h5py.File(nested, "w") as target:
        for key in source[group]:
          source.copy(source[group][key], target, key)
      for model in candidates:
        try:
          _keras_loading(functools.partial(model.load_weights, nested))
        except ValueError:  # Another architecture (a pix2pix block), or another alpha.
          continue
        return read_keras_model(model)  # A complete load: every variable of this model is the file's.
  return None


@contextlib.contextmanager
def _named_for_keras(path: Path, ending: str, keras_ending: str | None = None) -> Iterator[Path]:
  """``path`` as Keras must be given it: Keras picks a file's format by its name's lower-case suffix, so a
  name ending in ``ending`` in another case (``UNET.KERAS``), or to be read as ``keras_ending``, is given as a
  symlink so named in a temporary directory; a name that ends so already is given as it is."""
  keras_name = path.name[:-len(ending)] + (keras_ending or ending)
  if keras_name == path.name:
    yield path
    return
  with tempfile.TemporaryDirectory() as tmp:
    link = Path(tmp) / keras_name
    link.symlink_to(path.resolve())
    yield link


def _keras_loading(load: Callable[[], T]) -> T:
  """``load()`` (Keras reading a weight file), passing Keras' warnings on only if it succeeds.

  A file that does not fit makes Keras warn once per layer it cannot fill before it raises: the error says it
  all, and the caller turns it into a message of its own.
  """
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    result = load()
  # Once each, as Python's default filter shows them (recording saw every repeat, e.g. one per variable).
  for key in dict.fromkeys((w.category, str(w.message), w.filename, w.lineno) for w in caught):
    category, message, filename, lineno = key
    warnings.warn_explicit(message, category, filename, lineno)
  return result


def _alpha_hint(found: Sequence[float], alpha: float) -> str:
  """A sentence naming the alphas a file's first convolution fits (``found``), when ``alpha`` is not one."""
  if not found or alpha in found:
    return ""
  return f" Its first convolution looks like alpha={' or '.join(map(str, found))}."


def _first_line(error: Exception) -> str:
  """The first line of an error message (Keras appends whole arrays to its weight-loading errors)."""
  lines = [line.strip() for line in str(error).splitlines() if line.strip()]
  if not lines:
    return type(error).__name__
  text = lines[0]
  if text.endswith(":") and len(lines) > 1:  # "Example error message for object <Conv2D ...>:", then why.
    text += " " + lines[1].split(" Target variable:")[0]
  return text[:500]


def _keras_archive_named_otherwise(path: Path) -> WeightsError:
  return WeightsError(f"{path}: is a zip archive, not an HDF5 weight file: a Keras 3 model saved as '.keras'? "
                      "Name it with the '.keras' suffix.")


def _not_a_keras_archive(path: Path, other_formats: str) -> WeightsError:
  return WeightsError(f"{path}: not a Keras 3 '.keras' archive (those are zip files); it is damaged, truncated or "
                      f"of another format. Re-save it with model.save('x.keras'), or give the weights in another "
                      f"format {other_formats}.")


def _unreadable_hdf5(path: Path, error: Exception) -> WeightsError:
  return WeightsError(f"{path}: cannot read as an HDF5 weight file ({error}); the file is damaged, "
                      "truncated or of another format. Download or export it again.")


@dataclasses.dataclass(frozen=True)
class _Hdf5Probe:
  """What one opening of a weight file with h5py tells ``_read_source``."""

  open_error: OSError | None = None  # Why h5py cannot read it: another format, damaged or truncated.
  legacy_layers: LayerArrays | None = None  # Its arrays, if it is in the legacy Keras layout.
  # For another HDF5 file (a Keras 3 '.weights.h5'): the ImageNet alphas its 3x3x3 (Conv1) kernels fit,
  conv1_alphas: tuple[float, ...] = ()
  # and the groups of its nested models (a whole U-Net's file holds the MobileNetV2 as one of those).
  nested_models: tuple[str, ...] = ()


def _probe_hdf5(path: Path) -> _Hdf5Probe:
  """Opens ``path`` with h5py once for every check made before Keras reads it (each opening reads metadata).

  Raises:
    WeightsError: a legacy Keras file whose layers cannot be read (the other problems are noted in the
      result and reported by the reader the file's name selects).
  """
  import h5py  # Only needed for this file format.

  widths = set()

  def visit(_: str, item: Any) -> None:
    if isinstance(item, h5py.Dataset) and item.ndim == 4 and item.shape[:3] == (3, 3, 3):
      widths.add(item.shape[3])

  try:
    with h5py.File(path, "r") as f:
      group = _legacy_group(f)
      if group is not None:
        return _Hdf5Probe(legacy_layers=_read_legacy_group(group, path))
      try:
        f.visititems(visit)  # Metadata only; the alphas let a Keras load error say which alpha fits.
        top = f.get("layers")
        nested = tuple(f"layers/{name}" for name, item in (top.items() if isinstance(top, h5py.Group) else ())
                       if isinstance(item, h5py.Group) and isinstance(item.get("layers"), h5py.Group))
      except OSError:
        widths.clear()  # Only a hint: Keras reports the damage when it reads the file.
        nested = ()
  except OSError as e:  # Not HDF5 (a zip, text), damaged or truncated.
    return _Hdf5Probe(open_error=e)
  return _Hdf5Probe(conv1_alphas=tuple(a for a in IMAGENET_ALPHAS if make_divisible(32 * a) in widths),
                    nested_models=nested)


def encoder_template(alpha: float) -> Variables:
  """Shapes of ``MobileNetV2Encoder(alpha)`` variables (no computation)."""
  model = MobileNetV2Encoder(alpha)
  return jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3))))


def _convert_layers(layers: LayerArrays, template: Mapping[str, Any], source_desc: str,
                    alpha: float | None, keras_layout: Mapping[str, str] | None = None,
                    alpha_setting: str = _CONFIG_ALPHA) -> Variables:
  """Fills ``template`` ({'params': {layer: ...}, 'batch_stats': ...}) from Keras layer arrays.

  ``alpha_setting`` is what the error messages tell the user to change when the weights' alpha differs.
  """
  keras_layout = keras_layout or {}
  found_alpha = _infer_alpha(layers)
  hint = ""
  if alpha is not None and found_alpha is not None and found_alpha != alpha:
    hint = (f" The weights look like alpha={found_alpha}, but alpha={alpha} was asked for: set "
            f"{alpha_setting}={found_alpha}.")
  out: dict[str, dict[str, dict[str, np.ndarray]]] = {"params": {}, "batch_stats": {}}
  layer_names = sorted(set(template.get("params", {})) | set(template.get("batch_stats", {})),
                       key=_network_order)
  for layer in layer_names:
    if layer not in layers:
      raise WeightsError(f"{source_desc}: layer '{layer}' is missing from the weights.{hint}")
    for keras_var, array in layers[layer].items():
      collection, flax_var = _KERAS_TO_FLAX.get(keras_var, (None, None))
      if collection is None:
        raise WeightsError(f"{source_desc}: layer '{layer}' has an unknown variable '{keras_var}'.")
      if flax_var == "kernel" and layer.endswith("depthwise"):
        # Keras 2 names it 'depthwise_kernel', Keras 3 'kernel'.
        array = array.transpose(0, 1, 3, 2)  # (3, 3, C, 1) → (3, 3, 1, C)
      elif keras_var == "kernel" and keras_layout.get(layer) == "conv_transpose":
        array = array.transpose(0, 1, 3, 2)  # (3, 3, out, in) → (3, 3, in, out)
      expected = template[collection][layer][flax_var].shape
      if tuple(array.shape) != tuple(expected):
        keras_shape = layers[layer][keras_var].shape
        raise WeightsError(
            f"{source_desc}: layer '{layer}' variable '{keras_var}' has shape {tuple(keras_shape)} in the "
            f"weights but the model expects {tuple(expected)} (in Flax layout).{hint}")
      out[collection].setdefault(layer, {})[flax_var] = np.asarray(array, np.float32)
  for collection in ("params", "batch_stats"):
    for layer, variables in template.get(collection, {}).items():
      missing = set(variables) - set(out[collection].get(layer, {}))
      if missing:
        raise WeightsError(f"{source_desc}: layer '{layer}' lacks {sorted(missing)}.{hint}")
  return out


def encoder_variables_from_keras(source: Any, alpha: float, alpha_setting: str = _CONFIG_ALPHA) -> Variables:
  """Converts Keras MobileNetV2 weights into ``MobileNetV2Encoder(alpha)`` variables.

  Args:
    source: a Keras model (e.g. ``keras.applications.MobileNetV2(...)`` or a model containing it), a path
      to a Keras weight file (legacy ``.h5`` as ``keras.applications`` downloads it, Keras 3
      ``.weights.h5`` or ``.keras``) of a MobileNetV2 or of a model that nests one (the tutorial U-Net's
      ``save_weights``), or ``"imagenet"`` (downloads through ``keras.applications``).
    alpha: the encoder width the weights must fit.
    alpha_setting: where the user set ``alpha``, named by the error messages when the weights do not fit
      it (e.g. ``"--alpha"`` for ``scripts/convert_keras_weights.py``). Any other than the default (a
      training config's ``config.model.alpha``) also keeps the messages from offering what only a training
      config can take instead (``model.encoder_weights=None``, a converted ``.npz``).

  Returns:
    ``{"params": ..., "batch_stats": ...}`` as NumPy float32 arrays.

  Raises:
    WeightsError: naming the layer and both shapes on any mismatch, or the way out when unavailable.
  """
  desc = source if isinstance(source, (str, os.PathLike)) else f"Keras model '{getattr(source, 'name', '?')}'"
  layers = _read_source(source, alpha, alpha_setting)
  return _convert_layers(layers, encoder_template(alpha), str(desc), alpha, alpha_setting=alpha_setting)


def unet_variables_from_keras(keras_model: Any, alpha: float | None = None) -> Variables:
  """Converts a Keras model built as in the tutorial into ``UNet`` variables.

  The tutorial model is: the MobileNetV2 ``down_stack`` sub-model, four pix2pix ``upsample`` Sequentials
  (Conv2DTranspose → BatchNormalization [→ Dropout] → ReLU), and a last Conv2DTranspose with bias.
  The decoder layers are found in the model's (topological) layer order.
  """
  layers = read_keras_model(keras_model)
  alpha = alpha if alpha is not None else _infer_alpha(layers)
  if alpha is None:
    raise WeightsError("Cannot infer the encoder alpha from the Keras model; pass alpha=.")
  encoder = _convert_layers(layers, encoder_template(alpha), f"Keras model '{keras_model.name}'", alpha)
  blocks, last = _tutorial_decoder(keras_model)
  decoder: Variables = {"params": {}, "batch_stats": {}}
  for i, (conv, bn) in enumerate(blocks):
    gamma, beta, mean, var = (np.asarray(w) for w in bn.get_weights())
    decoder["params"][f"up_{i}"] = {
        "conv_transpose": {"kernel": np.asarray(conv.get_weights()[0]).transpose(0, 1, 3, 2)},
        "bn": {"scale": gamma, "bias": beta}}
    decoder["batch_stats"][f"up_{i}"] = {"bn": {"mean": mean, "var": var}}
  kernel, bias = last.get_weights()
  decoder["params"]["last"] = {"kernel": np.asarray(kernel).transpose(0, 1, 3, 2), "bias": np.asarray(bias)}
  return {collection: {"encoder": encoder[collection], "decoder": decoder[collection]}
          for collection in ("params", "batch_stats")}


def _tutorial_decoder(keras_model: Any) -> tuple[list[tuple[Any, Any]], Any]:
  """The (Conv2DTranspose, BatchNormalization) of each pix2pix upsample block of a Keras model built as in the
  tutorial, in the model's (topological) layer order, and its last Conv2DTranspose."""
  import keras

  upsample_blocks = [l for l in keras_model.layers
                     if isinstance(l, keras.Sequential)
                     and any(isinstance(s, keras.layers.Conv2DTranspose) for s in l.layers)]
  last = [l for l in keras_model.layers if isinstance(l, keras.layers.Conv2DTranspose)]
  if not upsample_blocks or len(last) != 1:
    raise WeightsError(
        f"Keras model '{keras_model.name}' is not built like the tutorial: expected upsample Sequentials "
        f"and one top-level Conv2DTranspose, found {len(upsample_blocks)} and {len(last)}.")
  blocks = [(next(s for s in block.layers if isinstance(s, keras.layers.Conv2DTranspose)),
             next(s for s in block.layers if isinstance(s, keras.layers.BatchNormalization)))
            for block in upsample_blocks]
  return blocks, last[0]


def unet_variables_to_keras(variables: Variables, keras_model: Any) -> None:
  """Sets a Keras model built as in the tutorial (``keras_reference.keras_unet``) to ``UNet`` variables.

  The inverse of ``unet_variables_from_keras``: each encoder layer by its Keras name, the decoder's blocks in
  order, kernels transposed back to Keras' layouts.

  Raises:
    WeightsError: the Keras model's layers or shapes are not the variables' (another alpha, decoder_filters
      or num_classes), naming the layer.
  """
  host = jax.device_get(variables)
  blocks, last = _tutorial_decoder(keras_model)
  decoder = {collection: host[collection]["decoder"] for collection in ("params", "batch_stats")}
  encoder = {collection: host[collection]["encoder"] for collection in ("params", "batch_stats")}
  num_blocks = sum(1 for name in decoder["params"] if name.startswith("up_"))
  if len(blocks) != num_blocks:
    raise WeightsError(f"Keras model '{keras_model.name}' has {len(blocks)} upsample blocks; the variables "
                       f"have {num_blocks} (decoder_filters).")
  decoder_layers = {id(layer) for pair in blocks for layer in pair} | {id(last)}
  encoder_layers: dict[str, Any] = {}

  def visit(layer: Any) -> None:
    children = getattr(layer, "layers", None)
    if children:  # The down_stack sub-model, or an upsample Sequential.
      for child in children:
        visit(child)
    elif layer.weights and id(layer) not in decoder_layers:
      encoder_layers[layer.name] = layer

  visit(keras_model)
  names = set(encoder["params"]) | set(encoder["batch_stats"])
  if set(encoder_layers) != names:
    differing = sorted(set(encoder_layers) ^ names)
    raise WeightsError(f"Keras model '{keras_model.name}' and the variables differ in encoder layers "
                       f"{differing[:5]}{' ...' if len(differing) > 5 else ''}: another architecture.")
  for name, layer in encoder_layers.items():
    _set_keras_layer(layer, {collection: encoder[collection].get(name, {}) for collection in encoder},
                     transpose_kernel=name.endswith("depthwise"))
  for i, (conv, bn) in enumerate(blocks):
    _set_keras_layer(conv, {"params": decoder["params"][f"up_{i}"]["conv_transpose"]}, transpose_kernel=True)
    _set_keras_layer(bn, {collection: decoder[collection][f"up_{i}"]["bn"] for collection in decoder})
  _set_keras_layer(last, {"params": decoder["params"]["last"]}, transpose_kernel=True)


def _set_keras_layer(layer: Any, arrays: Mapping[str, Mapping[str, Any]], transpose_kernel: bool = False) -> None:
  """``layer.set_weights`` from Flax ``{collection: {variable: array}}``, in the layer's variable order."""
  values = []
  for weight in layer.weights:
    keras_var = _var_name(weight.path if hasattr(weight, "path") else weight.name)
    collection, flax_var = _KERAS_TO_FLAX[keras_var]
    if flax_var not in arrays.get(collection, {}):
      raise WeightsError(f"Keras layer '{layer.name}': the variables have no {collection} '{flax_var}' for it.")
    value = np.asarray(arrays[collection][flax_var], np.float32)
    # Depthwise (3, 3, 1, C) → (3, 3, C, 1); transposed convolution (3, 3, in, out) → (3, 3, out, in).
    values.append(value.transpose(0, 1, 3, 2) if transpose_kernel and flax_var == "kernel" else value)
  try:
    layer.set_weights(values)
  except ValueError as e:  # Another shape: another alpha, decoder width or number of classes.
    raise WeightsError(f"Keras layer '{layer.name}': {_first_line(e)}") from None


def is_keras_file(path: str | os.PathLike) -> bool:
  """Whether ``path`` names a Keras model or weight file (``.keras``, ``.h5``, ``.hdf5``), not a directory."""
  return str(path).lower().endswith((".keras", ".h5", ".hdf5")) and not Path(path).is_dir()


def keras_file_image_size(path: str | os.PathLike) -> int | None:
  """The input size S of the S×S images a Keras model file was built for, where the file records it.

  A whole model saved by Keras (``.keras``, or ``.h5`` by ``model.save``) records its layers' config, the
  input layer's shape included; a weight file (``.weights.h5``, ``save_weights``) does not, and neither does
  a model built for any size: None then, as for a file that cannot be read (the weight reading says why).
  """
  path = Path(path)
  try:
    if zipfile.is_zipfile(path):
      with zipfile.ZipFile(path) as archive:
        model_config = json.loads(archive.read("config.json"))
    else:
      import h5py  # pylint: disable=g-import-not-at-top  # Only needed for this file format.
      with h5py.File(path, "r") as f:
        text = f.attrs.get("model_config")
      if text is None:
        return None
      model_config = json.loads(text if isinstance(text, str) else text.decode("utf-8"))
  except (OSError, KeyError, ValueError, zipfile.BadZipFile):
    return None
  section = model_config.get("config") if isinstance(model_config, dict) else None
  layers = section.get("layers") if isinstance(section, dict) else None
  for layer in layers if isinstance(layers, list) else []:
    if isinstance(layer, dict) and layer.get("class_name") == "InputLayer":
      layer_config = layer.get("config", {})
      # Keras 3 names it batch_shape; tf.keras 2, batch_input_shape: (None, S, S, 3).
      shape = layer_config.get("batch_shape") or layer_config.get("batch_input_shape")
      if isinstance(shape, list) and len(shape) == 4 and isinstance(shape[1], int) and shape[1] == shape[2]:
        return shape[1]
      return None
  return None


def unet_variables_from_keras_file(path: str | os.PathLike, alpha: float, num_classes: int = 3,
                                   decoder_filters: Sequence[int] = (512, 256, 128, 64)) -> Variables:
  """``UNet`` variables from a Keras file of the tutorial's whole U-Net (trained in Keras, say).

  Keras reads the file into the tutorial model built with these settings (``keras_reference.keras_unet``):
  the architecture comes from the settings, never from the file, so every file Keras loads weights from
  works — Keras 3's ``model.save("x.keras")``, ``model.save("x.h5")`` and ``model.save_weights("x.weights.h5")``,
  and tf.keras 2's ``.keras``, ``.h5`` and ``save_weights("x.h5")`` (Keras 3 cannot rebuild tf.keras 2's
  MobileNetV2 from its saved config).

  Raises:
    WeightsError: the file is missing or does not load into that model; the message names the file, the
      settings, and the alpha the file's first convolution fits, where it tells.
  """
  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"Keras U-Net file {path} {'is a directory' if path.is_dir() else 'does not exist'}.")
  from petseg_jax import keras_reference  # pylint: disable=g-import-not-at-top  # Imports Keras.

  # The problems Keras would report from deep inside (a damaged file, an encoder's file) are named first.
  name = path.name.lower()  # Keras reads lower-case suffixes only: it is given such a name below.
  if name.endswith(".keras"):
    if not zipfile.is_zipfile(path):
      raise _not_a_keras_archive(path, "(.h5, .weights.h5)")
    probe = _Hdf5Probe()
  elif zipfile.is_zipfile(path):
    raise _keras_archive_named_otherwise(path)
  else:
    try:
      probe = _probe_hdf5(path)
    except WeightsError:  # Its layers read only as a MobileNetV2's do not; Keras reads the U-Net below.
      probe = _Hdf5Probe()
    if probe.open_error is not None:
      raise _unreadable_hdf5(path, probe.open_error)
    if probe.legacy_layers is not None and not any("transpose" in layer for layer in probe.legacy_layers):
      raise WeightsError(f"{path}: holds no Conv2DTranspose layer, so no U-Net decoder: a MobileNetV2's weights? "
                         "Give those to model.encoder_weights.")
  settings = f"alpha={alpha}, decoder_filters={tuple(decoder_filters)}, num_classes={num_classes}"
  model = keras_reference.keras_unet(alpha, 128, num_classes, decoder_filters=tuple(decoder_filters))
  legacy_alpha = None if probe.legacy_layers is None else _infer_alpha(probe.legacy_layers)
  hint = _alpha_hint(probe.conv1_alphas if legacy_alpha is None else (legacy_alpha,), alpha)
  ending = next(end for end in (".weights.h5", ".keras", ".hdf5", ".h5") if name.endswith(end))
  # Keras reads a '.weights.h5' name as its own layout only: a legacy file saved under that name is given to it
  # as '.h5'.
  keras_ending = ".h5" if probe.legacy_layers is not None and ending == ".weights.h5" else ending
  with _named_for_keras(path, ending, keras_ending) as source:
    try:
      _keras_loading(lambda: model.load_weights(str(source)))
    except Exception as e:  # Keras raises ValueError, TypeError, KeyError, OSError... for files that do not fit.
      raise WeightsError(
          f"{path}: does not load into the tutorial U-Net with {settings} ({_first_line(e)}).{hint} Check "
          "config.model.alpha, config.model.decoder_filters and config.model.num_classes against the model "
          "that saved it.") from None
  return unet_variables_from_keras(model, alpha)


def save_encoder_variables(path: str | os.PathLike, variables: Variables, alpha: float) -> None:
  """Writes converted encoder variables as ``.npz`` (atomically: temporary file, then rename)."""
  flat = flax.traverse_util.flatten_dict(jax.device_get(variables), sep="/")
  path = Path(path)
  path.parent.mkdir(parents=True, exist_ok=True)  # As the other writers do (e.g. runs/encoder.npz).
  with files.atomic_output(path) as f:
    np.savez(f, **{_ALPHA_ENTRY: np.float64(alpha)}, **{k: np.asarray(v) for k, v in flat.items()})


def load_converted_encoder(path: str | os.PathLike, alpha: float) -> Variables:
  """Reads a ``.npz`` written by ``save_encoder_variables`` and checks it against ``alpha``."""
  path = Path(path)
  if not path.is_file():
    raise WeightsError(f"Converted encoder weight file {path} does not exist.")
  try:
    # The file handle is ours: np.load leaves its own open when the archive is unreadable.
    with open(path, "rb") as handle, np.load(handle) as data:
      file_alpha = float(data[_ALPHA_ENTRY]) if _ALPHA_ENTRY in data else None
      flat = {k: data[k] for k in data.files if k != _ALPHA_ENTRY}
  except (OSError, ValueError, EOFError, zipfile.BadZipFile) as e:  # Not a zip of .npy arrays, or cut short.
    raise WeightsError(
        f"{path}: cannot read as a converted encoder .npz ({type(e).__name__}: {e}); the file is damaged, "
        "truncated or not an .npz. Write it again with scripts/convert_keras_weights.py.") from None
  except TypeError:  # np.load returned a single array (no context manager): a '.npy' file named '.npz'.
    raise WeightsError(f"{path}: not an .npz archive (a single array?). Write it with "
                       "scripts/convert_keras_weights.py.") from None
  if file_alpha is not None and abs(file_alpha - alpha) > 1e-9:
    raise WeightsError(
        f"{path} holds alpha={file_alpha} encoder weights, but config.model.alpha={alpha}. Set "
        f"config.model.alpha={file_alpha} or use weights for alpha={alpha}.")
  variables = flax.traverse_util.unflatten_dict(flat, sep="/")
  template = flax.traverse_util.flatten_dict(encoder_template(alpha), sep="/")
  for key, leaf in template.items():
    if key not in flat:
      raise WeightsError(f"{path}: '{key}' is missing: not an encoder weight file of this model. Write one from "
                         "a Keras MobileNetV2 file with scripts/convert_keras_weights.py.")
    if flat[key].shape != leaf.shape:
      raise WeightsError(f"{path}: '{key}' has shape {flat[key].shape}, the model expects {leaf.shape}.")
  unexpected = sorted(set(flat) - set(template))
  if unexpected:  # Otherwise merge_encoder_variables fails later without naming the file or the array.
    raise WeightsError(f"{path}: holds {unexpected[:3]}{' ...' if len(unexpected) > 3 else ''}, which the "
                       f"alpha={alpha} encoder does not have; it is not a file written by "
                       "scripts/convert_keras_weights.py.")
  return variables


def load_encoder_variables(spec: str | None, alpha: float) -> Variables | None:
  """Resolves ``config.model.encoder_weights``: "imagenet" (any case), a Keras file, a converted .npz, or None/""."""
  if spec is None or spec == "" or str(spec).lower() == "none":
    return None
  if str(spec).lower().endswith(".npz"):
    return load_converted_encoder(spec, alpha)
  return encoder_variables_from_keras(spec, alpha)


def merge_encoder_variables(unet_variables: Variables, encoder_variables: Variables) -> Variables:
  """Returns ``unet_variables`` with the ``encoder`` subtree replaced by ``encoder_variables``."""
  merged = flax.core.unfreeze(unet_variables)
  merged = jax.tree.map(lambda x: x, dict(merged))
  for collection in ("params", "batch_stats"):
    expected = jax.tree.map(lambda x: x.shape, merged[collection]["encoder"])
    given = jax.tree.map(lambda x: x.shape, encoder_variables[collection])
    if expected != given:
      raise WeightsError("Encoder variables do not fit the model's encoder (check config.model.alpha).")
    merged[collection] = dict(merged[collection])
    # device_put, not jnp.asarray: that compiles one small program per distinct NumPy leaf shape.
    merged[collection]["encoder"] = jax.tree.map(jax.device_put, encoder_variables[collection])
  return merged
