"""Decoding of images and trimaps by content, with errors that name the file.

Real Oxford-IIIT Pet files are messy: some `.jpg` files are GIFs or RGBA PNGs, some JPEGs are grayscale or
CMYK. Everything here decodes by content (PIL), never by file extension, and returns RGB uint8. Broken
files raise `DataError` naming the file and the problem instead of a deep library traceback.

EXIF orientation is deliberately ignored by the loaders: the trimaps are aligned with the stored pixel grid.
``exif_orientation`` and ``turn_upright`` turn an image (and its trimap) as viewers show it, for prediction
on photos (``inference.predict_files``).
"""

from __future__ import annotations

import dataclasses
import io
import os
from typing import Union

import numpy as np
from PIL import Image
from PIL import UnidentifiedImageError

from petseg_jax.data.errors import DataError

PathLike = Union[str, os.PathLike]

# Trimap values of the Oxford-IIIT Pet annotations: 1 pet, 2 background, 3 border ("not classified").
TRIMAP_VALUES = (1, 2, 3)


@dataclasses.dataclass(frozen=True)
class ImageHeader:
  """What the header of an image file says, read without decoding the pixels."""
  format: str  # PIL format name: "JPEG", "PNG", "GIF", ...
  mode: str  # PIL mode: "RGB", "L", "CMYK", "P", "RGBA", ...
  width: int
  height: int


def _describe_unreadable(data: bytes) -> str:
  """Explains why bytes are not a recognisable image."""
  if not data:
    return "the file is empty (0 bytes)"
  head = data[:64]
  for magic, fmt in ((b"\xff\xd8\xff", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP")):
    if head.startswith(magic):
      return f"corrupt {fmt} file: it starts like a {fmt} but its header cannot be parsed"
  if all(32 <= b < 127 or b in (9, 10, 13) for b in head):
    return f"not an image: it is text starting with {head[:32].decode('ascii', 'replace')!r}"
  return f"not a recognisable image (first bytes {head[:8]!r})"


def _too_large(name: str, error: Image.DecompressionBombError) -> DataError:
  # PIL refuses images above ~179M pixels at open; its error is no OSError and names no file.
  return DataError(f"{name}: the header claims an image too large to decode ({error}); a corrupt header or a "
                   "scan far larger than a photo: fix or remove the file")


def read_header(path: PathLike) -> ImageHeader:
  """Reads format, mode and size of an image file without decoding its pixels (fast).

  Raises:
    DataError: the file is missing, empty or not an image.
  """
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      data = f.read(1 << 16)
  except FileNotFoundError as e:
    raise DataError(f"{path}: file not found") from e
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from e
  if not data:
    raise DataError(f"{path}: {_describe_unreadable(data)}")
  try:
    with Image.open(path) as im:
      return ImageHeader(format=im.format or "?", mode=im.mode, width=im.width, height=im.height)
  except UnidentifiedImageError as e:
    raise DataError(f"{path}: {_describe_unreadable(data)}") from e
  except Image.DecompressionBombError as e:
    raise _too_large(path, e) from e
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{path}: corrupt image header ({e})") from e


def _open_fully(data: bytes, name: str) -> Image.Image:
  """Opens and fully decodes image bytes (truncation is only detected by decoding every pixel)."""
  if not data:
    raise DataError(f"{name}: {_describe_unreadable(data)}")
  try:
    im = Image.open(io.BytesIO(data))
  except UnidentifiedImageError as e:
    raise DataError(f"{name}: {_describe_unreadable(data)}") from e
  except Image.DecompressionBombError as e:
    raise _too_large(name, e) from e
  except (OSError, SyntaxError, ValueError) as e:
    raise DataError(f"{name}: corrupt image header ({e})") from e
  try:
    im.load()
  except (OSError, SyntaxError, ValueError, EOFError) as e:
    raise DataError(f"{name}: corrupt or truncated {im.format} image ({e})") from e
  return im


def _to_rgb(im: Image.Image, name: str) -> np.ndarray:
  """Converts any PIL image mode to uint8 RGB (H, W, 3). Alpha is dropped, as tfds oxford_iiit_pet does."""
  mode = im.mode
  if mode.startswith("I;16") or (mode == "I" and im.format == "PNG"):
    # 16-bit grayscale (a PNG holds nothing wider): the top 8 bits, whatever the values. Taking small values
    # as 8-bit levels instead would turn a dark photo bright.
    arr = (np.asarray(im).astype(np.uint32) >> 8).astype(np.uint8)
    return np.repeat(arr[..., None], 3, axis=-1)
  if mode == "I":
    raise DataError(f"{name}: 32-bit integer images ({im.format}, PIL mode I) have no fixed range to scale to "
                    "8 bits; convert it to an 8-bit RGB or grayscale image")
  if mode == "F":
    raise DataError(f"{name}: floating-point images (PIL mode F) are not supported; convert to 8-bit RGB")
  if mode == "P" or mode == "PA":
    im = im.convert("RGBA")  # Resolves the palette (and a transparent index) first.
  if im.mode != "RGB":
    # CMYK (Adobe-inverted or not: PIL's JPEG decoder handles the inversion), L, LA, RGBA, YCbCr, 1, ...
    im = im.convert("RGB")
  arr = np.asarray(im, dtype=np.uint8)
  if arr.ndim != 3 or arr.shape[-1] != 3:
    raise DataError(f"{name}: could not convert mode {mode} to RGB (got shape {arr.shape})")
  return np.ascontiguousarray(arr)


def decode_image_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes image bytes of any format PIL knows to uint8 RGB (H, W, 3).

  Args:
    data: the encoded file content.
    name: the file name, used in error messages.

  Raises:
    DataError: empty, not an image, corrupt or truncated.
  """
  im = _open_fully(data, name)
  try:
    return _to_rgb(im, name)
  finally:
    im.close()


def decode_image_and_header(data: bytes, name: str = "<bytes>") -> tuple[np.ndarray, ImageHeader]:
  """Like `decode_image_bytes`, and also returns the header (original format/mode) of the file."""
  im = _open_fully(data, name)
  try:
    header = ImageHeader(format=im.format or "?", mode=im.mode, width=im.width, height=im.height)
    return _to_rgb(im, name), header
  finally:
    im.close()


def _read_bytes(path: PathLike) -> bytes:
  path = os.fspath(path)
  try:
    with open(path, "rb") as f:
      return f.read()
  except FileNotFoundError as e:
    raise DataError(f"{path}: file not found") from e
  except IsADirectoryError as e:
    raise DataError(f"{path}: is a directory, expected an image file") from e
  except OSError as e:
    raise DataError(f"{path}: cannot read ({e.strerror or e})") from e


# EXIF orientation (tag 0x0112) → the PIL transpose that shows the image upright (PIL's ImageOps.exif_transpose).
EXIF_ORIENTATION_TAG = 0x0112
_UPRIGHT = {2: Image.Transpose.FLIP_LEFT_RIGHT, 3: Image.Transpose.ROTATE_180, 4: Image.Transpose.FLIP_TOP_BOTTOM,
            5: Image.Transpose.TRANSPOSE, 6: Image.Transpose.ROTATE_270, 7: Image.Transpose.TRANSVERSE,
            8: Image.Transpose.ROTATE_90}


def exif_orientation(path: PathLike) -> int:
  """The EXIF orientation of an image file (1-8; 1, as stored, where it has none or it cannot be read)."""
  try:
    with Image.open(path) as image:
      orientation = image.getexif().get(EXIF_ORIENTATION_TAG, 1)
  except (OSError, UnidentifiedImageError, ValueError, SyntaxError):  # The loaders report unreadable files.
    return 1
  return orientation if orientation in _UPRIGHT else 1


def turn_upright(array: np.ndarray, orientation: int) -> np.ndarray:
  """``array`` (H, W) or (H, W, C), turned as EXIF ``orientation`` says to show it (as image viewers do)."""
  if orientation not in _UPRIGHT:
    return array
  if array.ndim == 3 and array.shape[-1] == 1:
    return turn_upright(array[..., 0], orientation)[..., None]
  return np.asarray(Image.fromarray(array).transpose(_UPRIGHT[orientation]))


def load_image(path: PathLike) -> np.ndarray:
  """Loads an image file as uint8 RGB (H, W, 3), decoded by content (JPEG, PNG, GIF, CMYK, grayscale...).

  Gives exactly the pixels the input pipeline gets for the same file: plain RGB JPEGs (stored as they are by
  the tfds builders) are decoded by TensorFlow's JPEG decoder, whose output differs from PIL's by a few
  levels; every other file is converted by PIL, as the folder builder stores it.

  Raises:
    DataError: missing, empty, not an image, corrupt or truncated; the message names the file.
  """
  data = _read_bytes(path)
  rgb, header = decode_image_and_header(data, os.fspath(path))
  if header.format == "JPEG" and header.mode == "RGB":
    return decode_jpeg_as_the_pipeline_does(data, os.fspath(path), rgb.shape)
  return rgb


def decode_jpeg_as_the_pipeline_does(data: bytes, name: str, shape: tuple[int, ...]) -> np.ndarray:
  """uint8 RGB of a plain RGB JPEG, decoded by TensorFlow's decoder as the input pipeline decodes it.

  PIL's decoder tolerates some corrupt data that TensorFlow's refuses: checked here, where the file is
  known, not mid-epoch in a tf.data error that names no file.

  Raises:
    DataError: TensorFlow cannot decode ``data``, or decodes it to another size than ``shape`` (PIL's).
  """
  import tensorflow as tf  # pylint: disable=g-import-not-at-top  (only needed here)
  try:
    rgb = tf.io.decode_image(data, channels=3, expand_animations=False).numpy()
  except tf.errors.InvalidArgumentError:
    raise DataError(f"{name}: corrupt JPEG data: TensorFlow's JPEG decoder, which the input pipeline uses, "
                    "refuses it (PIL reads it with errors); replace the file with a good copy") from None
  if rgb.shape != tuple(shape):
    raise DataError(f"{name}: TensorFlow decodes this JPEG to {rgb.shape}, PIL to {tuple(shape)}: corrupt data; "
                    "replace the file with a good copy")
  return rgb


def decode_trimap_bytes(data: bytes, name: str = "<bytes>") -> np.ndarray:
  """Decodes an Oxford-IIIT Pet trimap to uint8 (H, W) with values in {1, 2, 3}.

  Grayscale and palette PNGs give their stored values (palette indices, as the tfds colormap images do);
  an RGB trimap is accepted only if it is gray (all channels equal).

  Raises:
    DataError: unreadable, or values outside {1, 2, 3} (the message names the values and a pixel).
  """
  im = _open_fully(data, name)
  try:
    mode = im.mode
    if mode in ("L", "P"):
      arr = np.asarray(im, dtype=np.uint8)
    elif mode in ("I;16", "I;16B", "I;16L", "I"):
      arr = np.asarray(im).astype(np.int64)
      if arr.max() > 255:
        raise DataError(f"{name}: trimap values up to {arr.max()}; expected 1 (pet), 2 (background), 3 (border)")
      arr = arr.astype(np.uint8)
    elif mode in ("RGB", "RGBA", "LA"):
      rgb = np.asarray(im.convert("RGB"), dtype=np.uint8)
      if not (np.array_equal(rgb[..., 0], rgb[..., 1]) and np.array_equal(rgb[..., 0], rgb[..., 2])):
        raise DataError(f"{name}: trimap is a colour ({mode}) image; expected a single-channel PNG with values "
                        "1 (pet), 2 (background), 3 (border)")
      arr = rgb[..., 0]
    else:
      raise DataError(f"{name}: trimap has unsupported image mode {mode}; expected a single-channel PNG with "
                      "values 1 (pet), 2 (background), 3 (border)")
  finally:
    im.close()
  check_trimap_values(arr, name)
  return np.ascontiguousarray(arr)


def check_trimap_values(trimap: np.ndarray, name: str) -> None:
  """Raises DataError unless every value of `trimap` is 1, 2 or 3."""
  bad = (trimap < 1) | (trimap > 3)
  if bad.any():
    values = sorted(int(v) for v in np.unique(trimap[bad]))
    y, x = (int(i) for i in np.argwhere(bad)[0])
    raise DataError(f"{name}: trimap values {values} are outside {{1 pet, 2 background, 3 border}} "
                    f"({int(bad.sum())} pixels, first at row {y}, column {x})")


def load_trimap(path: PathLike) -> np.ndarray:
  """Loads a trimap PNG as uint8 (H, W) with values in {1, 2, 3}; DataError names the file otherwise."""
  return decode_trimap_bytes(_read_bytes(path), os.fspath(path))


def encode_png(array: np.ndarray) -> bytes:
  """Losslessly encodes uint8 (H, W), (H, W, 1) or (H, W, 3) as PNG bytes."""
  if array.ndim == 3 and array.shape[-1] == 1:
    array = array[..., 0]
  buf = io.BytesIO()
  # Level 1: these bytes are written once and decoded every epoch before caching; speed beats size.
  Image.fromarray(array).save(buf, format="PNG", compress_level=1)
  return buf.getvalue()
