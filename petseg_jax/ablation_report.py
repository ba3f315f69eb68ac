"""The report of an ablation sweep (``petseg_jax.ablation``): ``summary.csv``, ``summary.md``, ``summary.png``.

One row per variant: the mean and standard deviation over its finished seeds of every final metric, the
training throughput, the wall time and the parameter counts, from the runs' ``metrics.jsonl`` and statuses;
unfinished and failed runs are listed with their errors. ``scripts/ablate.py`` writes it after a sweep, and
rebuilds it alone with ``--report-only``.
"""

from __future__ import annotations

import csv
import datetime
import json
import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import ml_collections
import numpy as np

from petseg_jax import ablation
from petseg_jax.metrics_log import read_metrics


def parameter_counts(config: ml_collections.ConfigDict, final_epoch: float | None = None) -> dict[str, int]:
  """Keras-style parameter counts of a run's model (``summary.count_parameters``).

  ``params_frozen`` counts parameters never updated in the run: those of ``train.frozen_params`` under
  ``model.freeze_encoder``, unless ``train.unfreeze_after_epochs`` unfreezes them before the run's
  ``final_epoch`` (when given: the epoch it trained to) — then they count as trainable. ``params_total`` =
  trainable + frozen + BatchNorm statistics, as Keras counts.
  """
  from petseg_jax import summary  # pylint: disable=g-import-not-at-top  (imports JAX)
  counts = summary.totals(summary.count_parameters(config))
  trainable, frozen = counts["trainable"], counts["frozen"]
  unfreeze = config.train.unfreeze_after_epochs
  if config.model.freeze_encoder and unfreeze >= 0 and (final_epoch is None or unfreeze < final_epoch):
    trainable, frozen = trainable + frozen, 0
  return {"params_total": counts["total"], "params_trainable": trainable, "params_frozen": frozen,
          "params_batch_stats": counts["batch_stats"]}


def run_throughput(records: Sequence[Mapping[str, Any]]) -> float | None:
  """Training images/s of a run: mean of the per-evaluation-interval rates after the first, which includes
  XLA compilation; None for a run with one interval (a smoke run: its rate would be mostly compilation)."""
  rates = [r["images_per_sec"] for r in records if r.get("images_per_sec") is not None]
  return float(np.mean(rates[1:])) if len(rates) > 1 else None


def metric_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
  """The final evaluation metrics reported: mIoU, per-class IoU, pixel accuracy (in that order)."""
  # Per-class IoUs in the order train.py writes them (the class order).
  keys = ["eval_miou"] + [k for r in records for k in r if k.startswith("eval_iou_")]
  return list(dict.fromkeys(keys)) + ["eval_pixel_accuracy"]


def _mean_std(values: Sequence[float]) -> tuple[float, float]:
  """Mean and sample standard deviation (ddof=1; NaN for a single value)."""
  values = np.asarray(values, np.float64)
  if values.size == 0:
    return math.nan, math.nan
  return float(values.mean()), float(values.std(ddof=1)) if values.size > 1 else math.nan


def collect_runs(sweep_dir: str | os.PathLike) -> tuple[dict[str, Any], list[dict[str, Any]]]:
  """The plan and, for every planned run, its status, final metrics record and metrics history."""
  sweep_dir = Path(sweep_dir)
  plan = ablation.read_json(sweep_dir / ablation.PLAN_FILE)
  if plan is None:
    raise ablation.SweepError(f"{sweep_dir / ablation.PLAN_FILE} not found: {sweep_dir} is not a sweep directory "
                              "(run the sweep first, or point --workdir at the right place).")
  runs = []
  for entry in plan["runs"]:
    workdir = sweep_dir / entry["dir"]
    status = (ablation.read_status(workdir) if not entry["error"]
              else {"status": ablation.FAILED, "error": entry["error"]})
    done = status.get("status") == ablation.DONE
    spec = ablation.read_json(workdir / ablation.RUN_SPEC_FILE) if done else None
    if done and spec is None:  # Deleted by hand: a re-run would skip the run.
      status = {"status": ablation.FAILED, "error": f"{workdir / ablation.RUN_SPEC_FILE} is missing, so nothing "
                f"says which configuration this run trained; delete {workdir} and run the sweep again."}
    if spec is not None and entry.get("config") is not None and spec.get("config") != entry["config"]:
      # Trained before the sweep or base config changed: its results are not this plan's run.
      status, spec = {"status": ablation.FAILED, "error": ablation.different_configuration(workdir)}, None
    records = read_metrics(workdir) if status.get("status") == ablation.DONE else []
    runs.append({**entry, "workdir": workdir, "status": status.get("status", "not run"),
                 "error": status.get("error", ""), "wall_time_sec": status.get("wall_time_sec"),
                 "records": records, "final": records[-1] if records else None,
                 "config": spec["config"] if spec else None})
  return plan, runs


def summarize(runs: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
  """One row per variant (plan order): overrides, seeds, mean/std of final metrics, speed, params, time."""
  rows: dict[str, dict[str, Any]] = {}
  param_cache: dict[str, dict[str, int]] = {}
  all_records = [r for run in runs for r in run["records"]]
  keys = metric_keys(all_records) if all_records else ["eval_miou", "eval_pixel_accuracy"]
  for variant in dict.fromkeys(run["variant"] for run in runs):
    members = [run for run in runs if run["variant"] == variant]
    done = [run for run in members if run["final"] is not None]
    row: dict[str, Any] = {
        "variant": variant, "overrides": ablation.format_overrides(members[0]["variant_overrides"]),
        "seeds_done": len(done), "seeds_planned": len(members),
        "seeds": " ".join(str(run["seed"]) for run in done)}
    for key in keys:
      row[f"{key}_mean"], row[f"{key}_std"] = _mean_std(
          [run["final"][key] for run in done if run["final"].get(key) is not None])
    rates = [x for x in (run_throughput(run["records"]) for run in done) if x is not None]
    row["images_per_sec_mean"], row["images_per_sec_std"] = _mean_std(rates)
    row["final_step"] = done[0]["final"]["step"] if done else None
    row["final_epoch"] = done[0]["final"].get("epoch") if done else None
    walls = [run["wall_time_sec"] for run in done if run["wall_time_sec"] is not None]
    row["wall_time_sec_mean"] = float(np.mean(walls)) if walls else math.nan
    row["wall_time_sec_total"] = float(np.sum(walls)) if walls else math.nan
    if done:
      final_epoch = done[0]["final"].get("epoch")
      key = json.dumps([done[0]["config"][k] for k in ("model", "train")] + [final_epoch], sort_keys=True)
      if key not in param_cache:
        param_cache[key] = parameter_counts(ml_collections.ConfigDict(done[0]["config"]), final_epoch)
      row.update(param_cache[key])
    else:
      row.update(dict.fromkeys(("params_total", "params_trainable", "params_frozen", "params_batch_stats")))
    row["errors"] = " | ".join(f"seed {run['seed']}: {run['status']}" + (f": {run['error']}" if run["error"] else "")
                               for run in members if run["final"] is None)
    rows[variant] = row
  return list(rows.values())


def _pm(row: Mapping[str, Any], key: str, digits: int = 4) -> str:
  mean, std = row.get(f"{key}_mean"), row.get(f"{key}_std")
  if mean is None or math.isnan(mean):
    return "–"
  return f"{mean:.{digits}f}" + (f" ± {std:.{digits}f}" if std is not None and not math.isnan(std) else "")


def write_csv(rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
  """``rows`` as CSV at ``path`` (columns: every key in first-seen order; None and NaN as empty cells)."""
  columns = list(dict.fromkeys(k for row in rows for k in row))
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=columns)
    writer.writeheader()
    for row in rows:
      writer.writerow({k: ("" if v is None or (isinstance(v, float) and math.isnan(v)) else v)
                       for k, v in row.items()})
  return path


def _param_text(row: Mapping[str, Any]) -> str:
  """The parameter counts of summary.csv (trainable, frozen, BatchNorm statistics) as one table cell."""
  if row.get("params_total") is None:
    return "–"
  # BatchNorm statistics are tens of thousands: in M with two decimals they would all read 0.03M.
  return (f"{row['params_trainable'] / 1e6:.2f}M / {row['params_frozen'] / 1e6:.2f}M / "
          f"{row['params_batch_stats'] / 1e3:.1f}k")


def eval_split_name(plan: Mapping[str, Any]) -> str:
  """The split the plan's runs evaluate on (their metrics' name in the report), e.g. "train[80%:]"."""
  splits = sorted({entry["config"]["data"]["eval_split"] for entry in plan["runs"] if entry.get("config")})
  return " / ".join(splits) or "eval split"


def write_markdown(plan: Mapping[str, Any], rows: Sequence[Mapping[str, Any]], path: Path) -> Path:
  """The sweep's report at ``path``: its plan, then one table row per variant (mean ± std over seeds)."""
  keys = [k[:-5] for k in rows[0] if k.startswith("eval_") and k.endswith("_mean")] if rows else []
  titles = {"eval_miou": "mIoU", "eval_pixel_accuracy": "pixel acc."}
  headers = (["variant", "overrides", "seeds"] + [titles.get(k, k.replace("eval_iou_", "IoU "))
                                                   for k in keys]
             + ["train img/s", "params trainable / frozen / BatchNorm stats", "wall time / run"])
  lines = [
      f"# Sweep {plan['sweep']}", "",
      f"- base config: `{plan['base_config']}`",
      f"- common overrides: `{ablation.format_overrides(plan['overrides'])}`",
      f"- seeds: {plan['seeds']}",
      f"- report written {datetime.datetime.now().isoformat(timespec='seconds')}",
      f"- metrics: the final evaluation of each run on {eval_split_name(plan)}, mean ± sample std over seeds; "
      "train img/s: mean over evaluation intervals after the first (which includes compilation; – for runs "
      "with one interval)", "",
      "| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
  for row in rows:
    cells = ([row["variant"], f"`{row['overrides']}`", f"{row['seeds_done']}/{row['seeds_planned']}"]
             + [_pm(row, k) for k in keys]
             + [_pm(row, "images_per_sec", 1), _param_text(row),
                (f"{row['wall_time_sec_mean']:.0f} s" if not math.isnan(row["wall_time_sec_mean"]) else "–")])
    lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
  failures = [row for row in rows if row["errors"]]
  if failures:
    lines += ["", "## Runs without results", ""]
    lines += [f"- **{row['variant']}**: {row['errors']}" for row in failures]
  path.write_text("\n".join(lines) + "\n")
  return path


def save_summary_figure(runs: Sequence[Mapping[str, Any]], rows: Sequence[Mapping[str, Any]],
                        path: Path, dpi: int = 100, eval_split: str = "validation") -> Path | None:
  """Bar chart of final mIoU (mean ± std over seeds) and the mIoU curves of every variant, on ``eval_split``."""
  from petseg_jax import plots  # pylint: disable=g-import-not-at-top  (imports matplotlib)
  rows = [row for row in rows if row["seeds_done"]]
  if not rows:
    return None
  height = max(4.0, 0.35 * len(rows) + 1.5)
  fig = plots.new_figure(14.0, height, dpi)
  bar_ax, curve_ax = fig.subplots(1, 2, width_ratios=[1.0, 1.2])
  names = [row["variant"] for row in rows]
  means = np.array([row["eval_miou_mean"] for row in rows])
  stds = np.nan_to_num(np.array([row["eval_miou_std"] for row in rows]))
  positions = np.arange(len(rows))[::-1]  # First variant on top.
  colors = [f"C{i % 10}" for i in range(len(rows))]
  bar_ax.barh(positions, means, xerr=stds, color=colors, alpha=0.85, capsize=3)
  for y, mean, std in zip(positions, means, stds):
    bar_ax.text(mean + std, y, f"  {mean:.3f}", va="center", fontsize=8)  # Right of the error bar's cap.
  bar_ax.set_yticks(positions, names, fontsize=8)
  # Bars start at 0 (a cut axis would exaggerate small differences); the labels give the values.
  bar_ax.set_xlim(0.0, min(1.0, float(np.nanmax(means + stds)) + 0.12))
  bar_ax.set_xlabel(f"final mIoU on {eval_split} (mean ± std over seeds)")
  bar_ax.grid(True, axis="x", alpha=0.3)
  for color, row in zip(colors, rows):
    curves = [run["records"] for run in runs if run["variant"] == row["variant"] and run["final"]]
    by_epoch: dict[float, list[float]] = {}
    for records in curves:
      for record in records:
        by_epoch.setdefault(float(record.get("epoch", record["step"])), []).append(record["eval_miou"])
    epochs = sorted(by_epoch)
    mean = np.array([np.mean(by_epoch[e]) for e in epochs])
    curve_ax.plot(epochs, mean, "o-", color=color, markersize=3, label=row["variant"])
    if len(curves) > 1:
      std = np.array([np.std(by_epoch[e], ddof=1) if len(by_epoch[e]) > 1 else 0.0 for e in epochs])
      curve_ax.fill_between(epochs, mean - std, mean + std, color=color, alpha=0.15)
  curve_ax.set_xlabel("epoch")
  curve_ax.set_ylabel(f"mIoU on {eval_split}")
  curve_ax.set_title("mIoU during training (mean ± std over seeds)")
  curve_ax.grid(True, alpha=0.3)
  curve_ax.legend(fontsize=7, loc="lower right")
  return plots.save_figure(fig, path)


def write_report(sweep_dir: str | os.PathLike) -> dict[str, Path]:
  """Writes ``summary.csv``, ``summary.md`` and ``summary.png`` from the runs found in ``sweep_dir``."""
  sweep_dir = Path(sweep_dir)
  plan, runs = collect_runs(sweep_dir)
  rows = summarize(runs)
  paths = {"csv": write_csv(rows, sweep_dir / "summary.csv"),
           "md": write_markdown(plan, rows, sweep_dir / "summary.md")}
  figure = save_summary_figure(runs, rows, sweep_dir / "summary.png", eval_split=eval_split_name(plan))
  if figure is not None:
    paths["png"] = figure
  return paths
