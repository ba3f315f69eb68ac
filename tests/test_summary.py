"""Parameter summary: Keras' counts for the tutorial model, freezing by config, the CLI."""

from __future__ import annotations

import pytest

from configs import default
from petseg_jax import summary
from tests import trained_run

# Keras' model.summary() of the tutorial's model (MobileNetV2 alpha 1.0, 128x128, encoder frozen).
KERAS_TOTAL = 6_504_227
KERAS_TRAINABLE = 4_660_323


@pytest.fixture(scope="module")
def tutorial_counts():
  config = default.get_config()
  # Shapes only: a weight file that does not exist proves that nothing is loaded.
  config.model.encoder_weights = "/nonexistent/weights.h5"
  return summary.count_parameters(config)


def test_tutorial_totals_equal_keras(tutorial_counts):
  totals = summary.totals(tutorial_counts)
  assert totals["total"] == KERAS_TOTAL
  assert totals["trainable"] == KERAS_TRAINABLE
  assert totals["non_trainable"] == KERAS_TOTAL - KERAS_TRAINABLE
  # Frozen encoder: every encoder parameter frozen, every decoder parameter trainable.
  by_name = {c.name: c for c in tutorial_counts}
  assert all(c.trainable == 0 for name, c in by_name.items() if name.startswith("encoder/"))
  assert all(c.frozen == 0 for name, c in by_name.items() if name.startswith("decoder/"))
  names = [c.name for c in tutorial_counts]
  assert names[:3] == ["encoder/stem", "encoder/expanded_conv", "encoder/block_1"]
  assert names[-5:] == ["decoder/up_0", "decoder/up_1", "decoder/up_2", "decoder/up_3", "decoder/last"]
  assert "encoder/block_16" in names and "encoder/block_10" == names[names.index("encoder/block_9") + 1]


def test_freezing_follows_config():
  config = default.get_config()
  config.model.freeze_encoder = False
  totals = summary.totals(summary.count_parameters(config))
  assert totals["total"] == KERAS_TOTAL and totals["frozen"] == 0
  assert totals["trainable"] == KERAS_TOTAL - totals["batch_stats"]

  config.model.freeze_encoder = True
  config.train.frozen_params = ("encoder/block_1_.*",)
  counts = {c.name: c for c in summary.count_parameters(config)}
  assert counts["encoder/block_1"].trainable == 0 and counts["encoder/block_1"].frozen > 0
  assert counts["encoder/block_2"].frozen == 0

  config.train.frozen_params = ("encodr/.*",)
  with pytest.raises(ValueError, match="matches no parameter"):
    summary.count_parameters(config)
  config.train.frozen_params = ("decoder/up_0/.*",)  # Training refuses it: so does the summary.
  with pytest.raises(ValueError, match="match no encoder parameter: the encoder would train in full"):
    summary.count_parameters(config)


def test_cli_prints_table_and_totals():
  table, bad_field, plain = trained_run.run_scripts(
      ("summary.py", "--config", "configs/default.py"),
      ("summary.py", "--config.model.alpah=0.5"),
      ("summary.py",))
  # Without --config: the model train.py trains without one (the quickstart).
  from configs import quickstart  # pylint: disable=g-import-not-at-top
  quick_total = sum(count.total for count in summary.count_parameters(quickstart.get_config()))
  assert plain.returncode == 0 and f"Total params: {quick_total:,}" in plain.stdout, plain.stderr[-2000:]
  assert table.returncode == 0, table.stderr
  for text in ("Total params: 6,504,227", "Trainable params: 4,660,323", "BatchNorm moving mean/variance",
               "encoder/block_16", "decoder/last"):
    assert text in table.stdout
  assert bad_field.returncode == 1 and "Traceback" not in bad_field.stderr
  assert "unknown config field 'alpah'" in bad_field.stderr
