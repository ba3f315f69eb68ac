"""The official tfds `oxford_iiit_pet`, prepared from the network or from archives placed by hand.

tfds' download manager first looks for `images.tar.gz` and `annotations.tar.gz` in the manual directory
(`config.data.manual_dir`, default `<tfds data dir>/downloads/manual`) and only downloads what is not there.
Offline, tfds would retry each download for minutes before failing, so the host is probed first and a clear
error with both ways out is raised at once.
"""

from __future__ import annotations

import os
import socket
import urllib.parse

from absl import logging
import tensorflow_datasets as tfds
from tensorflow_datasets.core.download import download_manager

from petseg_jax.data import folder_builder
from petseg_jax.data.errors import DataError

_DEFAULT_ARCHIVES = ("images.tar.gz", "annotations.tar.gz")
_HOMEPAGE = "https://www.robots.ox.ac.uk/~vgg/data/pets/"


def _network_available(hosts: list[str], timeout: float = 3.0) -> bool:
  """True if a TCP connection to one of `hosts` (port 443) opens within `timeout` seconds."""
  for host in hosts:
    try:
      with socket.create_connection((host, 443), timeout=timeout):
        return True
    except OSError:
      continue
  return False


def _archive_names(builder: tfds.core.DatasetBuilder) -> tuple[list[str], list[str]]:
  """(file names tfds looks for in the manual dir, download hosts) of a builder."""
  url_infos = getattr(type(builder), "url_infos", None) or {}
  names = [info.filename for info in url_infos.values() if getattr(info, "filename", None)]
  hosts = sorted({urllib.parse.urlparse(url).hostname for url in url_infos} - {None})
  return (names or list(_DEFAULT_ARCHIVES)), hosts


def _ways_out(name: str, manual_dir: str, archives: list[str]) -> str:
  return (f"Two ways out:\n"
          f"  1. Download {' and '.join(archives)} from {_HOMEPAGE} on a machine with network, put them in "
          f"{manual_dir} (or any folder, and set --config.data.manual_dir=<folder>) and run again; tfds "
          f"prepares {name} from them.\n"
          f"  2. Use an extracted copy instead: --config.data.source=folder --config.data.data_dir=<folder with "
          f"images/ and annotations/> (e.g. the bundled sample {folder_builder.BUNDLED_SAMPLE_DIR}"
          f"{_bundled_train_size()}).")


def _bundled_train_size() -> str:
  """What batch the bundled sample's train split takes, as a clause of the way out ("" if unreadable): the
  default config's batch of 64 is larger than the split."""
  try:
    count = len(folder_builder.read_split_list(
        os.path.join(folder_builder.BUNDLED_SAMPLE_DIR, "annotations", folder_builder.SPLIT_FILES["train"])))
  except DataError:
    return ""
  return f", whose {count} training images take --config.train.batch_size={count} or less"


def prepare_official_builder(name: str, *, data_dir: str = "", manual_dir: str = "") -> tfds.core.DatasetBuilder:
  """Returns the prepared tfds builder `name` (e.g. "oxford_iiit_pet:4.*.*"), preparing it if needed.

  Args:
    name: tfds dataset name with optional version.
    data_dir: tfds data dir ("" = $TFDS_DATA_DIR or ~/tensorflow_datasets).
    manual_dir: folder with the official archives ("" = <data_dir>/downloads/manual).

  Raises:
    DataError: unknown name/version, archives missing or wrong, offline with nothing placed.
  """
  data_dir = os.path.expanduser(data_dir) if data_dir else folder_builder.default_tfds_data_dir()
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except Exception as e:  # tfds raises several types for bad names/versions.
    raise DataError(f"config.data.tfds_name={name!r}: tfds cannot make this builder ({e}).") from e
  if builder.is_prepared():
    return builder
  archives, hosts = _archive_names(builder)
  default_manual = os.path.join(data_dir, "downloads", "manual")
  manual = os.path.expanduser(manual_dir) if manual_dir else default_manual
  present = [a for a in archives if os.path.isfile(os.path.join(manual, a))]
  if manual_dir and not os.path.isdir(manual):
    raise DataError(f"config.data.manual_dir={manual_dir!r} does not exist. It should hold "
                    f"{' and '.join(archives)} from {_HOMEPAGE}.")
  if len(present) < len(archives):
    missing = [a for a in archives if a not in present]
    if manual_dir:
      raise DataError(f"config.data.manual_dir={manual_dir!r} lacks {', '.join(missing)} "
                      f"(has: {', '.join(present) or 'none of them'}). Place the official archives from "
                      f"{_HOMEPAGE} there.")
    if not _network_available(hosts):
      raise DataError(f"tfds dataset {name} is not prepared in {data_dir}, and the download host "
                      f"{', '.join(hosts) or '?'} cannot be reached (offline?).\n"
                      + _ways_out(name, default_manual, archives))
  config = tfds.download.DownloadConfig(manual_dir=manual, try_download_gcs=not present)
  logging.info("Preparing %s in %s (archives found in %s: %s)", name, data_dir, manual, present or "none")
  try:
    builder.download_and_prepare(download_config=config)
  except download_manager.NonMatchingChecksumError as e:
    raise DataError(f"The archives in {manual} are not the official ones (size/sha256 differ from tfds' "
                    f"checksums): {e}\nRe-download them from {_HOMEPAGE}.") from e
  except OSError as e:
    # requests' ConnectionError is an OSError: the network went away mid-download.
    raise DataError(f"Preparing tfds dataset {name} failed: {e}\n" + _ways_out(name, default_manual, archives)
                    ) from e
  return builder
