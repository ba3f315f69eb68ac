"""Runs an ablation sweep and writes its report.

    python scripts/ablate.py --config configs/default.py --sweep sweeps/sample_broad.py --workdir DIR
    python scripts/ablate.py --config configs/default.py --sweep sweeps/freeze.py:tfds --workdir DIR
    python scripts/ablate.py --workdir DIR --report-only

Every (variant, seed) run trains in DIR/<variant>/seed_<s>/ in its own Python process; running the same
command again skips finished runs and resumes interrupted ones. A failing variant is reported and the
sweep goes on. The report is DIR/summary.csv, DIR/summary.md and DIR/summary.png (see
``petseg_jax/ablation.py`` for the sweep file format).
"""

import signal
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from petseg_jax import host  # pylint: disable=g-import-not-at-top

if __name__ == "__main__":  # Before JAX and TensorFlow load: glibc reads its tunables at start-up only.
  host.restart_with_tunables()
  host.skip_collection_at_exit()  # ~2 s less at exit, with TensorFlow or JAX loaded.

from absl import app  # pylint: disable=g-import-not-at-top
from absl import flags

from petseg_jax import ablation
from petseg_jax import ablation_report
from petseg_jax import config_files

FLAGS = flags.FLAGS

# The tutorial's config, which the bundled sweeps are written against (they set the length in epochs; the
# quickstart's length is num_train_steps, which would refuse them).
flags.DEFINE_string("config", str(config_files.DEFAULT_CONFIG),
                    "Base config file (configs/x.py, or configs/x.py:arg) the sweep's overrides apply to.")
flags.DEFINE_string("sweep", None, "Sweep file (sweeps/x.py, or sweeps/x.py:arg for get_sweep(arg)).")
flags.DEFINE_string("workdir", None, "Sweep directory: one subdirectory per run, plus the report.")
flags.DEFINE_multi_string("set", [], "Override for every run, the variants' own values included, e.g. --set "
                          "train.num_epochs=3 (value parsed as a Python literal, else taken as a string). "
                          "Repeatable.")
flags.DEFINE_list("only", [], "Run only these variants (comma-separated names).")
flags.DEFINE_bool("report-only", False, "Only rebuild the report from the runs already in --workdir.")
flags.DEFINE_bool("dry-run", False, "Print the planned runs and their overrides; train nothing.")
flags.DEFINE_bool("in-process", False, "Train in this process instead of one subprocess per run (faster "
                  "start-up, but a crash ends the sweep).")
flags.mark_flags_as_required(["workdir"])


def _terminate(signum, frame):
  del frame
  # Like Ctrl-C: the running training is asked to checkpoint and stop, then the sweep stops.
  raise KeyboardInterrupt(f"Received {signal.Signals(signum).name}.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  signal.signal(signal.SIGTERM, _terminate)
  # SIGINT stops the sweep (as it stops training) even where it started ignored, e.g. in a shell's background job.
  signal.signal(signal.SIGINT, signal.default_int_handler)
  try:
    if not FLAGS["report-only"].value:
      if not FLAGS.sweep:
        raise app.UsageError("--sweep is required (unless --report-only).")
      extra = dict(ablation.parse_override(text) for text in FLAGS.set)
      if FLAGS["dry-run"].value:
        sweep = ablation.load_sweep(FLAGS.sweep)
        planned = ablation.plan_runs(FLAGS.config, sweep, extra, FLAGS.only)
        ablation.refuse_changed_runs(planned, FLAGS.workdir)  # What the sweep itself would refuse.
        for run, _, error in planned:
          print(f"{run.dirname}: {ablation.format_overrides(run.overrides)}"
                + (f"\n  ERROR: {error}" if error else ""))
        failing = sum(1 for _, _, error in planned if error)
        if failing:  # A dry run checks the plan: say so in the exit code too.
          sys.exit(f"{failing} of {len(planned)} planned runs cannot start (ERROR above).")
        return
      results = ablation.run_sweep(FLAGS.config, FLAGS.sweep, FLAGS.workdir, extra_overrides=extra,
                                   only=FLAGS.only, in_process=FLAGS["in-process"].value)
    else:
      # The report is of the runs as they were planned and trained: the planning flags would change nothing.
      ignored = [name for name in ("config", "sweep", "set", "only", "dry-run", "in-process")
                 if FLAGS[name].present]
      if ignored:
        raise app.UsageError(f"--report-only rebuilds the report of the runs in --workdir as they were planned; "
                             f"drop {', '.join('--' + name for name in ignored)}.")
      results = []
    paths = ablation_report.write_report(FLAGS.workdir)
  except ablation.SweepError as e:
    sys.exit(f"error: {e}")
  except KeyboardInterrupt as e:
    # The interrupted run saved a checkpoint; report what is finished so far.
    paths = ablation_report.write_report(FLAGS.workdir)
    print(f"{e or 'Interrupted.'} Partial report: {paths['md']}", file=sys.stderr)
    sys.exit(130)
  print("\n" + Path(paths["md"]).read_text())
  print("Report: " + ", ".join(str(p) for p in paths.values()))
  failed = [r for r in results if r.status == ablation.FAILED]
  if failed:
    sys.exit(f"{len(failed)} of {len(results)} runs failed (listed in {paths['md']}).")


if __name__ == "__main__":
  app.run(main)
