"""What every subcommand shares: a --config flag whose presets resolve from any directory (a
preset's name alone, `--config=tiny`, or FILE:NAME), one-line errors for unknown --config.*
fields and for bad input, the persistent compilation cache and multi-host set-up."""

from __future__ import annotations

import difflib
import functools
import importlib.util
import os
import sys
from pathlib import Path

from absl import app, flags

from famjax.common.files import WorkdirBusy, default_cache_dir

PRESETS = Path(__file__).resolve().parents[1] / "presets"  # famjax/presets, shipped in the wheel


_COORDINATOR = flags.DEFINE_string(
    "coordinator_address", None, "host:port of process 0 when a run spans several hosts (or set "
    "JAX_COORDINATOR_ADDRESS); unset on one host.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Processes of a multi-host run.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index, 0-based.")
_CACHE = flags.DEFINE_string("compilation_cache", "", "JAX's persistent compilation cache "
                             "(default: $JAX_COMPILATION_CACHE_DIR, else the famjax cache dir's "
                             "xla/; 'none' turns it off).")


def use_compilation_cache() -> Path | None:
  """Turns on JAX's persistent compilation cache (--compilation_cache), so that reruns, resumed
  sweeps and other processes on this machine skip compiling programs they share. A process-wide
  setting: entry points call it, library code does not."""
  if _CACHE.value == "none":
    return None
  import jax
  chosen = _CACHE.value or os.environ.get("JAX_COMPILATION_CACHE_DIR")
  path = Path(chosen).expanduser() if chosen else default_cache_dir() / "xla"
  path.mkdir(parents=True, exist_ok=True)
  jax.config.update("jax_compilation_cache_dir", str(path))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.2)
  return path


def quiet_logs() -> None:
  """absl's WARNING level unless --verbosity is given: Orbax logs every save at INFO."""
  if not flags.FLAGS["verbosity"].present:
    from absl import logging
    logging.set_verbosity(logging.WARNING)


def initialize_distributed() -> None:
  """Joins a multi-host run when --coordinator_address (or JAX_COORDINATOR_ADDRESS) is set."""
  from famjax.model import sharding
  sharding.initialize_distributed(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)


def given_config_fields(argv: list[str] | None = None) -> list[str] | None:
  """What the command line sets of --config: None when it names a preset (--config=FILE:NAME),
  else the dotted fields it overrides (--config.study.bootstrap=2000 -> "study.bootstrap")."""
  argv = sys.argv[1:] if argv is None else argv
  if any(a == "--config" or a.startswith("--config=") for a in argv):
    return None
  return [a[len("--config."):].split("=", 1)[0] for a in argv if a.startswith("--config.")]


def config_help(preset_file: str, default: str, example: str) -> str:
  """Help of an entry point's --config flag (whose default `run` supplies)."""
  return (f"Preset by name, e.g. --config={example} (famjax/presets/{preset_file}), or as "
          f"FILE:NAME; unset: {default}. Override any field with --config.SECTION.FIELD=VALUE, "
          "e.g. --config.train.steps=500.")


def _load_preset(spec: str):
  path, _, preset = spec.partition(":")
  module_spec = importlib.util.spec_from_file_location("famjax_preset", path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(preset) if preset else module.get_config()


def _unknown_field(spec: str, argv: list[str]) -> str | None:
  """A one-line message for the first --config.* override naming no field of the preset."""
  try:
    config = _load_preset(spec)
  except Exception:  # the preset itself is broken: let the original error speak
    return None
  for arg in argv:
    if not arg.startswith("--config."):
      continue
    path = arg[len("--config."):].split("=", 1)[0].split(".")
    node, walked = config, []
    for key in path:
      fields = list(node.keys()) if hasattr(node, "keys") else []
      if key not in fields:
        close = difflib.get_close_matches(key, fields, n=1)
        where = ".".join(walked) or "the config"
        hint = f"; did you mean {'.'.join(walked + close)}?" if close else ""
        return (f"unknown config field {'.'.join(walked + [key])} ({where} has "
                f"{', '.join(sorted(fields))}){hint}")
      node, walked = node[key], walked + [key]
  return None


def preset_spec(spec: str, preset_file: str) -> str:
  """--config's value as FILE:NAME of a file that exists: a preset's name alone ("tiny") names one
  of preset_file's presets; a FILE that does not exist here (experiments/configs/isoflop.py:tiny
  from an older command line, or isoflop.py:tiny) is looked up by its name in famjax/presets."""
  path, _, preset = spec.partition(":")
  if not preset and not path.endswith(".py"):
    return f"{PRESETS / preset_file}:{path}"
  if not Path(path).exists() and (PRESETS / Path(path).name).exists():
    return f"{PRESETS / Path(path).name}:{preset}" if preset else str(PRESETS / Path(path).name)
  return spec


def _parse(argv: list[str], preset_file: str, default: str) -> list[str]:
  if not any(a == "--config" or a.startswith("--config=") for a in argv[1:]):
    argv = argv[:1] + [f"--config={default}"] + argv[1:]
  argv = [f"--config={preset_spec(a.split('=', 1)[1], preset_file)}"
          if a.startswith("--config=") else a for a in argv]
  spec = next(a.split("=", 1)[1] for a in argv if a.startswith("--config="))
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    sys.exit(f"error: {e}\nPass --helpfull to see every flag.")
  except (AttributeError, KeyError) as e:  # ml_collections: an override naming no field
    sys.exit(f"error: {_unknown_field(spec, argv) or e}")


def _one_line_errors(main):
  """Errors about the user's input (bad values, missing or busy files) end the program with one
  line rather than a traceback; FAMJAX_TRACEBACK=1 shows the traceback."""
  @functools.wraps(main)
  def wrapped(argv):
    try:
      return main(argv)
    except (ValueError, OSError, WorkdirBusy) as e:
      if os.environ.get("FAMJAX_TRACEBACK"):
        raise
      sys.exit(f"error: {e}")
  return wrapped


def run(main, preset: tuple[str, str] | None = None) -> None:
  """absl's app.run with one-line errors and, for a subcommand with presets, (FILE, NAME), the
  default --config famjax/presets/FILE:NAME."""
  if preset is None:
    app.run(_one_line_errors(main))
    return
  preset_file, name = preset
  app.run(_one_line_errors(main), flags_parser=functools.partial(
      _parse, preset_file=preset_file, default=name))
