"""One table of accelerator chips: datasheet peak FLOP/s, HBM capacity and bandwidth. It is the
denominator of MFU, of a study's planned accelerator-hours (study.device) and of the roofline
estimate of a planned step on a TPU slice (study.memory_target, famjax.hardware.tpu)."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Chip:
  """One accelerator: dense bf16 peak FLOP/s (no sparsity), HBM bytes and HBM bytes/s."""

  name: str
  peak_flops: float
  hbm_bytes: float
  hbm_bandwidth: float
  markers: tuple[str, ...]  # substrings of jax's device_kind (lowercase, no spaces) that name it


# Sources: NVIDIA's H100, H200 and A100 (SXM) datasheets; https://cloud.google.com/tpu/docs/v4,
# /v5e, /v5p, /v6e (read 2026-12-04).
CHIPS = {chip.name: chip for chip in (
    Chip("h100", 989e12, 80e9, 3.35e12, ("h100",)),
    Chip("h200", 989e12, 141e9, 4.8e12, ("h200",)),  # H100's compute, more memory
    Chip("a100", 312e12, 80e9, 2.039e12, ("a100",)),
    Chip("v4", 275e12, 32 * 2**30, 1200e9, ("tpuv4",)),
    Chip("v5e", 197e12, 16e9, 819e9, ("tpuv5lite", "tpuv5e")),
    Chip("v5p", 459e12, 95e9, 2765e9, ("tpuv5p", "tpuv5")),
    Chip("v6e", 918e12, 32e9, 1638e9, ("tpuv6lite", "tpuv6e")),
)}


def chip(name: str) -> Chip:
  """CHIPS[name], or an error naming the field and the chips there are."""
  if name not in CHIPS:
    raise ValueError(f"study.device must be one of {tuple(CHIPS)}; got {name!r}")
  return CHIPS[name]


def of_device_kind(device_kind: str) -> Chip | None:
  """The chip a jax device_kind names ("NVIDIA H100 80GB HBM3", "TPU v5 lite", ...), or None."""
  kind = device_kind.lower().replace(" ", "")
  # the longest marker first: "tpuv5lite" is a v5e, not a v5p
  markers = sorted(((m, c) for c in CHIPS.values() for m in c.markers), key=lambda mc: -len(mc[0]))
  return next((c for m, c in markers if m in kind), None)
