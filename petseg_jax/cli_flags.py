"""The scripts' ``--config`` flags: a config file (``define_config_file_flag``) or a run's saved config
(``define_run_config_flag``), with ``--config.section.key=value`` overrides; bad input is one message and
exit code 1, not an ml_collections traceback (run scripts with ``app.run(main, flags_parser=parse_flags)``).
"""

from __future__ import annotations

import collections
import contextlib
import copy
import os
import sys
from typing import TYPE_CHECKING, Any, Iterator, Sequence

from absl import app
from absl import flags
import ml_collections
from ml_collections import config_flags

from petseg_jax import config_files

if TYPE_CHECKING:
  from petseg_jax.inference import WorkdirError

# absl files a flag under the module that defines it: disclaimed, the --config flags defined here are the
# calling script's own, and its --helpshort lists them.
flags.disclaim_key_flags()


def _fields_line(config: ml_collections.ConfigDict | None, names: Sequence[str], field: str) -> str:
  """The line that lists the fields of the section where the override in ``names`` names ``field`` (or of
  the deepest section there that exists), e.g. 'config.train has: batch_size, ...'; "" without a config.
  absl's --helpfull lists no config file's fields."""
  for name in names:
    parts = name.lstrip("-").split(".")[1:]  # "--config.train.batchsize" -> ["train", "batchsize"].
    if field not in parts:
      continue
    section, path = config, ["config"]
    for part in parts[:parts.index(field)]:
      if not isinstance(section, ml_collections.ConfigDict) or part not in section:
        break
      section, path = section[part], path + [part]
    if isinstance(section, ml_collections.ConfigDict):
      return f"{'.'.join(path)} has: {', '.join(sorted(section.keys()))}."
  return ""


@contextlib.contextmanager
def config_override_errors(argv: Sequence[str], config: ml_collections.ConfigDict | None = None
                           ) -> Iterator[None]:
  """Turns ml_collections' traceback for a ``--config.x=y`` naming a field the config lacks, or for a
  ``--flagfile`` that cannot be read, into a clear message and exit code 1. Wrap ``config_flags.DEFINE_config_*``
  in it (they read the arguments and apply overrides already); ``config`` (by default the defined ``--config``
  flag's) gives the message the section's fields."""
  try:
    yield
  except flags.CantOpenFlagFileError as e:  # Read as the flag is defined: before absl's parser reports it.
    print(f"FATAL Flags parsing error: {str(e).removeprefix('ERROR:: ')}. Check the --flagfile path.",
          file=sys.stderr)
    sys.exit(1)
  except (AttributeError, KeyError) as e:
    names = [arg.split("=")[0] for arg in argv[1:] if arg.startswith(("--config.", "-config."))]
    error: Any = e
    while error.args and isinstance(error.args[0], Exception):  # AttributeError(KeyError(...)).
      error = error.args[0]
    field, _, hint = str(error.args[0] if error.args else error).partition("\n")
    field = field.strip("\"'")
    if config is None and "config" in flags.FLAGS:
      # A config file's flag has no value while absl parses a --config given apart from its path: read it.
      config = flags.FLAGS["config"].value
      spec = config_spec(argv)
      if config is None and spec is not None:
        with contextlib.suppress(config_files.ConfigFileError):
          config = config_files.load_config(spec)
    fields = _fields_line(config, names, field) or "configs/default.py lists the fields."
    print(f"FATAL Flags parsing error: unknown config field {field!r} in {' '.join(names)}. "
          f"{hint + ' ' if hint else ''}{fields}", file=sys.stderr)
    sys.exit(1)


def config_spec(argv: Sequence[str]) -> str | None:
  """The last ``--config`` value in ``argv`` (``--config=X`` or ``--config X``), or None."""
  spec = None
  for i, arg in enumerate(argv[1:], 1):
    name, equals, value = arg.partition("=")
    if name in ("--config", "-config"):
      spec = value if equals else (argv[i + 1] if i + 1 < len(argv) else spec)
  return spec


def define_config_file_flag(argv: Sequence[str], default: str | os.PathLike, help_text: str) -> None:
  """``config_flags.DEFINE_config_file("config", default, lock_config=True)`` whose bad input is one message
  and exit code 1: a ``--config`` that is not a config file that loads (``config_files.load_config``: missing,
  a directory, a syntax error, no ``get_config()``), or a ``--config.x=y`` naming a field it lacks."""
  spec = config_spec(argv) or str(default)
  try:
    config = config_files.load_config(spec)
  except config_files.ConfigFileError as e:
    print(f"FATAL Flags parsing error: --config={spec}: {e}", file=sys.stderr)
    sys.exit(1)
  with config_override_errors(argv, config):  # The file is read again, and overrides applied, right here.
    config_flags.DEFINE_config_file("config", str(default), help_text, lock_config=True)


def define_run_config_flag(argv: Sequence[str], fallback: ml_collections.ConfigDict
                           ) -> tuple[ml_collections.ConfigDict, WorkdirError | None]:
  """Defines ``--config``, defaulting to the saved config of the ``--workdir`` named in ``argv``.

  ``config_flags.DEFINE_config_dict`` needs its config before the flags are parsed, so ``--workdir`` is
  read from the raw arguments first. If it is missing or unusable, ``fallback`` (e.g. configs/default.py)
  stands in and the error is returned, so that ``--config.x=y`` still parse and the script reports the
  error itself. An override naming a field the config lacks exits with a clear message.

  Returns:
    ``(saved config or fallback, error or None)``.
  """
  # Here rather than at the top: the inference code brings TensorFlow (~6 s to import on 2 cores), which
  # scripts/train.py's flags do not need.
  from petseg_jax.inference import WorkdirError, load_run_config  # pylint: disable=g-import-not-at-top
  workdir_flag = flags.FlagValues()
  flags.DEFINE_string("workdir", None, "", flag_values=workdir_flag)
  config, error = fallback, None
  try:
    workdir_flag(list(argv), known_only=True)
    if workdir_flag.workdir is not None:  # Else absl reports the missing required flag.
      config = load_run_config(workdir_flag.workdir)
  except flags.Error as e:
    error = WorkdirError(str(e))
  except WorkdirError as e:
    error = e
  with config_override_errors(argv, config):
    # A copy: the flag applies the overrides to the config it is given, and the caller keeps the saved one.
    config_flags.DEFINE_config_dict("config", copy.deepcopy(config), "The run's saved config; override "
                                    "fields with --config.section.key=value.", lock_config=True)
  return config, error


def parse_flags(argv: list[str]) -> list[str]:
  """``app.run(main, flags_parser=parse_flags)``: absl's parser, and a clear message (no traceback) for a
  ``--config.x=y`` naming a field a config file lacks (ml_collections raises AttributeError), or a tuple
  field given twice (see ``repeated_tuple_overrides``)."""
  with config_override_errors(argv):
    remaining = app.parse_flags_with_usage(argv)
  repeated = repeated_tuple_overrides(argv, flags.FLAGS)
  if repeated:
    print(f"FATAL Flags parsing error: {repeated[0]}", file=sys.stderr)
    sys.exit(1)
  return remaining


def repeated_tuple_overrides(argv: Sequence[str], flag_values: flags.FlagValues) -> list[str]:
  """A message for each tuple field of ``--config`` that ``argv`` (its ``--flagfile``s included) gives more
  than once; call it after ``flag_values`` parsed ``argv``.

  ml_collections joins the repeated values of a tuple field (``--config.train.frozen_params=(A,)`` then
  ``=(B,)`` gives ``(A, B)``) where a repeated scalar field takes the last value, as absl's flags do: a command
  extended with a second value meant to replace the first would silently widen a freeze or a class-weight
  list instead.
  """
  expanded = flag_values.read_flags_from_files(list(argv[1:]), force_gnu=False)
  counts = collections.Counter(arg.lstrip("-").partition("=")[0] for arg in expanded
                               if arg.startswith(("--config.", "-config.")))
  return [f"--{name} is given {count} times, and a tuple field's values are joined, not replaced: "
          f"{tuple(flag_values[name].value)}. Give it once, with every value."
          for name, count in sorted(counts.items())
          if count > 1 and name in flag_values and isinstance(flag_values[name], flags.MultiFlag)]
