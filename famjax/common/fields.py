"""Field checks for the config dataclasses: a failed check is a ValueError naming the field, the
allowed values and the value given."""

from __future__ import annotations

from typing import Any


def require(ok: bool, field: str, allowed: str, got: Any) -> None:
  if not ok:
    raise ValueError(f"{field} must be {allowed}; got {got!r}")


def positive_int(field: str, value: Any) -> None:
  require(isinstance(value, int) and value > 0, field, "a positive integer", value)
