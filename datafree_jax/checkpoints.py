"""orbax CheckpointManager helpers: one manager per stage directory.

Layout. Every checkpoint `<stage dir>/<step>/` holds the item 'meta' (JSON: what made it, and
whether the stage had finished) and the stage's train state (params, BN state, optimiser state,
step):
  - a periodic or preemption checkpoint: the item 'state', the whole train state;
  - a final checkpoint: the item 'state' and the stage's final items (the teacher's 'teacher'
    and 'bn_stats'), except for a stage that names a final item holding part of its state
    (`state_item`, the generator ensemble's 'generators': parameters and BN state only). Its
    final checkpoint holds that item and the item 'resume' (the rest of the state: optimiser
    state and step), no 'state'; meta['state_items'] names the two. Later stages read only the
    final item; 'resume' is needed only to continue the finished stage to more steps, and may be
    deleted (`rm -r <stage dir>/<step>/resume`; in a bucket, every object under that prefix).
    Checkpoints written before this layout (a whole 'state' beside 'generators') still load.
  Once a final checkpoint is complete, the stage's earlier checkpoints are deleted.

Saving. Saves are asynchronous (orbax's AsyncCheckpointer): `save(..., wait=False)` returns once
the arrays are copied off the devices to host memory (the time it blocks the caller), and the
write continues in background threads; later changes to the state, donated buffers included,
do not reach the checkpoint. `wait(timeout)` waits for it; a next save waits for the previous
one first. orbax writes each step into a temporary directory and renames it when complete (on
GCS: a commit marker), so a run killed mid-save leaves no checkpoint that `latest_step` of a
new manager would return; its leftover temporary directory is removed when the stage directory
is next opened for writing.
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, Mapping, Optional

import jax
import numpy as np
import orbax.checkpoint as ocp

from datafree_jax import paths
from datafree_jax.errors import CheckpointError

STATE = "state"
RESUME = "resume"     # a final checkpoint's part of the state beside its `state_item`
META = "meta"


def abstract_like(tree, sharding=None):
  """ShapeDtypeStructs for restoring `tree`, with its arrays' shardings (or `sharding`)."""
  def one(x):
    s = sharding if sharding is not None else getattr(x, "sharding", None)
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s)
  return jax.tree.map(one, tree)


def tree_bytes(tree) -> int:
  """Logical bytes of a pytree of arrays or ShapeDtypeStructs (the whole arrays: what all
  processes together write)."""
  return sum(int(np.prod(x.shape, dtype=np.int64)) * np.dtype(x.dtype).itemsize
             for x in jax.tree.leaves(tree))


def format_bytes(n: float) -> str:
  for unit, size in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
    if n >= size:
      return f"{n / size:.2f} {unit}"
  return f"{int(n)} B"


def split_final_state(state: Mapping, part: Mapping) -> dict:
  """The 'resume' item of a final checkpoint: the entries of `state` that `part` (the final
  item holding the rest, keyed like the state) does not hold."""
  missing = [k for k in part if k not in state]
  if missing:
    raise ValueError(f"the final item's keys {missing} are not keys of the state "
                     f"({sorted(state)})")
  return {k: v for k, v in state.items() if k not in part}


def checkpoint_items(state, extras: Optional[Mapping] = None,
                     state_item: Optional[str] = None) -> dict:
  """{item name: tree} of the arrays a checkpoint holds (StageCheckpoints.save's layout; 'meta'
  left out): 'state', or with `state_item` 'resume' and that item, and the `extras`."""
  extras = dict(extras or {})
  if state_item is not None:
    return dict({RESUME: split_final_state(state, extras[state_item])}, **extras)
  return dict({STATE: state}, **extras)


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


@dataclasses.dataclass
class SaveReport:
  """One save: its items' logical bytes, how long it blocked the caller, and (once complete)
  how long it took from the call until the checkpoint was complete."""
  step: int
  items: dict                       # item name -> bytes (all processes together)
  blocked_s: float                  # the save call: waiting for a previous save, host copy
  started: float                    # time.monotonic() of the call
  seconds: Optional[float] = None   # call to complete; None while it is being written

  @property
  def nbytes(self) -> int:
    return sum(self.items.values())

  def describe(self) -> str:
    """'state 1.20 GiB, meta' (the items and their sizes)."""
    return ", ".join(f"{name} {format_bytes(n)}" if n else name
                     for name, n in self.items.items())


class StageCheckpoints:
  """The checkpoints of one stage, in `directory` (asynchronous saves when `create`)."""

  def __init__(self, directory: str, max_to_keep: int = 2, create: bool = True):
    self.directory = paths.resolve(directory)
    self.manager = ocp.CheckpointManager(
        self.directory,
        options=ocp.CheckpointManagerOptions(
            max_to_keep=max_to_keep, create=create, enable_async_checkpointing=create,
            cleanup_tmp_directories=create))
    self._in_flight: Optional[SaveReport] = None
    self._complete = self.manager.latest_step()
    self.last: Optional[SaveReport] = None   # the last completed save of this manager

  def latest_step(self) -> Optional[int]:
    """The latest step saved (a save in flight included: it completes before close)."""
    return self.manager.latest_step()

  def complete_step(self) -> Optional[int]:
    """The latest step whose checkpoint is complete: what a resume would start from if the
    process died now."""
    self.in_flight()
    return self._complete

  def save(self, step: int, state, meta: Mapping[str, Any], extras: Optional[Mapping] = None,
           wait: bool = True, state_item: Optional[str] = None) -> SaveReport:
    """Saves checkpoint `step`: `state`, `meta` and the items `extras`. With `state_item` (a
    final checkpoint), the item of `extras` of that name holds part of the state and the item
    'resume' the rest, instead of 'state'. Waits for a save in flight first; with `wait`, also
    for this one. The values saved are the state's at the call."""
    t0 = time.monotonic()
    meta = dict(meta)
    trees = checkpoint_items(state, extras, state_item)
    if state_item is not None:
      meta["state_items"] = [state_item, RESUME]
    items = {META: ocp.args.JsonSave(meta)}
    items.update({name: ocp.args.StandardSave(tree) for name, tree in trees.items()})
    self.wait()
    self.manager.save(step, args=ocp.args.Composite(**items), force=True)
    sizes = {name: tree_bytes(tree) for name, tree in trees.items()}
    sizes[META] = 0
    report = SaveReport(step, sizes, blocked_s=time.monotonic() - t0, started=t0)
    self._in_flight = report
    if wait:
      self.wait()
    return report

  def in_flight(self) -> Optional[SaveReport]:
    """The save being written in the background, None when there is none."""
    if self._in_flight is not None and not self.manager.is_saving_in_progress():
      self.wait()
    return self._in_flight

  def wait(self, timeout: Optional[float] = None) -> bool:
    """Waits for the save in flight, at most `timeout` seconds (None: until it completes);
    True when no save is left in flight. Raises CheckpointError when the write failed."""
    report = self._in_flight
    if report is None:
      return True
    if timeout is not None:
      deadline = time.monotonic() + timeout
      while self.manager.is_saving_in_progress():
        if time.monotonic() >= deadline:
          return False
        time.sleep(0.005)
    try:
      self.manager.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      self._in_flight = None
      raise CheckpointError(f"writing checkpoint {self.directory}/{report.step} failed "
                            f"({type(e).__name__}: {_first_line(e)})") from e
    report.seconds = time.monotonic() - report.started
    self._in_flight, self._complete, self.last = None, report.step, report
    return True

  def delete_others(self, keep: int) -> None:
    """Deletes every checkpoint but step `keep` (no save may be in flight)."""
    self.wait()
    for step in self.manager.all_steps():
      if step != keep:
        self.manager.delete(step)

  def restore_meta(self, step: Optional[int] = None) -> dict:
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      return self.manager.restore(step, args=ocp.args.Composite(
          **{META: ocp.args.JsonRestore()}))[META]
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} is unreadable or corrupt ({type(e).__name__}: "
          f"{_first_line(e)})") from e

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
          f"made for another model/config ({type(e).__name__}: {_first_line(e)})") from e

  def _state_items(self, step: int, meta: Optional[Mapping]) -> Optional[tuple]:
    """(state_item, 'resume') of a final checkpoint in the split layout, else None; raises
    CheckpointError when its 'resume' item was deleted."""
    meta = self.restore_meta(step) if meta is None else meta
    names = meta.get("state_items")
    if not names:
      return None
    if not paths.isdir(paths.join(self.directory, str(step), RESUME)):
      raise CheckpointError(
          f"the finished checkpoint {self.directory}/{step} holds no {RESUME!r} item (it was "
          f"deleted): its {names[0]!r} can be read, but the stage cannot be continued to more "
          "steps; keep its steps as they were or start a new workdir")
    return tuple(names)

  def restore_state(self, step: int, abstract_state, meta: Optional[Mapping] = None):
    """The whole train state of checkpoint `step` in the shapes/shardings of `abstract_state`
    (a dict): the 'state' item, or in a final checkpoint of the split layout its state item
    and 'resume' merged."""
    names = self._state_items(step, meta)
    if names is None:
      return self.restore(step, STATE, abstract_state)
    part, rest = names
    part_keys = self.item_shapes(step, part).keys()
    out = dict(self.restore(step, rest, {k: v for k, v in abstract_state.items()
                                         if k not in part_keys}))
    out.update(self.restore(step, part, {k: abstract_state[k] for k in part_keys}))
    return {k: out[k] for k in abstract_state}

  def state_shapes(self, step: int, meta: Optional[Mapping] = None):
    """The saved train state's (shape, dtype) tree (item_shapes), in either layout."""
    names = self._state_items(step, meta)
    if names is None:
      return self.item_shapes(step, STATE)
    return dict(self.item_shapes(step, names[1]), **self.item_shapes(step, names[0]))

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
    """Waits for a save in flight (it completes), then closes the manager."""
    try:
      self.wait()
    finally:
      self.manager.close()


def _first_line(e: BaseException) -> str:
  return str(e).splitlines()[0] if str(e) else ""
