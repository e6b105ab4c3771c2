"""The analysis's timer: wall seconds per section, nested sections apart, and JAX's compiles and
persistent-cache reads counted in the section that caused them."""

import jax
import jax.numpy as jnp

from famjax.analysis import timing


def test_sections_count_their_own_time_and_compiles():
  x = jnp.arange(7.0).block_until_ready()
  with timing.Sections() as sections:
    with timing.section("outer"):
      with timing.section("inner"):
        jax.jit(lambda x: jnp.sin(x) * 3.0 + 1.25)(x).block_until_ready()
  inner, outer = sections.rows["inner"], sections.rows["outer"]
  assert inner.programs + inner.cache_hits == 1 and inner.compiling > 0
  assert inner.seconds >= inner.compiling
  assert outer.programs == 0 and outer.compiling == 0 and 0 <= outer.seconds < inner.seconds
  table = sections.table()
  assert table.splitlines()[0].split()[:4] == ["section", "seconds", "compiling", "running"]
  assert "inner" in table and table.splitlines()[-1].startswith("total")
  with timing.section("after"):  # no Sections open: times nothing
    pass
  assert "after" not in sections.rows
