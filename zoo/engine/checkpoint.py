"""Orbax checkpoints of the train state plus the data-iterator state of every host.

Layout: `WORKDIR/checkpoints/<step>/{state, data}`; `data` holds one JSON file per process
(`process_<i>-of-<n>.json`), so each host resumes its own share of the input pipeline.
"""
import dataclasses
import json
import os
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message names the directory and the step."""


class IteratorStateHandler(ocp.CheckpointHandler):
  """Saves/restores the JSON state (`get_state()`) of this process's data iterator."""

  def save(self, directory: epath.Path, args: "IteratorStateSave"):
    name = f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    (directory / name).write_text(json.dumps(_to_json(args.state)))

  def restore(self, directory: epath.Path, args: "IteratorStateRestore" = None):
    path = directory / f"process_{jax.process_index()}-of-{jax.process_count()}.json"
    if not path.exists():
      raise CheckpointError(f"{path} is missing: the checkpoint was written by a different number of processes")
    return _from_json(json.loads(path.read_text()))

  def metadata(self, directory):
    return None

  def finalize(self, directory):
    pass

  def close(self):
    pass


def _to_json(state):
  if isinstance(state, bytes):
    return {"bytes": state.decode()}
  return {"value": state}


def _from_json(blob):
  return blob["bytes"].encode() if "bytes" in blob else blob["value"]


@ocp.args.register_with_handler(IteratorStateHandler, for_save=True)
@dataclasses.dataclass
class IteratorStateSave(ocp.args.CheckpointArgs):
  state: Any


@ocp.args.register_with_handler(IteratorStateHandler, for_restore=True)
@dataclasses.dataclass
class IteratorStateRestore(ocp.args.CheckpointArgs):
  pass


def _state_dict(state):
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state,
          "collections": state.collections}


def checkpoint_dir(path):
  """A workdir or its `checkpoints/` folder -> the checkpoints folder."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) or not os.path.isdir(path) else path


class Checkpointer:
  """Periodic (optionally async) saves with keep-N; restore onto any mesh given the target shardings."""

  def __init__(self, directory, *, keep=3, use_async=True):
    self.directory = os.path.abspath(directory)
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return list(self.manager.all_steps())

  def save(self, step, state, data_state):
    """Save `state` (a TrainState) and this host's iterator state at `step`."""
    self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)),
                                                    data=IteratorStateSave(data_state)), force=True)

  def restore(self, step, target):
    """Restore step `step` into the shapes and shardings of `target` (a TrainState of ShapeDtypeStructs).

    Returns:
      (state, data_state).

    Raises:
      CheckpointError: the step is missing, the files are corrupted or they do not fit the model.
    """
    where = f"checkpoint step {step} in {self.directory}"
    if step not in self.all_steps():
      raise CheckpointError(f"{where} does not exist; available steps: {self.all_steps()}")
    target_dict = _state_dict(target)
    try:
      restored = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(target_dict), data=IteratorStateRestore()))
    except CheckpointError:
      raise
    except Exception as e:  # orbax/tensorstore raise many types; all mean the same to the user
      raise CheckpointError(f"{where} cannot be restored ({type(e).__name__}: {_first_line(e)}); "
                            "it is corrupted or was written by a different model/optimizer config. "
                            "Nothing was deleted.") from None
    state = type(target)(**{k: _like(target_dict[k], v) for k, v in restored["state"].items()})
    return state, restored["data"]

  def wait(self):
    self.manager.wait_until_finished()

  def close(self):
    self.manager.close()


def restore_params(path, target_params):
  """The params (and nothing else) of the latest checkpoint under `path`, restored into `target_params`'s shapes
  and shardings."""
  return restore_variables(path, {"params": target_params})["params"]


def restore_variables(path, target):
  """The variables of the latest checkpoint under `path`, for `config.init_from`.

  Args:
    path: a workdir or its checkpoints/ folder.
    target: `{'params': ..., <collection>: ...}` of ShapeDtypeStructs (or arrays) with target shardings: the params
      and the non-param collections (`routing_state`, `batch_stats`, ...) to restore; the optimizer state and step
      are not read.

  Returns:
    The restored variables, in `target`'s structure.
  """
  directory = checkpoint_dir(path)
  manager = ocp.CheckpointManager(directory, item_names=("state", "data"))
  step = manager.latest_step()
  if step is None:
    raise CheckpointError(f"config.init_from={path!r}: no checkpoint found in {directory}")
  collections = {k: v for k, v in target.items() if k != "params"}
  item = {"params": target["params"], **({"collections": collections} if collections else {})}
  try:
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
  except Exception as e:
    raise CheckpointError(f"config.init_from: checkpoint step {step} in {directory} cannot be restored "
                          f"({type(e).__name__}: {_first_line(e)})") from None
  finally:
    manager.close()
  restored = _like(item, {k: restored["state"][k] for k in item})
  return {"params": restored["params"], **restored.get("collections", {})}


def _like(target, tree):
  """`tree`'s leaves in `target`'s pytree structure (orbax returns namedtuples as tuples/dicts)."""
  return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(tree))


def _first_line(e):
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""
