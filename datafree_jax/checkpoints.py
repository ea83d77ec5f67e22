"""orbax CheckpointManager helpers: one manager per stage directory.

Every checkpoint holds the item 'state' (the stage's whole train state: params, BN state,
optimiser state, step) and 'meta' (JSON: what made it, and whether the stage had finished).
The final checkpoint of a stage may hold more items (the teacher's BN statistics). orbax writes
each step into a temporary directory and renames it when complete, so a run killed mid-save
leaves no checkpoint that `latest_step` would return.
"""
from __future__ import annotations

from typing import Any, Mapping, Optional

import jax
import orbax.checkpoint as ocp

from datafree_jax import paths
from datafree_jax.errors import CheckpointError


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs for restoring `tree`, with its arrays' shardings (or `sharding`)."""
  def one(x):
    s = sharding if sharding is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return jax.tree.map(one, tree)


def stage_directory(path: str, stage: str) -> str:
  """The checkpoint directory of `stage` at `path`: `path` itself, or a workdir holding
  `stage`/ (a directory with no step directories of its own and a `stage` subdirectory)."""
  path = paths.resolve(path)
  nested = paths.join(path, stage)
  if paths.isdir(nested) and not any(n.isdigit() for n in paths.listdir(path)):
    return nested
  return path


def latest_meta(directory: str):
  """(step, meta) of the latest checkpoint in `directory`; (None, None) when the directory or
  a checkpoint in it does not exist. Reads only."""
  if not paths.isdir(directory):
    return None, None
  ckpt = StageCheckpoints(directory, create=False)
  try:
    step = ckpt.latest_step()
    return step, (None if step is None else ckpt.restore_meta(step))
  finally:
    ckpt.close()


class StageCheckpoints:
  """The checkpoints of one stage, in `directory`."""

  def __init__(self, directory: str, max_to_keep: int = 2, create: bool = True):
    self.directory = paths.resolve(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=False))

  def latest_step(self) -> Optional[int]:
    return self.manager.latest_step()

  def save(self, step: int, state, meta: Mapping[str, Any], extras: Optional[Mapping] = None):
    items = {"state": ocp.args.StandardSave(state), "meta": ocp.args.JsonSave(dict(meta))}
    for name, tree in (extras or {}).items():
      items[name] = ocp.args.StandardSave(tree)
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    self.manager.wait_until_finished()

  def restore_meta(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      return self.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} is unreadable or corrupt ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''})") from e

  def restore(self, step: int, name: str, abstract_tree, pad: bool = False):
    """Restores item `name` of checkpoint `step` into the shapes/shardings of `abstract_tree`;
    with `pad`, the target's leading size may differ from the saved one: a larger target gets
    the saved array padded with zeros at the end, a smaller one its first rows."""
    try:
      return self.manager.restore(step, args=ocp.args.Composite(**{
          name: ocp.args.StandardRestore(abstract_tree, strict=not pad)}))[name]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"cannot restore {name!r} from checkpoint {self.directory}/{step}: it is corrupt or was "
          f"made for another model/config ({type(e).__name__}: "
          f"{str(e).splitlines()[0] if str(e) else ''})") from e

  def item_shapes(self, step: int, name: str):
    """The saved (shape, dtype) tree of item `name`, as ShapeDtypeStructs without sharding.

    Read from the item's own metadata: the manager knows no handler for an item it has not
    saved or restored in this process and answers None (a restore target of None restores the
    saved shardings, which fails on another device count).
    """
    try:
      with ocp.StandardCheckpointer() as checkpointer:
        meta = checkpointer.metadata(paths.join(self.directory, str(step), name))
      tree = getattr(meta, "item_metadata", meta)
      tree = getattr(tree, "tree", tree)
      return jax.tree.map(lambda m: jax.ShapeDtypeStruct(tuple(m.shape), m.dtype), tree)
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(f"cannot read {name!r} of checkpoint {self.directory}/{step}") from e

  def close(self):
    self.manager.close()
