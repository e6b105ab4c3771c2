"""The `famjax` command: its subcommands, presets by name from any directory, its help and
version, and `python -m experiments.X` in a checkout running the same subcommand."""

import subprocess
import sys
from pathlib import Path

import pytest

import famjax
from famjax import cli
from famjax.commands import common

ROOT = Path(__file__).resolve().parents[1]


def test_every_subcommand_is_a_module_with_main_and_its_preset_or_none():
  """Read, not imported: each module defines its own absl flags, so a process imports one."""
  import ast
  for name, (module_name, _) in cli.COMMANDS.items():
    tree = ast.parse((ROOT / "famjax" / "commands" / f"{module_name}.py").read_text())
    assert any(isinstance(n, ast.FunctionDef) and n.name == "main" for n in tree.body), name
    (preset,) = [ast.literal_eval(n.value) for n in tree.body if isinstance(n, ast.Assign)
                 and [t.id for t in n.targets if isinstance(t, ast.Name)] == ["PRESET"]]
    assert preset is None or (common.PRESETS / preset[0]).exists(), name


@pytest.mark.parametrize("given, expected", [
    ("tiny", "isoflop.py:tiny"),
    ("isoflop.py:paper", "isoflop.py:paper"),
    ("experiments/configs/isoflop.py:laws", "isoflop.py:laws"),  # an older command line
    ("train.py:small", "train.py:small"),
])
def test_presets_resolve_by_name_from_any_directory(given, expected, tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert common.preset_spec(given, "isoflop.py") == f"{common.PRESETS}/{expected}"


def test_a_preset_file_that_exists_is_taken_as_given(tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  (tmp_path / "mine.py").write_text("")
  assert common.preset_spec("mine.py:x", "isoflop.py") == "mine.py:x"


def test_help_version_and_an_unknown_subcommand(capsys):
  cli.main(["famjax"])
  assert "study" in capsys.readouterr().out
  cli.main(["famjax", "--version"])
  assert capsys.readouterr().out.strip() == f"famjax {famjax.__version__}"
  with pytest.raises(SystemExit, match="unknown subcommand 'studdy'"):
    cli.main(["famjax", "studdy"])


@pytest.mark.parametrize("argv", [
    ["-m", "famjax", "study", "--config=paper", "--dry_run"],
    ["-m", "experiments.isoflop", "--config=paper", "--dry_run"],
])
def test_the_paper_dry_run_from_the_command_line(argv, tmp_path):
  """A preset by name; `python -m experiments.isoflop` is `famjax study` in a checkout."""
  cwd = tmp_path if argv[1] == "famjax" else ROOT
  out = subprocess.run([sys.executable, *argv], cwd=cwd, capture_output=True, text=True,
                       timeout=300)
  assert out.returncode == 0, out.stderr[-2000:]
  assert "h100 hours at 40% MFU" in out.stdout
