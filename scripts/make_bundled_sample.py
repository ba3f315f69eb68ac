"""Makes the bundled offline sample `petseg_jax/assets/pets_sample/` from an Oxford-IIIT Pet folder.

Picks breeds round-robin (so cats and dogs of many breeds appear) from the official split lists, downscales
images so the shorter side is 160 px (JPEG quality 90) and trimaps with nearest neighbour (labels stay 1/2/3),
and copies the original list lines.

  python scripts/make_bundled_sample.py --source ../shared/data/oxford_iiit_pet_sample
"""

from __future__ import annotations

import collections
import os
from pathlib import Path
import re
import shutil
import sys

# This checkout's package (its assets/ is the default --output), not another installed copy.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags
from PIL import Image

from petseg_jax.data import decode
from petseg_jax.data import folder_builder

_SOURCE = flags.DEFINE_string("source", "../shared/data/oxford_iiit_pet_sample",
                              "Oxford-IIIT Pet folder in the official layout.")
_OUTPUT = flags.DEFINE_string("output", folder_builder.BUNDLED_SAMPLE_DIR, "Folder to (re)create.")
_NUM_TRAIN = flags.DEFINE_integer("num_train", 48, "Examples taken from trainval.txt.")
_NUM_TEST = flags.DEFINE_integer("num_test", 24, "Examples taken from test.txt.")
_SHORT_SIDE = flags.DEFINE_integer("short_side", 160, "Shorter image side after downscaling.")
_QUALITY = flags.DEFINE_integer("quality", 90, "JPEG quality.")

LICENSE = """# Bundled sample of the Oxford-IIIT Pet Dataset

A small downscaled subset ({num_train} trainval + {num_test} test image/trimap pairs) of the
**Oxford-IIIT Pet Dataset**, O. M. Parkhi, A. Vedaldi, A. Zisserman and C. V. Jawahar,
"Cats and Dogs", IEEE Conference on Computer Vision and Pattern Recognition (CVPR), 2012.
https://www.robots.ox.ac.uk/~vgg/data/pets/

* Annotations (trimaps, split lists) are licensed under the Creative Commons Attribution-ShareAlike 4.0
  International License (CC BY-SA 4.0), https://creativecommons.org/licenses/by-sa/4.0/ .
* The copyright of the images remains with the original owners of the images.

Changes: images downscaled so that the shorter side is {short_side} px (JPEG quality {quality}); trimaps
downscaled with nearest-neighbour sampling (values stay 1 pet, 2 background, 3 border); split lists keep the
original lines of the chosen examples. Made by `scripts/make_bundled_sample.py`. It is only meant for the
offline quickstart and tests, not for reporting results.
"""


def _breed(name: str) -> str:
  return re.sub(r"_\d+$", "", name)


def pick(entries: list[folder_builder.Entry], num: int, source: str) -> list[folder_builder.Entry]:
  """Round-robin over breeds (sorted names within a breed); only plain RGB JPEGs (keep the sample clean)."""
  by_breed = collections.defaultdict(list)
  for e in sorted(entries, key=lambda e: e.name):
    header = decode.read_header(os.path.join(source, "images", e.name + ".jpg"))
    if header.format == "JPEG" and header.mode == "RGB":
      by_breed[_breed(e.name)].append(e)
  chosen, round_ = [], 0
  while len(chosen) < num and any(len(v) > round_ for v in by_breed.values()):
    for breed in sorted(by_breed, key=str.lower):
      if len(by_breed[breed]) > round_ and len(chosen) < num:
        chosen.append(by_breed[breed][round_])
    round_ += 1
  return chosen


def _downscale(size: tuple[int, int], short_side: int) -> tuple[int, int]:
  w, h = size
  scale = min(1.0, short_side / min(w, h))
  return max(1, round(w * scale)), max(1, round(h * scale))


def main(argv):
  del argv
  source, output = os.path.abspath(_SOURCE.value), os.path.abspath(_OUTPUT.value)
  layout = folder_builder.check_layout(source)
  if os.path.exists(output):
    shutil.rmtree(output)
  os.makedirs(os.path.join(output, "images"))
  os.makedirs(os.path.join(output, "annotations", "trimaps"))
  for split, num in (("train", _NUM_TRAIN.value), ("test", _NUM_TEST.value)):
    entries = folder_builder.read_split_list(layout.lists[split])
    chosen = pick(entries, num, source)
    with open(layout.lists[split], encoding="utf-8") as f:
      lines = f.read().splitlines()
    with open(os.path.join(output, "annotations", folder_builder.SPLIT_FILES[split]), "w") as f:
      for e in chosen:
        f.write(lines[e.line - 1].strip() + "\n")
    for e in chosen:
      image = Image.open(layout.image_path(e.name)).convert("RGB")
      trimap = Image.open(layout.trimap_path(e.name))
      size = _downscale(image.size, _SHORT_SIDE.value)
      image.resize(size, Image.Resampling.LANCZOS).save(
          os.path.join(output, "images", e.name + ".jpg"), quality=_QUALITY.value)
      trimap.resize(size, Image.Resampling.NEAREST).save(
          os.path.join(output, "annotations", "trimaps", e.name + ".png"), optimize=True)
    print(f"{split}: {len(chosen)} examples, {len({_breed(e.name) for e in chosen})} breeds, "
          f"{sum(e.species == 0 for e in chosen)} cats")
  with open(os.path.join(output, "LICENSE.md"), "w") as f:
    f.write(LICENSE.format(num_train=_NUM_TRAIN.value, num_test=_NUM_TEST.value, short_side=_SHORT_SIDE.value,
                           quality=_QUALITY.value))
  total = sum(os.path.getsize(os.path.join(d, n)) for d, _, names in os.walk(output) for n in names)
  print(f"Wrote {output}: {total / 1e6:.2f} MB")


if __name__ == "__main__":
  app.run(main)
