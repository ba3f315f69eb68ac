"""Loss: cross-entropy (the tutorial) vs cross-entropy + soft Dice vs class-weighted cross-entropy.

The weights (2, 2, 1) for (pet, background, border) are the tutorial's sample-weight example before it
divides them by their sum (it trains with (0.4, 0.4, 0.2)): the same relative weights, a 5x larger loss
(Adam's steps are the same up to its epsilon).

    python scripts/ablate.py --config configs/default.py --sweep sweeps/loss.py --workdir runs/loss
"""

from sweeps import _common


def get_sweep(where: str = "sample") -> dict:
  return {
      "seeds": [0, 1] if where == "sample" else [0, 1, 2],
      "overrides": _common.common(where),
      "variants": {
          "cross_entropy": {},
          "cross_entropy+dice": {"train.loss": "cross_entropy+dice"},
          "weighted_ce_2_2_1": {"train.class_weights": (2.0, 2.0, 1.0)},
      },
  }
