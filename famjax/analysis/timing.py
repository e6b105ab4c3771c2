"""Where an analysis spends its time: wall seconds per named section, the part of them JAX spent
compiling (tracing, lowering to MLIR, XLA's compile) and the persistent cache's hits and misses,
from jax.monitoring's events. `famjax study --fit_only --profile` prints the table."""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import time

from jax import monitoring

COMPILE_EVENTS = {"/jax/core/compile/jaxpr_trace_duration": "trace",
                  "/jax/core/compile/jaxpr_to_mlir_module_duration": "lower",
                  "/jax/core/compile/backend_compile_duration": "compile"}
CACHE_EVENTS = {"/jax/compilation_cache/cache_hits": "cache_hits",
                "/jax/compilation_cache/cache_misses": "cache_misses"}


@dataclasses.dataclass
class Section:
  seconds: float = 0.0
  trace: float = 0.0
  lower: float = 0.0
  compile: float = 0.0
  cache_hits: int = 0
  cache_misses: int = 0
  programs: int = 0  # backend compiles or cache reads

  @property
  def compiling(self) -> float:
    return self.trace + self.lower + self.compile


class Sections:
  """Timed sections, nested ones counted in their own row only (the outer row keeps the rest).
  `with Sections() as sections:` makes it the one that `section(name)` records into; JAX's
  events of every thread count in the innermost open section."""

  def __init__(self):
    self.rows: dict[str, Section] = collections.defaultdict(Section)
    self._stack: list[str] = []

  def __enter__(self) -> "Sections":
    monitoring.register_event_duration_secs_listener(self._on_duration)
    monitoring.register_event_listener(self._on_event)
    _ACTIVE.append(self)
    return self

  def __exit__(self, *exc) -> None:
    _ACTIVE.remove(self)
    monitoring.unregister_event_duration_listener(self._on_duration)
    monitoring.unregister_event_listener(self._on_event)

  def _on_duration(self, event: str, duration: float, **_) -> None:
    if self._stack and event in COMPILE_EVENTS:
      row = self.rows[self._stack[-1]]
      setattr(row, COMPILE_EVENTS[event], getattr(row, COMPILE_EVENTS[event]) + duration)
      row.programs += event == "/jax/core/compile/backend_compile_duration"

  def _on_event(self, event: str, **_) -> None:
    if self._stack and event in CACHE_EVENTS:
      row = self.rows[self._stack[-1]]
      setattr(row, CACHE_EVENTS[event], getattr(row, CACHE_EVENTS[event]) + 1)

  @contextlib.contextmanager
  def __call__(self, name: str):
    start = time.perf_counter()
    self._stack.append(name)
    try:
      yield
    finally:
      self._stack.pop()
      elapsed = time.perf_counter() - start
      self.rows[name].seconds += elapsed
      if self._stack:  # the outer section's own time excludes this one
        self.rows[self._stack[-1]].seconds -= elapsed

  def table(self) -> str:
    lines = [f"{'section':<28} {'seconds':>8} {'compiling':>9} {'running':>8} {'programs':>8} "
             f"{'cache hit/miss':>14}"]
    total = Section()
    for name, row in self.rows.items():
      running = row.seconds - row.compiling
      lines.append(f"{name:<28} {row.seconds:8.2f} {row.compiling:9.2f} {running:8.2f} "
                   f"{row.programs:8d} {row.cache_hits:>7d}/{row.cache_misses:<6d}")
      for field in dataclasses.fields(Section):
        setattr(total, field.name, getattr(total, field.name) + getattr(row, field.name))
    lines.append(f"{'total':<28} {total.seconds:8.2f} {total.compiling:9.2f} "
                 f"{total.seconds - total.compiling:8.2f} {total.programs:8d} "
                 f"{total.cache_hits:>7d}/{total.cache_misses:<6d}")
    return "\n".join(lines)


_ACTIVE: list[Sections] = []


def section(name: str):
  """Times what it holds as `name` in the open Sections, if one is open."""
  return _ACTIVE[-1](name) if _ACTIVE else contextlib.nullcontext()
