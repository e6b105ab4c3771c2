"""TPU targets of the memory plan: a slice that is not attached, compiled for ahead of time by
the TPU compiler itself (libtpu, the `tpu` extra, through `jax.experimental.topologies`), with
the HBM each device may use as the compiler states it, and each chip's datasheet peak and
bandwidth for the roofline estimate of a step's time.
"""

from __future__ import annotations

import dataclasses
import math
import os
import re

from famjax.hardware.chips import CHIPS, Chip

TPU_CHIPS = ("v4", "v5e", "v5p", "v6e")
_UNITS = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}  # libtpu prints binary units
_AVAILABLE = re.compile(r"exceeds available HBM \(([\d.]+)([KMGT])\)")
_REQUIRED = re.compile(r"required for HLO temporaries \(([\d.]+)([KMGT])\)")
NEEDS_LIBTPU = ("the TPU target compiles with libtpu: install the tpu extra (pip install -e "
                "'.[tpu]'), on Linux x86-64")


@dataclasses.dataclass(frozen=True)
class Slice:
  """A TPU slice named as "tpu:v5p:2x2x2": the chip and its topology."""

  chip: Chip
  topology: str  # libtpu's name, "v5p:2x2x2"

  @property
  def chips(self) -> int:
    return math.prod(int(n) for n in self.topology.split(":")[1].split("x"))


def parse(target: str) -> Slice:
  """study.memory_target "tpu:GEN:AxB[xC]" as a Slice; anything else is an error naming it."""
  parts = target.split(":")
  shape_ok = len(parts) == 3 and re.fullmatch(r"\d+(x\d+){1,2}", parts[2]) is not None
  if parts[0] != "tpu" or not shape_ok or parts[1] not in TPU_CHIPS:
    raise ValueError(f"study.memory_target must be 'cpu' or 'tpu:GEN:TOPOLOGY' with GEN one of "
                     f"{TPU_CHIPS} and TOPOLOGY such as 2x2x2 or 4x4; got {target!r}")
  return Slice(CHIPS[parts[1]], f"{parts[1]}:{parts[2]}")


def devices(slice_: Slice) -> tuple:
  """The slice's compile-only devices (v4 shows each chip's two TensorCores as devices).

  Lets libtpu load in several processes (ALLOW_MULTIPLE_LIBTPU_LOAD): the plan compiles in one
  process per core, and nothing here runs on a TPU."""
  import importlib.util

  from jax.experimental import topologies
  if importlib.util.find_spec("libtpu") is None:
    raise RuntimeError(NEEDS_LIBTPU)
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  try:
    found = topologies.get_topology_desc(platform="tpu", topology_name=slice_.topology)
  except Exception as e:  # noqa: BLE001 (JaxRuntimeError and the plugin's own errors)
    raise ValueError(f"study.memory_target tpu:{slice_.topology}: libtpu refuses it: "
                     f"{str(e).splitlines()[0]}") from None
  return tuple(found.devices)


def libtpu_version() -> str:
  from importlib import metadata
  try:
    return metadata.version("libtpu")
  except metadata.PackageNotFoundError:
    return "absent"


def _bytes(match) -> float:
  return float(match.group(1)) * _UNITS[match.group(2)]


def refusal(message: str) -> tuple[float, float] | None:
  """(required temporaries, available HBM) in bytes from the TPU compiler's out-of-HBM error,
  None for any other error."""
  available, required = _AVAILABLE.search(message), _REQUIRED.search(message)
  if "RESOURCE_EXHAUSTED" not in message or available is None:
    return None
  return (_bytes(required) if required else math.inf), _bytes(available)


def available_hbm(device) -> float:
  """Bytes of HBM a program may use on one device, as the compiler states it: a program that
  cannot fit is compiled and the refusal read (a second, not a table)."""
  import jax
  import jax.numpy as jnp
  sharding = jax.sharding.SingleDeviceSharding(device)
  huge = jax.ShapeDtypeStruct((2**38,), jnp.float32, sharding=sharding)  # 1 TiB
  try:
    jax.jit(lambda x: jnp.cumsum(x) * 2, out_shardings=sharding).lower(huge).compile()
  except Exception as e:  # noqa: BLE001
    found = refusal(str(e))
    if found is not None:
      return found[1]
    raise
  raise RuntimeError("the TPU compiler accepted a 1 TiB program: it states no HBM limit")
