"""Orbax checkpoints of (params, optimizer state) and the data-iterator state, restorable on any
mesh.

A checkpoint that no longer restores (a file truncated or deleted by a crash or a full disk) is
moved aside to WORKDIR/checkpoints_damaged/ and the newest one that restores is used instead.
"""

from __future__ import annotations

import datetime
import shutil
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from absl import logging

DAMAGED_DIR = "checkpoints_damaged"


def manager(workdir: str | Path, keep: int) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(max_to_keep=keep, create=True)
  return ocp.CheckpointManager(Path(workdir).absolute() / "checkpoints", options=options)


def save(mngr: ocp.CheckpointManager, step: int, state: Any, data_state: dict) -> None:
  """Orbax writes into a temporary directory and renames it when complete: a crash loses nothing."""
  mngr.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                          data=ocp.args.JsonSave(data_state)))


def restore(mngr: ocp.CheckpointManager, step: int, like: Any) -> tuple[Any, dict]:
  """Restores onto the shardings of `like` (concrete or abstract arrays), whatever mesh wrote it."""
  restored = mngr.restore(step, args=ocp.args.Composite(
      state=ocp.args.StandardRestore(_abstract(like)), data=ocp.args.JsonRestore()))
  return restored["state"], restored["data"]


def restore_params(mngr: ocp.CheckpointManager, like_params: Any) -> Any | None:
  """The parameters alone (no optimizer state read) of the newest checkpoint whose parameters
  restore, onto the shardings of `like_params`; None if none does. Read-only: a checkpoint
  that fails is skipped with a warning, never moved."""
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      item = {"params": _abstract(like_params)}
      restored = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          item, restore_args=ocp.checkpoint_utils.construct_restore_args(item),
          partial_restore=True)))
      return restored["state"]["params"]
    except Exception as e:  # Orbax and TensorStore raise many kinds for a damaged checkpoint
      _refuse_another_layout(mngr, step, {"params": like_params}, e)
      logging.warning("checkpoint at step %d: parameters do not restore (%s); trying an older "
                      "one", step, type(e).__name__)
  return None


def _paths(tree) -> set[str]:
  """Leaf paths as "exits/0/norm/scale" (integer and string keys alike, as Orbax saves them)."""
  leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
  name = lambda k: str(getattr(k, "key", getattr(k, "idx", getattr(k, "name", k))))
  return {"/".join(name(k) for k in path) for path, _ in leaves}


def _layout_mismatch(mngr: ocp.CheckpointManager, step: int, like: Any) -> str | None:
  """How the saved parameters' tree differs from `like`'s (a few paths on each side), or None
  when they match or the checkpoint's metadata cannot be read (then the checkpoint is damaged).
  Parameters are plain nested dicts, so their paths read the same saved and in memory."""
  try:
    metadata = ocp.StandardCheckpointer().metadata(Path(mngr.directory) / str(step) / "state")
    saved = _paths(metadata.item_metadata["params"])
  except Exception:  # unreadable metadata: a damaged checkpoint, not another layout
    return None
  expected = _paths(like["params"])
  if not saved or saved == expected:
    return None
  only_saved, only_expected = sorted(saved - expected)[:2], sorted(expected - saved)[:2]
  return f"saved but not expected: {only_saved}; expected but not saved: {only_expected}"


def _refuse_another_layout(mngr: ocp.CheckpointManager, step: int, like: Any, error) -> None:
  """Raises, moving nothing, when the checkpoint failed because its parameters have another
  layout than `like`'s (not because it is damaged)."""
  mismatch = _layout_mismatch(mngr, step, like)
  if mismatch:
    raise ValueError(
        f"checkpoint at step {step} in {mngr.directory} holds another parameter layout than "
        f"this model ({mismatch}): it was written by another famjax version (e.g. before "
        "the scanned-segment layout) or another model config. Nothing was moved or "
        "deleted; load it with the famjax that wrote it, or train in a new workdir") from error


def _abstract(like: Any) -> Any:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), like)


def _set_aside(mngr: ocp.CheckpointManager, step: int) -> Path:
  source = Path(mngr.directory) / str(step)
  stamp = datetime.datetime.now().strftime("%Y%m%dT%H%M%S")
  target = Path(mngr.directory).parent / DAMAGED_DIR / f"{step}-{stamp}"
  target.parent.mkdir(parents=True, exist_ok=True)
  shutil.move(str(source), str(target))
  return target


def restore_latest(mngr: ocp.CheckpointManager, like: Any) -> tuple[int, Any, dict] | None:
  """(step, state, data state) of the newest checkpoint that restores, or None if none exists.

  Checkpoints newer than that one failed to restore: each is moved to checkpoints_damaged/
  (process 0 moves; every process restores the same step) with one warning line.
  """
  for step in sorted(mngr.all_steps(), reverse=True):
    try:
      state, data_state = restore(mngr, step, like)
    except Exception as e:  # Orbax and TensorStore raise many kinds for a damaged checkpoint
      _refuse_another_layout(mngr, step, like, e)
      reason = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
      where = "kept in place"
      if jax.process_index() == 0:
        where = f"moved to {_set_aside(mngr, step)}"
      logging.warning("checkpoint at step %d does not restore (%s: %s); %s; trying an older one",
                      step, type(e).__name__, reason, where)
      continue
    mngr.reload()
    return step, state, data_state
  mngr.reload()
  return None
