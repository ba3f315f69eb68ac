"""The tutorial recipe (configs/default.py) vs the recommended one (configs/best.py), on held-out pets.

Also the first recipe tried (fine-tuned encoder, batch 16, cosine, 12 epochs), which lost to the tutorial.

Unlike the ablation sweeps, this one trains on the whole train split (trainval) and evaluates on the test
split, which no sweep looked at. Run it with the tutorial config as the base:

    python scripts/ablate.py --config configs/default.py --sweep sweeps/best_vs_default.py --workdir runs/bvd
    python scripts/ablate.py --config configs/default.py --sweep sweeps/best_vs_default.py:tfds --workdir ...
"""

from configs import best
from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  _common.check_where(where)
  if where == "sample":
    data = {"data.source": "folder", "data.data_dir": str(_common.SAMPLE_DIR)}
  else:
    data = {"data.source": "tfds", "data.data_dir": ""}
  return {
      "seeds": [0] if where == "sample" else [0, 1, 2],
      "overrides": {**data, "data.train_split": "train", "data.eval_split": "test",
                    **_common.encoder(1.0, where), "train.num_figure_examples": 0},
      "variants": {"tutorial": {}, "best": dict(best.OVERRIDES),
                   "finetune_12_epochs": dict(best.FINETUNE_12_EPOCHS)},
  }
