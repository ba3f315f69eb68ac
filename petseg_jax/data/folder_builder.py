"""A tfds builder over an extracted Oxford-IIIT Pet folder in the official layout.

    <data_dir>/images/<name>.jpg               any image format (decoded by content)
    <data_dir>/annotations/trimaps/<name>.png  1 pet, 2 background, 3 border; same size as the image
    <data_dir>/annotations/trainval.txt        split "train": lines "<name> CLASS_ID SPECIES BREED_ID"
    <data_dir>/annotations/test.txt            split "test"

The folder is only read. The prepared tfds data goes to the tfds data dir (`TFDS_DATA_DIR`, default
`~/tensorflow_datasets`) as `pets_folder/<folder name>_<fingerprint>/1.0.0`: the fingerprint covers the
folder's absolute path, the split lists and the size and mtime of every listed file, so different folders
or changed contents get their own copy, and an unchanged folder is never rebuilt. Copies of a folder's earlier
contents are named in a warning when the new one is built, never deleted (a run may still be reading them).

Everything is validated by a fast pre-scan (file headers, trimaps) before the build starts, and problems are
reported all at once. The build itself decodes every image fully (truncation shows only there). tfds writes
into a temporary directory and renames it when done, so a failed build leaves nothing a later run would use.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import hashlib
import json
import logging as std_logging
import os
import re
from pathlib import Path
from typing import Iterator

from absl import logging
import tensorflow_datasets as tfds

from petseg_jax.data import decode
from petseg_jax.data.errors import DataError

BUNDLED_SAMPLE_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets",
                                  "pets_sample")

# Split name -> list file, as in tfds oxford_iiit_pet.
SPLIT_FILES = {"train": "trainval.txt", "test": "test.txt"}

EXPECTED_LAYOUT = """Expected layout (the official Oxford-IIIT Pet archives, extracted):
  <data_dir>/images/<name>.jpg               images (JPEG; other formats are decoded by content)
  <data_dir>/annotations/trimaps/<name>.png  trimaps: 1 pet, 2 background, 3 border; same size as the image
  <data_dir>/annotations/trainval.txt        split "train": one line per example, "<name> CLASS_ID SPECIES BREED_ID"
  <data_dir>/annotations/test.txt            split "test", same format
A small folder like this ships with the package: """ + BUNDLED_SAMPLE_DIR

# Breeds in the order of the official CLASS_IDs (1-based in the list files) and of tfds oxford_iiit_pet.
BREEDS = (
    "Abyssinian", "american_bulldog", "american_pit_bull_terrier", "basset_hound", "beagle", "Bengal",
    "Birman", "Bombay", "boxer", "British_Shorthair", "chihuahua", "Egyptian_Mau", "english_cocker_spaniel",
    "english_setter", "german_shorthaired", "great_pyrenees", "havanese", "japanese_chin", "keeshond",
    "leonberger", "Maine_Coon", "miniature_pinscher", "newfoundland", "Persian", "pomeranian", "pug",
    "Ragdoll", "Russian_Blue", "saint_bernard", "samoyed", "scottish_terrier", "shiba_inu", "Siamese",
    "Sphynx", "staffordshire_bull_terrier", "wheaten_terrier", "yorkshire_terrier",
)
SPECIES = ("Cat", "Dog")

# Bump when the stored content changes, so that old prepared copies are not reused.
_FORMAT_VERSION = "2"  # 2: 16-bit grayscale images scaled by their bit depth, not by their values.
_MAX_LISTED_PROBLEMS = 20


class _DropCustomConfigWarning(std_logging.Filter):
  """tfds warns 'Using custom data configuration' for every folder builder made; that is by design here."""

  def filter(self, record: std_logging.LogRecord) -> bool:
    return not str(record.msg).startswith("Using custom data configuration")


std_logging.getLogger("absl").addFilter(_DropCustomConfigWarning())


@dataclasses.dataclass(frozen=True)
class Entry:
  """One line of a split list."""
  name: str
  label: int  # 0-based breed index into BREEDS.
  species: int  # 0 cat, 1 dog.
  list_file: str
  line: int


@dataclasses.dataclass(frozen=True)
class Layout:
  """Validated paths of a folder in the official layout."""
  root: str
  images: str
  trimaps: str
  lists: dict[str, str]  # split -> list file

  def image_path(self, name: str) -> str:
    return os.path.join(self.images, name + ".jpg")

  def trimap_path(self, name: str) -> str:
    return os.path.join(self.trimaps, name + ".png")


def _layout_error(message: str) -> DataError:
  return DataError(f"{message}\n{EXPECTED_LAYOUT}")


def _check_listable(path: str, what: str) -> None:
  if not os.path.isdir(path):
    raise _layout_error(f"{what} {path} does not exist (or is not a folder).")
  try:
    os.listdir(path)
  except PermissionError as e:
    raise DataError(f"Cannot read the {what} {path}: permission denied. Make it readable "
                    f"(e.g. chmod -R a+rX {path}).\n{EXPECTED_LAYOUT}") from e
  except OSError as e:
    raise _layout_error(f"Cannot list the {what} {path}: {e.strerror or e}.") from e


def check_layout(data_dir: str) -> Layout:
  """Checks that `data_dir` has the official layout (folders, readable, split lists present and non-empty).

  Raises:
    DataError: naming the missing or unreadable path and showing the expected layout.
  """
  if not data_dir:
    raise _layout_error("config.data.data_dir is empty; source='folder' needs the path of an extracted "
                        "Oxford-IIIT Pet folder.")
  root = os.path.abspath(os.path.expanduser(data_dir))
  if not os.path.exists(root):
    raise _layout_error(f"config.data.data_dir={data_dir!r} does not exist ({root}).")
  _check_listable(root, "data folder")
  layout = Layout(root=root, images=os.path.join(root, "images"),
                  trimaps=os.path.join(root, "annotations", "trimaps"),
                  lists={s: os.path.join(root, "annotations", f) for s, f in SPLIT_FILES.items()})
  _check_listable(layout.images, "images folder")
  _check_listable(layout.trimaps, "trimaps folder")
  for split, path in layout.lists.items():
    if not os.path.isfile(path):
      raise _layout_error(f"The split list {path} (split {split!r}) is missing.")
  return layout


def _breed_from_name(name: str) -> int | None:
  """Official file names are '<Breed>_<n>'; returns the breed index or None."""
  prefix = re.sub(r"_\d+$", "", name)
  lower = {b.lower(): i for i, b in enumerate(BREEDS)}
  return lower.get(prefix.lower())


def _species(label: int) -> int:
  """0 (cat) or 1 (dog) of a breed: in the official naming cat breeds are capitalised, dog breeds lower case."""
  return 0 if BREEDS[label][0].isupper() else 1


def read_split_list(path: str) -> list[Entry]:
  """Parses a split list: '<name> CLASS_ID SPECIES BREED_ID' per line ('#' comments and blank lines skipped).

  A line with only a name is accepted when the name starts with a known breed ('<Breed>_<n>').

  Raises:
    DataError: unreadable, empty, malformed line or duplicate name (naming the file and line).
  """
  try:
    # utf-8-sig: lists saved by Windows editors start with a byte-order mark, which would stick to the first name.
    with open(path, encoding="utf-8-sig") as f:
      lines = f.read().splitlines()
  except (OSError, UnicodeDecodeError) as e:
    raise _layout_error(f"Cannot read the split list {path}: {e}.") from e
  entries, seen = [], {}
  for lineno, raw in enumerate(lines, start=1):
    line = raw.strip()
    if not line or line.startswith("#"):
      continue
    where = f"{path}, line {lineno}"
    tokens = line.split()
    name = tokens[0]
    if "/" in name or "\\" in name or name.lower().endswith((".jpg", ".jpeg")):
      raise DataError(f"{where}: {name!r} should be a bare image name like 'Abyssinian_1' (no folder, no .jpg).")
    if len(tokens) == 4:
      try:
        class_id, species_id, _ = int(tokens[1]), int(tokens[2]), int(tokens[3])
      except ValueError:
        raise DataError(f"{where}: expected '<name> CLASS_ID SPECIES BREED_ID' with integers, got {line!r}."
                        ) from None
      if not 1 <= class_id <= len(BREEDS):
        raise DataError(f"{where}: CLASS_ID {class_id} is not in 1..{len(BREEDS)}.")
      if species_id not in (1, 2):
        raise DataError(f"{where}: SPECIES {species_id} is not 1 (cat) or 2 (dog).")
      label, species = class_id - 1, species_id - 1
      # The ids go into the prepared records ("label", "species"): wrong ones would be silently wrong data.
      named = _breed_from_name(name)
      if named is not None and named != label:
        raise DataError(f"{where}: CLASS_ID {class_id} is {BREEDS[label]}, but {name!r} names {BREEDS[named]} "
                        f"(CLASS_ID {named + 1}).")
      if species != _species(label):
        raise DataError(f"{where}: SPECIES {species_id} does not fit CLASS_ID {class_id} ({BREEDS[label]}, a "
                        f"{'cat' if _species(label) == 0 else 'dog'}: SPECIES {_species(label) + 1}).")
    elif len(tokens) == 1:
      label = _breed_from_name(name)
      if label is None:
        raise DataError(f"{where}: {name!r} has no CLASS_ID/SPECIES and its name does not start with a known "
                        "breed; write '<name> CLASS_ID SPECIES BREED_ID' as in the official lists.")
      species = _species(label)
    else:
      raise DataError(f"{where}: expected '<name> CLASS_ID SPECIES BREED_ID', got {line!r}.")
    if name in seen:
      raise DataError(f"{where}: {name!r} is listed twice (first on line {seen[name]}).")
    seen[name] = lineno
    entries.append(Entry(name=name, label=label, species=species, list_file=path, line=lineno))
  if not entries:
    raise _layout_error(f"The split list {path} is empty (no example lines).")
  return entries


def _listing(problems: list[str]) -> str:
  """The first ``_MAX_LISTED_PROBLEMS`` problems, one per line, and how many more there are."""
  more = len(problems) - _MAX_LISTED_PROBLEMS
  return "\n  ".join(problems[:_MAX_LISTED_PROBLEMS]) + (f"\n  ... and {more} more" if more > 0 else "")


def check_splits_disjoint(splits: dict[str, list[Entry]]) -> None:
  """Raises DataError if an image is listed in more than one split list.

  Why: an image in both trainval.txt and test.txt is trained on and then scored as unseen, silently
  inflating the test metrics (the official lists are disjoint).
  """
  first: dict[str, Entry] = {}
  clashes = []
  for split in sorted(splits):
    for entry in splits[split]:
      other = first.setdefault(entry.name, entry)
      if other is not entry:
        clashes.append(f"{entry.name!r}: {other.list_file} line {other.line} and {entry.list_file} line "
                       f"{entry.line}")
  if clashes:
    raise DataError(f"{len(clashes)} image(s) listed in more than one split (a test image would be trained on):"
                    f"\n  {_listing(clashes)}\nRemove each from all but one of the split lists.")


def _stat_token(path: str) -> str:
  try:
    st = os.stat(path)
  except OSError:
    return "missing"
  return f"{st.st_size}:{st.st_mtime_ns}"


def fingerprint(layout: Layout, splits: dict[str, list[Entry]], skip_bad_examples: bool) -> str:
  """A key that changes when the folder, its split lists or any listed file (size/mtime) changes."""
  h = hashlib.sha256()
  h.update(f"v{_FORMAT_VERSION}|{layout.root}|skip={bool(skip_bad_examples)}\n".encode())
  for split in sorted(splits):
    with open(layout.lists[split], "rb") as f:
      h.update(f"{split}\n".encode() + f.read() + b"\n")
    for e in splits[split]:
      h.update(f"{e.name}|{_stat_token(layout.image_path(e.name))}|"
               f"{_stat_token(layout.trimap_path(e.name))}\n".encode())
  return h.hexdigest()[:16]


def config_name(layout: Layout, digest: str) -> str:
  """A readable, collision-free tfds config name: '<folder name>_<fingerprint>'."""
  slug = re.sub(r"[^a-z0-9]+", "_", os.path.basename(layout.root).lower()).strip("_")[:40] or "folder"
  return f"{slug}_{digest}"


def _case_hint(file_name: str, present_by_lower: dict[str, str]) -> str:
  """'; found X.JPG: rename it to x.jpg' when only the case of the name differs, else ''."""
  found = present_by_lower.get(file_name.lower())
  # Why: on Linux 'Bengal_1.JPG' is not 'Bengal_1.jpg'; a bare "missing" sends people looking for a lost file.
  return f"; found {found} instead: rename it to {file_name}" if found else ""


def _check_entry(layout: Layout, entry: Entry, images_present: set[str], trimaps_present: set[str],
                 present_by_lower: tuple[dict[str, str], dict[str, str]]) -> str | None:
  """Fast validity check of one example (headers + trimap); returns a problem message or None.

  `present_by_lower` maps lower-cased file names of the images and trimaps folders to the real names.
  """
  image_path, trimap_path = layout.image_path(entry.name), layout.trimap_path(entry.name)
  if entry.name + ".jpg" not in images_present:
    return (f"{image_path}: missing image (listed in {os.path.basename(entry.list_file)} line {entry.line})"
            + _case_hint(entry.name + ".jpg", present_by_lower[0]))
  if entry.name + ".png" not in trimaps_present:
    return (f"{trimap_path}: missing trimap for image {image_path}"
            + _case_hint(entry.name + ".png", present_by_lower[1]))
  try:
    header = decode.read_header(image_path)
    trimap = decode.load_trimap(trimap_path)
  except DataError as e:
    return str(e)
  if trimap.shape != (header.height, header.width):
    return (f"{trimap_path}: trimap is {trimap.shape[1]}x{trimap.shape[0]} (WxH) but its image "
            f"{image_path} is {header.width}x{header.height}")
  return None


def _num_threads() -> int:
  return min(8, (os.cpu_count() or 1) + 2)


def prescan(layout: Layout, splits: dict[str, list[Entry]], *,
            skip_bad_examples: bool) -> dict[str, list[Entry]]:
  """Validates every listed example before any build work; returns the usable entries per split.

  Raises:
    DataError: listing every problem found (unless skip_bad_examples, which logs one warning per file).
  """
  images_present = set(os.listdir(layout.images))
  trimaps_present = set(os.listdir(layout.trimaps))
  by_lower = ({f.lower(): f for f in images_present}, {f.lower(): f for f in trimaps_present})
  kept, problems = {}, []
  with concurrent.futures.ThreadPoolExecutor(_num_threads()) as pool:
    for split, entries in splits.items():
      results = pool.map(lambda e: _check_entry(layout, e, images_present, trimaps_present, by_lower), entries)
      kept[split] = []
      for entry, problem in zip(entries, results):
        if problem is None:
          kept[split].append(entry)
        else:
          problems.append(problem)
  if problems and not skip_bad_examples:
    raise DataError(f"{len(problems)} bad example(s) in {layout.root}:\n  {_listing(problems)}\n"
                    "Fix or remove them (and their lines in the split lists), or set "
                    "config.data.skip_bad_examples=True to skip them with a warning.")
  for problem in problems:
    logging.warning("Skipping bad example: %s", problem)
  for split, entries in kept.items():
    if not entries:
      raise DataError(f"Split {split!r} of {layout.root} has no usable examples "
                      f"(all {len(splits[split])} were bad).")
  if problems:
    total = sum(len(v) for v in splits.values())
    logging.warning("Skipped %d of %d examples of %s in the pre-scan.", len(problems), total, layout.root)
  return kept


def _encode_example(layout: Layout, entry: Entry) -> dict:
  """Fully decodes one example and returns its tfds record (raises DataError for corrupt files)."""
  image_path, trimap_path = layout.image_path(entry.name), layout.trimap_path(entry.name)
  with open(image_path, "rb") as f:
    data = f.read()
  rgb, header = decode.decode_image_and_header(data, image_path)
  trimap = decode.load_trimap(trimap_path)
  if trimap.shape != rgb.shape[:2]:
    raise DataError(f"{trimap_path}: trimap is {trimap.shape[1]}x{trimap.shape[0]} (WxH) but its image "
                    f"{image_path} is {rgb.shape[1]}x{rgb.shape[0]}")
  # Plain RGB JPEGs are stored as they are (no re-encoding loss), once TensorFlow's decoder, which reads them
  # in the pipeline, accepts them; anything else (GIF, PNG, CMYK, grayscale...) as a lossless PNG of its RGB
  # conversion, so tf.image.decode_image sees only formats it decodes right.
  if header.format == "JPEG" and header.mode == "RGB":
    decode.decode_jpeg_as_the_pipeline_does(data, image_path, rgb.shape)
    image_bytes = data
  else:
    image_bytes = decode.encode_png(rgb)
  return {
      "image": image_bytes,
      "segmentation_mask": decode.encode_png(trimap),
      "file_name": entry.name + ".jpg",
      "label": entry.label,
      "species": entry.species,
  }


class PetsFolder(tfds.core.GeneratorBasedBuilder):
  """Oxford-IIIT Pet from an extracted folder in the official layout (see module docstring)."""

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Folder in the official Oxford-IIIT Pet layout, validated, decoded by content."}

  def __init__(self, *, layout: Layout | None = None, entries: dict[str, list[Entry]] | None = None,
               skip_bad_examples: bool = False, **kwargs):
    # layout/entries are only needed to build; a prepared copy is read from the tfds data dir.
    self._layout = layout
    self._entries = entries
    self._skip_bad_examples = skip_bad_examples
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description="Oxford-IIIT Pet (Parkhi et al., CVPR 2012) read from an extracted folder.",
        features=tfds.features.FeaturesDict({
            # Stored bytes are JPEG or PNG; tf.image.decode_image reads either.
            "image": tfds.features.Image(shape=(None, None, 3)),
            "segmentation_mask": tfds.features.Image(shape=(None, None, 1), use_colormap=True),
            "file_name": tfds.features.Text(),
            "label": tfds.features.ClassLabel(names=BREEDS),
            "species": tfds.features.ClassLabel(names=SPECIES),
        }),
        supervised_keys=("image", "label"),
        homepage="https://www.robots.ox.ac.uk/~vgg/data/pets/",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Nothing to download.
    if self._layout is None or self._entries is None:
      raise DataError(f"pets_folder/{self.builder_config.name} is not prepared and has no source folder; "
                      "use petseg_jax.data.folder_builder.prepare_folder_builder().")
    return {split: self._generate_examples(split) for split in self._entries}

  def _generate_examples(self, split: str) -> Iterator[tuple[str, dict]]:
    entries = self._entries[split]
    skipped = 0
    chunk = 4 * _num_threads()
    # PIL decodes without the GIL: a few threads keep both cores busy with the full decode.
    with concurrent.futures.ThreadPoolExecutor(_num_threads()) as pool:
      for start in range(0, len(entries), chunk):
        batch = entries[start:start + chunk]
        futures = [pool.submit(_encode_example, self._layout, e) for e in batch]
        for entry, future in zip(batch, futures):
          try:
            record = future.result()
          except DataError as e:
            if not self._skip_bad_examples:
              raise DataError(f"{e}\nFix or remove the file (and its line in "
                              f"{os.path.basename(entry.list_file)}), or set config.data.skip_bad_examples=True."
                              ) from None
            logging.warning("Skipping bad example: %s", e)
            skipped += 1
            continue
          yield entry.name, record
    if skipped:
      logging.warning("Skipped %d of %d examples of split %r of %s while decoding.", skipped, len(entries), split,
                      self._layout.root)
    if skipped == len(entries):
      raise DataError(f"Split {split!r} of {self._layout.root} has no usable examples (all were bad).")


def default_tfds_data_dir() -> str:
  """The tfds data dir: $TFDS_DATA_DIR (read now, not at import) or tfds' default (~/tensorflow_datasets)."""
  return os.path.expanduser(os.environ.get("TFDS_DATA_DIR") or tfds.core.constants.DATA_DIR)


def prepare_folder_builder(data_dir: str, *, skip_bad_examples: bool = False,
                           tfds_data_dir: str | None = None) -> PetsFolder:
  """Returns the prepared tfds builder for an official-layout folder (building it once if needed).

  Args:
    data_dir: the extracted folder (may be read-only).
    skip_bad_examples: skip bad files with a warning instead of failing.
    tfds_data_dir: where prepared data goes; default `default_tfds_data_dir()`.

  Raises:
    DataError: layout problems or bad examples, naming the path and the problem.
  """
  layout = check_layout(data_dir)
  splits = {split: read_split_list(path) for split, path in layout.lists.items()}
  check_splits_disjoint(splits)
  name = config_name(layout, fingerprint(layout, splits, skip_bad_examples))
  root = tfds_data_dir or default_tfds_data_dir()

  def make_builder(entries=None) -> PetsFolder:
    config = tfds.core.BuilderConfig(name=name, description=_description(layout))
    return PetsFolder(layout=layout, entries=entries, skip_bad_examples=skip_bad_examples, config=config,
                      data_dir=root)

  builder = make_builder()
  if builder.is_prepared():
    return builder
  kept = prescan(layout, splits, skip_bad_examples=skip_bad_examples)
  builder = make_builder(kept)
  logging.info("Preparing %s from %s into %s", name, layout.root, builder.data_dir)
  try:
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  except DataError:
    raise
  except Exception:
    # Another process may have finished the same build first (tfds renames its temporary dir at the end).
    if make_builder().is_prepared():
      return make_builder()
    raise
  # The copy with the other skip_bad_examples setting is current too; any other copy of this folder is of
  # contents it no longer has.
  current = {name, config_name(layout, fingerprint(layout, splits, not skip_bad_examples))}
  earlier = [copy for copy in prepared_copies(root, layout) if copy.name not in current]
  if earlier:
    size_mb = sum(f.stat().st_size for copy in earlier for f in copy.rglob("*") if f.is_file()) / 2**20
    logging.warning(
        "%d earlier prepared copies of %s (%.0f MB: of earlier contents, or of an earlier petseg_jax) remain in "
        "%s: %s. Runs on the folder as it is now do not use them; delete them once no run started before the "
        "change still reads them.", len(earlier), layout.root, size_mb, earlier[0].parent,
        ", ".join(copy.name for copy in earlier))
  return builder


def _description(layout: Layout) -> str:
  return f"Folder {layout.root}"  # Recorded in each copy's dataset_info.json: how prepared_copies finds them.


def prepared_copies(tfds_data_dir: str | os.PathLike, layout: Layout) -> list[Path]:
  """The prepared copies of ``layout``'s folder in ``tfds_data_dir`` (``pets_folder/<config>``), any contents."""
  copies = []
  for info in sorted(Path(tfds_data_dir).glob(f"{PetsFolder.name}/*/{PetsFolder.VERSION}/dataset_info.json")):
    try:
      description = json.loads(info.read_text()).get("configDescription")
    except (OSError, ValueError):  # Being written or removed by another process: not a copy to report.
      continue
    if description == _description(layout):
      copies.append(info.parent.parent)
  return copies

