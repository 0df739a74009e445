"""Orbax checkpoints of the train state plus the data-iterator state of every host.

Layout: `WORKDIR/checkpoints/<step>/{state, data}`; `data` holds one JSON file per process
(`process_<i>-of-<n>.json`), so each host resumes its own share of the input pipeline.
"""
import contextlib
import dataclasses
import json
import logging as stdlib_logging
import os
import re
from typing import Any
import zlib

import jax
import jax.numpy as jnp
import numpy as np
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


# Written into a step's folder once orbax has committed it: the CRC-32 of every file of the step.
MANIFEST = "zoo_checksums.json"
# Steps moved out of orbax's sight by `set_aside_after` are renamed `<step>.set_aside.<n>` (orbax reads only integer
# folder names), never deleted.
SET_ASIDE = ".set_aside."


def _crc32(path):
  crc = 0
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      crc = zlib.crc32(chunk, crc)
  return crc


def _step_files(step_dir):
  """Relative paths of the files of a committed step (the manifest excluded), sorted."""
  out = []
  for root, _, files in os.walk(step_dir):
    out += [os.path.relpath(os.path.join(root, f), step_dir) for f in files]
  return sorted(p for p in out if p != MANIFEST)


def _owner(relpath):
  """The process that verifies a file: the one named in its path (`ocdbt.process_3`, `process_3-of-4.json`), else 0."""
  match = re.search(r"process_(\d+)", relpath)
  return int(match.group(1)) if match else 0


class Checkpointer:
  """Periodic (optionally async) saves with keep-N; restore onto any mesh given the target shardings.

  Integrity: after orbax commits a step, the primary process writes `<step>/zoo_checksums.json`, the CRC-32 of every
  file of the step (on the next `save`, `wait` or `close`, since saves may be asynchronous). `restore` recomputes them
  (each process the files it wrote) and refuses a step whose files changed, naming the file and the earlier steps
  that verify; it also refuses non-finite values. A step without a manifest (the process died between the commit and
  the manifest) is restored with the finite check alone. Nothing here ever deletes a step except orbax's keep-N.
  """

  def __init__(self, directory, *, keep=3, use_async=True, create=True):
    self.directory = os.path.abspath(directory)
    if not create and not os.path.isdir(self.directory):
      raise CheckpointNotFound(f"no checkpoint folder {self.directory}")
    options = ocp.CheckpointManagerOptions(max_to_keep=keep, enable_async_checkpointing=use_async, create=create)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=("state", "data"))
    self._unsealed = []

  def latest_step(self):
    return self.manager.latest_step()

  def all_steps(self):
    return sorted(self.manager.all_steps())

  def save(self, step, state, data_state):
    """Start saving `state` (a TrainState) and this host's iterator state at `step`; `wait()` commits it.

    Raises:
      CheckpointError: this or the previous (asynchronous) save failed, e.g. a full disk; the message names the step.
    """
    self.wait()
    try:
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)),
                                                      data=IteratorStateSave(data_state)), force=True)
    except Exception as e:  # orbax/tensorstore raise many types; all mean the save failed
      raise CheckpointError(self._save_failed(step, e)) from None
    self._unsealed.append(step)

  def wait(self):
    """Block until every started save is committed and checksummed.

    Raises:
      CheckpointError: an asynchronous save failed.
    """
    try:
      self.manager.wait_until_finished()
    except Exception as e:
      raise CheckpointError(self._save_failed(self._unsealed[-1] if self._unsealed else "?", e)) from None
    for step in self._unsealed:
      self._seal(step)
    self._unsealed = []

  def poll(self):
    """Commit finished background saves now (so a failed one is reported at once, not at the next save)."""
    if self._unsealed and not self.manager.is_saving_in_progress():
      self.wait()

  def _save_failed(self, step, error):
    good = [s for s in self.all_steps() if s not in self._unsealed]
    code = re.search(r"os_error_code='(\d+)'", str(error))
    reason = os.strerror(int(code.group(1))) if code else f"{type(error).__name__}: {_first_line(error)}"
    return (f"saving checkpoint step {step} in {self.directory} failed ({reason}); the earlier checkpoints {good} are "
            "untouched: fix the cause and run the same command again to resume from the latest")

  def _seal(self, step):
    """Write the manifest of a committed step (primary process)."""
    step_dir = os.path.join(self.directory, str(step))
    if jax.process_index() != 0 or not os.path.isdir(step_dir):
      return
    manifest = {path: _crc32(os.path.join(step_dir, path)) for path in _step_files(step_dir)}
    partial = os.path.join(step_dir, MANIFEST + ".partial")
    try:
      with open(partial, "w") as f:
        json.dump(manifest, f, indent=0, sort_keys=True)
      os.replace(partial, os.path.join(step_dir, MANIFEST))
    except OSError as e:
      raise CheckpointError(f"checkpoint step {step} in {self.directory} was saved but its checksums could not be "
                            f"written ({type(e).__name__}: {_first_line(e)})") from None

  def verify(self, step):
    """The first problem of step `step`'s files as a sentence, or None when they match their manifest (or it has
    none). Every process checks the files it wrote; the verdict is the same on every process."""
    step_dir = os.path.join(self.directory, str(step))
    problem = None
    manifest_path = os.path.join(step_dir, MANIFEST)
    if os.path.exists(manifest_path):
      try:
        with open(manifest_path) as f:
          manifest = json.load(f)
      except (OSError, ValueError) as e:
        manifest, problem = {}, f"its checksum file {MANIFEST} is unreadable ({_first_line(e)})"
      for path, crc in sorted(manifest.items()):
        if problem or _owner(path) % jax.process_count() != jax.process_index():
          continue
        full = os.path.join(step_dir, path)
        if not os.path.exists(full):
          problem = f"its file {path} is missing"
        elif _crc32(full) != crc:
          problem = f"its file {path} does not match the checksum written at save (the file was changed or damaged)"
    return _agree(problem)

  def good_steps(self, before=None):
    """The steps (before `before`) whose files verify."""
    return [s for s in self.all_steps() if (before is None or s < before) and self.verify(s) is None]

  def _corrupted(self, step, problem):
    good = self.good_steps(before=step)
    choose = (f"Steps that verify: {good}; resume from one with `train.py ... --step {good[-1]}` (later steps are set "
              f"aside, not deleted) or score one with `evaluate.py ... --step {good[-1]}`."
              if good else "No earlier step verifies.")
    return f"checkpoint step {step} in {self.directory} is corrupted: {problem}. {choose} Nothing was deleted."

  def restore(self, step, target):
    """Restore step `step` into the shapes and shardings of `target` (a TrainState of ShapeDtypeStructs).

    Returns:
      (state, data_state).

    Raises:
      CheckpointError: the step is missing, its files are corrupted, its values are not finite, or they do not fit
        the model.
    """
    where = f"checkpoint step {step} in {self.directory}"
    if step not in self.all_steps():
      raise CheckpointError(f"{where} does not exist; available steps: {self.all_steps()}")
    problem = self.verify(step)
    if problem:
      raise CheckpointError(self._corrupted(step, problem))
    target_dict = _state_dict(target)
    mismatch = _mismatch(os.path.join(self.directory, str(step), "state"), target_dict)
    if mismatch:
      raise CheckpointError(f"{where} was written by a different model or optimizer config: {mismatch}. Nothing was "
                            "deleted; resume with the config in the workdir's config.json, or start a new workdir "
                            "with config.init_from to reuse the weights")
    try:
      with _quiet_orbax():
        restored = self.manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target_dict), data=IteratorStateRestore()))
    except CheckpointError:
      raise
    except Exception as e:  # orbax/tensorstore raise many types; all mean the same to the user
      raise CheckpointError(f"{where} cannot be restored ({type(e).__name__}: {_first_line(e)}); "
                            "it is corrupted or was written by a different model/optimizer config. "
                            "Nothing was deleted.") from None
    state = type(target)(**{k: _like(target_dict[k], v) for k, v in restored["state"].items()})
    bad = _first_non_finite({"params": state.params, "opt_state": state.opt_state})
    if bad:
      raise CheckpointError(self._corrupted(step, f"it holds non-finite values in {bad}"))
    return state, restored["data"]

  def set_aside_after(self, step):
    """Rename the steps after `step` to `<s>.set_aside.<n>` (out of orbax's sight, kept on disk), so that training
    can resume from `step`. Returns the new names."""
    moved = []
    for s in self.all_steps():
      if s > step:
        n = 0
        while os.path.exists(os.path.join(self.directory, f"{s}{SET_ASIDE}{n}")):
          n += 1
        if jax.process_index() == 0:
          os.rename(os.path.join(self.directory, str(s)), os.path.join(self.directory, f"{s}{SET_ASIDE}{n}"))
        moved.append(f"{s}{SET_ASIDE}{n}")
    self.manager.reload()
    return moved

  def close(self):
    try:
      self.wait()
    finally:
      self.manager.close()


class CheckpointNotFound(CheckpointError, FileNotFoundError):
  """There is no checkpoint where one was asked for."""


def _leaf_names(tree):
  """{orbax leaf name ('params.embed.embedding', 'opt_state.1.0.mu....'): shape} of a pytree."""
  def name(key):
    return str(getattr(key, "key", getattr(key, "idx", getattr(key, "name", key))))
  return {".".join(name(k) for k in path): tuple(leaf.shape)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def _mismatch(state_dir, target):
  """A sentence naming the first leaf whose presence or shape differs between the saved tree and `target`, or None.
  Reads the checkpoint's metadata only, so orbax never starts a restore that cannot succeed."""
  try:
    with _quiet_orbax():
      metadata = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
    saved = {m.name: tuple(m.shape) for m in jax.tree.leaves(metadata) if hasattr(m, "shape")}
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: the restore itself reports it
    return None
  wanted = _leaf_names(target)
  for key in sorted(set(saved) | set(wanted), key=lambda k: (not k.startswith("params."), k)):
    if key not in saved:
      return f"{key} (shape {wanted[key]}) is not in the checkpoint"
    if key not in wanted:
      return f"the checkpoint holds {key} (shape {saved[key]}), which this config does not have"
    if saved[key] != wanted[key]:
      return f"{key} has shape {saved[key]} in the checkpoint but {wanted[key]} in this config"
  return None


def _agree(problem):
  """The first problem any process found (all processes return the same)."""
  if jax.process_count() == 1:
    return problem
  from jax.experimental import multihost_utils
  text = (problem or "").encode()[:4000]
  blob = np.zeros(4096, np.uint8)
  blob[:len(text)] = np.frombuffer(text, np.uint8)
  for row in multihost_utils.process_allgather(blob):
    text = bytes(row).rstrip(b"\0").decode(errors="replace")
    if text:
      return text
  return None


def _first_non_finite(tree):
  """The path of the first floating leaf of `tree` with a NaN or inf, or None."""
  for path, leaf in jax.tree_util.tree_leaves_with_path(tree):
    if jnp.issubdtype(leaf.dtype, jnp.inexact) and not bool(jnp.all(jnp.isfinite(leaf))):
      return jax.tree_util.keystr(path)
  return None


@contextlib.contextmanager
def _quiet_orbax():
  """Orbax logs whole tracebacks (and asyncio's 'Event loop is closed') for a failed restore before raising; the
  caller reports the failure in one line instead."""
  logger = stdlib_logging.getLogger("absl")
  level = logger.level
  logger.setLevel(stdlib_logging.CRITICAL)
  try:
    yield
  finally:
    logger.setLevel(level)


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
  if not os.path.isdir(directory):
    raise CheckpointNotFound(f"config.init_from={path!r}: no such directory {directory}")
  ckpt = Checkpointer(directory, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointNotFound(f"config.init_from={path!r}: no checkpoint found in {directory}")
    problem = ckpt.verify(step)
    if problem:
      raise CheckpointError(f"config.init_from={path!r}: " + ckpt._corrupted(step, problem))
    collections = {k: v for k, v in target.items() if k != "params"}
    item = {"params": target["params"], **({"collections": collections} if collections else {})}
    try:
      with _quiet_orbax():
        restored = ckpt.manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True)))
    except Exception as e:
      raise CheckpointError(f"config.init_from: checkpoint step {step} in {directory} cannot be restored "
                            f"({type(e).__name__}: {_first_line(e)})") from None
  finally:
    ckpt.manager.close()
  restored = _like(item, {k: restored["state"][k] for k in item})
  bad = _first_non_finite(restored)
  if bad:
    raise CheckpointError(f"config.init_from: checkpoint step {step} in {directory} holds non-finite values in {bad}")
  return {"params": restored["params"], **restored.get("collections", {})}


def _like(target, tree):
  """`tree`'s leaves in `target`'s pytree structure (orbax returns namedtuples as tuples/dicts)."""
  return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(tree))


def _first_line(e):
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""
