"""A finished study published: its config, plan, report, fit-ready tables and plots copied into
a committable directory (e.g. results/medium)."""

from __future__ import annotations

from pathlib import Path

# what a published study holds: its config, plan, report, fit-ready tables and plots (small text
# and PNG files), never its runs' checkpoints
PUBLISHED = ("config.json", "plan.json", "report.md", "report.json", "data/*.csv", "plots/*.png")


def publish(study_dir: str | Path, dest: str | Path) -> list[Path]:
  """Copies a finished study's records and report (PUBLISHED) into dest, e.g. results/medium,
  so that anyone can refit it (`famjax fit --data=DEST/data/familial.csv`) or read it
  without training; report.md's plot links stay valid."""
  study_dir, dest = Path(study_dir), Path(dest)
  if not (study_dir / "report.json").exists():
    raise FileNotFoundError(f"{study_dir} has no report.json: finish the study (or --fit_only) "
                            "before publishing it")
  written = []
  for pattern in PUBLISHED:
    for path in sorted(study_dir.glob(pattern)):
      target = dest / path.relative_to(study_dir)
      target.parent.mkdir(parents=True, exist_ok=True)
      tmp = target.with_name(f".{target.name}.tmp")
      tmp.write_bytes(path.read_bytes())
      tmp.replace(target)
      written.append(target)
  return written
