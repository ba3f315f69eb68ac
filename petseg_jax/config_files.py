"""Config and sweep files: Python files whose function returns a configuration (``configs/x.py[:arg]``).

``load_config`` is how every tool reads a config file outside ``ml_collections.config_flags`` (the ablation
runner, the benchmark), and how the scripts check their ``--config`` file before absl reads it: a missing
file, a directory, a syntax error or a file without ``get_config()`` is one clear message, not a traceback.
Also the checks every tool shares on a config's values: ``value_problem`` (a number, count or switch of the
right type and range), ``ignored_override`` (an override the config makes moot). Imports neither JAX nor
TensorFlow.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
from pathlib import Path
import sys
from typing import Any, Collection, Mapping

import ml_collections

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = REPO_ROOT / "configs" / "default.py"  # The tutorial; every field a run's config has.
# What the training scripts run without --config: offline, on the shared or bundled pet sample.
QUICKSTART_CONFIG = REPO_ROOT / "configs" / "quickstart.py"
CONFIG_FILE = "config.json"  # A run's whole configuration, written by train.py into its workdir.


class ConfigFileError(ValueError):
  """A config (or sweep) file that cannot be used; the message names it and says what is wrong."""


def split_arg(spec: str | os.PathLike) -> tuple[Path, str | None]:
  """'path.py:arg' → (path.py, 'arg'); 'path.py' → (path.py, None)."""
  path, sep, arg = str(spec).partition(".py:")
  if sep:
    return Path(path + ".py"), arg
  return Path(spec), None


def absolute_spec(spec: str | os.PathLike) -> str:
  """'configs/x.py:arg' with the path made absolute (what is recorded must not depend on the cwd)."""
  path, arg = split_arg(str(spec))
  return str(path.resolve()) + (f":{arg}" if arg is not None else "")


def call_python_file(spec: str | os.PathLike, function: str, what: str,
                     error: type[ConfigFileError] = ConfigFileError) -> Any:
  """Imports ``path.py`` of ``spec`` (repo root importable, as ``configs/`` need) and returns ``function([arg])``.

  Raises:
    error: the file is missing or not a file, fails to import, lacks ``function``, or ``function`` raises.
  """
  path, arg = split_arg(spec)
  if not path.is_file():
    raise error(f"{what} file {path} " + ("is a directory; give a .py file." if path.is_dir() else "not found."))
  if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))  # Config and sweep files import `configs.default`, `sweeps._common`.
  module_name = f"_petseg_{what.replace(' ', '_')}_{abs(hash(str(path.resolve())))}"
  module_spec = importlib.util.spec_from_file_location(module_name, path)
  if module_spec is None:  # Not a .py name: importlib has no loader for it.
    raise error(f"{what} file {path} is not a Python file (.py).")
  module = importlib.util.module_from_spec(module_spec)
  try:
    module_spec.loader.exec_module(module)
  except Exception as e:
    raise error(f"{what} file {path} failed to import: {type(e).__name__}: {e}") from e
  fn = getattr(module, function, None)
  if not callable(fn):
    raise error(f"{what} file {path} defines no {function}() function.")
  try:
    return fn(arg) if arg is not None else fn()
  except ConfigFileError:
    raise
  except Exception as e:  # A TypeError with an argument given most likely means the function takes none.
    hint = f"; does {function} take an argument?" if isinstance(e, TypeError) and arg is not None else ""
    call = f"{function}({arg!r})" if arg is not None else f"{function}()"
    raise error(f"{path}: {call} raised {type(e).__name__}: {e}{hint}") from e


def config_to_dict(config: ml_collections.ConfigDict) -> dict[str, Any]:
  """``config`` as the JSON a run saves (``config.json``): through JSON, so tuples and lists compare equal."""
  return json.loads(config.to_json_best_effort())


def flat_config(tree: Mapping[str, Any]) -> dict[str, Any]:
  """A config's nested dict (``config_to_dict``) as ``{"section.key": value}``."""
  flat = {}
  for key, value in tree.items():
    if isinstance(value, Mapping):
      flat.update({f"{key}.{sub}": sub_value for sub, sub_value in flat_config(value).items()})
    else:
      flat[key] = value
  return flat


def differences(saved: Mapping[str, Any], current: Mapping[str, Any]) -> dict[str, tuple[Any, Any]]:
  """``{key: (saved value, current value)}`` for each key whose values differ (a missing one is None)."""
  return {key: (saved.get(key), current.get(key)) for key in sorted(set(saved) | set(current))
          if saved.get(key) != current.get(key)}


def load_config(spec: str | os.PathLike, error: type[ConfigFileError] = ConfigFileError
                ) -> ml_collections.ConfigDict:
  """The ConfigDict of a config file (``configs/x.py`` or ``configs/x.py:arg``), as config_flags reads it.

  Raises:
    error: see ``call_python_file``; or ``get_config()`` returned something else than a ConfigDict.
  """
  config = call_python_file(str(spec), "get_config", "config", error)
  if not isinstance(config, ml_collections.ConfigDict):
    raise error(f"{spec}: get_config() returned {type(config).__name__}, not a ConfigDict.")
  return config


def ignored_override(config: ml_collections.ConfigDict, overridden: Collection[str]) -> str | None:
  """Why overriding the dotted keys ``overridden`` would change nothing in ``config``; None if it would.

  ``train.num_train_steps`` > 0 decides a run's length and ``train.num_epochs`` is then unused (the
  quickstart sets both): an override of the epochs alone would train as long as before, and its config.json
  would claim the new epochs.
  """
  if ("train.num_epochs" in overridden and "train.num_train_steps" not in overridden
      and config.train.num_train_steps > 0):
    return (f"train.num_epochs={config.train.num_epochs} has no effect: the config sets train.num_train_steps="
            f"{config.train.num_train_steps}, which decides the run's length. Override train.num_train_steps "
            "instead (-1 to train for num_epochs).")
  return None


def value_problem(name: str, value: Any, kind: str, minimum: float | None = None, maximum: float | None = None,
                  above: bool = False, below: bool = False) -> str:
  """"" if ``value`` fits, else a sentence naming ``config.<name>``, its value and what it must be.

  Args:
    name: the field's dotted path below config, e.g. "train.learning_rate".
    kind: "int" (an int, not a bool), "number" (a finite int or float, not a bool) or "bool".
    minimum, maximum: bounds, inclusive unless ``above`` / ``below`` make them exclusive.
  """
  if kind == "bool":
    return "" if isinstance(value, bool) else f"config.{name}={value!r} must be True or False."
  is_int = isinstance(value, int) and not isinstance(value, bool)
  is_number = is_int or (isinstance(value, float) and math.isfinite(value))
  fits = (is_int if kind == "int" else is_number) and not (
      (minimum is not None and (value <= minimum if above else value < minimum))
      or (maximum is not None and (value >= maximum if below else value > maximum)))
  if fits:
    return ""

  def text(bound: float) -> str:
    return str(bound) if isinstance(bound, int) else f"{bound:g}"

  bounds = [f"{'>' if above else '>='} {text(minimum)}" if minimum is not None else "",
            f"{'<' if below else '<='} {text(maximum)}" if maximum is not None else ""]
  what = "an integer" if kind == "int" else "a finite number"
  return f"config.{name}={value!r} must be {what}" + "".join(
      f"{' ' if i == 0 else ' and '}{b}" for i, b in enumerate(b for b in bounds if b)) + "."
