"""The `famjax` command: `famjax SUBCOMMAND [--flags]`, one subcommand per famjax/commands module,
each with its own absl flags (`famjax SUBCOMMAND --help`). In a checkout, `python -m
experiments.X` runs the same commands."""

from __future__ import annotations

import importlib
import sys

import famjax

# subcommand -> module of famjax.commands, and what it does (for `famjax --help`)
COMMANDS = {
    "train": ("train", "train one familial model into a workdir (resumes)"),
    "study": ("study", "an IsoFLOP study: plan, train, fit, report (--dry_run, --fit_only)"),
    "fit": ("fit", "fit a scaling law to a CSV/JSONL/parquet file, or compare laws"),
    "decode": ("decode", "generate from a trained run: any exit, relay, confidence, speculation"),
    "export": ("export", "a trained run's exits as Hugging Face directories"),
    "evaluate": ("evaluate", "lm-evaluation-harness tasks per exit, or a study's loss-to-accuracy"),
    "tokenize": ("tokenize", "build the token store of a config's corpus once, beforehand"),
    "continuation-task": ("continuation_task", "write a local task small models can score"),
}


def usage() -> str:
  width = max(map(len, COMMANDS))
  lines = [f"usage: famjax SUBCOMMAND [--flags]   (famjax {famjax.__version__})", "",
           "subcommands (famjax SUBCOMMAND --help for each one's flags):"]
  lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
  return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
  """Runs `famjax SUBCOMMAND ...` (argv as sys.argv: the program's name first)."""
  argv = list(sys.argv if argv is None else argv)
  if len(argv) < 2 or argv[1] in ("-h", "--help", "help"):
    print(usage())
    return
  if argv[1] == "--version":
    print(f"famjax {famjax.__version__}")
    return
  if argv[1] not in COMMANDS:
    sys.exit(f"famjax: unknown subcommand {argv[1]!r}\n\n{usage()}")
  module_name, _ = COMMANDS[argv[1]]
  module = importlib.import_module(f"famjax.commands.{module_name}")  # defines its flags
  from famjax.commands import common
  # absl's --help shows __main__'s docstring, and --helpshort the flags of the module named by
  # argv[0]: both the subcommand's
  sys.modules["__main__"].__doc__ = module.__doc__
  sys.argv = [module.__name__, *argv[2:]]
  common.run(module.main, module.PRESET)
