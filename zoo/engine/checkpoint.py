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
import zlib
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
from etils import epath
from flax import traverse_util


class CheckpointError(RuntimeError):
  """A checkpoint cannot be used; the message names the directory and the step."""


class IteratorStateHandler(ocp.CheckpointHandler):
  """Saves/restores the JSON state (`get_state()`) of this process's data iterator.

  grain ships an orbax handler for the same file layout (`grain.checkpoint.CheckpointHandler`), but it takes a grain
  `DatasetIterator` object at restore time and writes its bare state; the zoo's iterator (`zoo.data.DataIterator`)
  adds a fingerprint of the data it reads, and checkpoints written so far hold `{"value": state}`, which grain's
  handler would pass on unread. This handler keeps those checkpoints readable.
  """

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
  """What a step checkpoint holds: everything but the frozen parameters (saved once, see `Checkpointer`)."""
  return {"step": state.step, "params": state.params, "opt_state": state.opt_state, "collections": state.collections}


def checkpoint_dir(path):
  """A workdir or its `checkpoints/` folder -> the checkpoints folder."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) or not os.path.isdir(path) else path


# Written into a step's folder once orbax has committed it: the CRC-32 of every file of the step.
MANIFEST = "zoo_checksums.json"
# The frozen parameters of a run, written once (`Checkpointer.save`), beside the steps.
FROZEN = "frozen"
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
    self._frozen_saved = os.path.isdir(os.path.join(self.directory, FROZEN)) and self.latest_step() is not None

  def _save_frozen(self, frozen):
    """Write the frozen parameters once per run to `<directory>/frozen` (with its checksums); a store left by an
    earlier run that saved no step is set aside, not deleted."""
    path = os.path.join(self.directory, FROZEN)
    if os.path.exists(path) and jax.process_index() == 0:
      n = 0
      while os.path.exists(f"{path}{SET_ASIDE}{n}"):
        n += 1
      os.rename(path, f"{path}{SET_ASIDE}{n}")
    try:
      with _quiet_orbax():
        checkpointer = ocp.StandardCheckpointer()
        checkpointer.save(path, frozen)
        checkpointer.wait_until_finished()
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(self._save_failed("frozen parameters", e)) from None
    self._seal(FROZEN)
    self._frozen_saved = True

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
    if state.frozen and not self._frozen_saved:
      self._save_frozen(state.frozen)
    try:
      self.manager.save(
        step,
        args=ocp.args.Composite(state=ocp.args.StandardSave(_state_dict(state)), data=IteratorStateSave(data_state)),
        force=True,
      )
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
    return (
      f"saving checkpoint step {step} in {self.directory} failed ({reason}); the earlier checkpoints {good} are "
      "untouched: fix the cause and run the same command again to resume from the latest"
    )

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
      raise CheckpointError(
        f"checkpoint step {step} in {self.directory} was saved but its checksums could not be "
        f"written ({type(e).__name__}: {_first_line(e)})"
      ) from None

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
    choose = (
      f"Steps that verify: {good}; resume from one with `train.py ... --step {good[-1]}` (later steps are set "
      f"aside, not deleted) or score one with `evaluate.py ... --step {good[-1]}`."
      if good
      else "No earlier step verifies."
    )
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
      raise CheckpointError(
        f"{where} was written by a different model or optimizer config: {mismatch}. Nothing was "
        "deleted; resume with the config in the workdir's config.json, or start a new workdir "
        "with config.init_from to reuse the weights"
      )
    try:
      with _quiet_orbax():
        restored = self.manager.restore(
          step, args=ocp.args.Composite(state=ocp.args.StandardRestore(target_dict), data=IteratorStateRestore())
        )
    except CheckpointError:
      raise
    except Exception as e:  # orbax/tensorstore raise many types; all mean the same to the user
      raise CheckpointError(
        f"{where} cannot be restored ({type(e).__name__}: {_first_line(e)}); "
        "it is corrupted or was written by a different model/optimizer config. "
        "Nothing was deleted."
      ) from None
    state = type(target)(
      **{k: _like(target_dict[k], v) for k, v in restored["state"].items()},
      frozen=self._restore_frozen(target.frozen) if target.frozen else {},
    )
    bad = _first_non_finite({"params": state.params, "opt_state": state.opt_state, "frozen": state.frozen})
    if bad:
      raise CheckpointError(self._corrupted(step, f"it holds non-finite values in {bad}"))
    return state, restored["data"]

  def _restore_frozen(self, target):
    path = os.path.join(self.directory, FROZEN)
    if not os.path.isdir(path):
      raise CheckpointError(
        f"{path} is missing: the frozen parameters of this run were saved there; allowed: the "
        "config the checkpoints were written with (config.json)"
      )
    problem = self.verify(FROZEN)
    if problem:
      raise CheckpointError(f"the frozen parameters in {path} are corrupted: {problem}. Nothing was deleted.")
    mismatch = _mismatch(path, target)
    if mismatch:
      raise CheckpointError(f"the frozen parameters in {path} do not fit this config: {mismatch}")
    with _quiet_orbax():
      return ocp.StandardCheckpointer().restore(path, target)

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

  return {
    ".".join(name(k) for k in path): tuple(leaf.shape) for path, leaf in jax.tree_util.tree_leaves_with_path(tree)
  }


def _mismatch(state_dir, target):
  """A sentence naming the first leaf whose presence or shape differs between the saved tree and `target`, or None.
  Reads the checkpoint's metadata only, so orbax never starts a restore that cannot succeed."""
  saved = _saved_shapes(state_dir)
  if not saved:  # unreadable metadata: the restore itself reports it
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
  blob[: len(text)] = np.frombuffer(text, np.uint8)
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


def restore_variables(path, target, *, partial=False, key="config.init_from"):
  """The variables of the latest checkpoint under `path`, for `config.init_from` (or the config key `key` names).

  Args:
    path: a workdir or its checkpoints/ folder.
    target: `{'params': ..., <collection>: ...}` of ShapeDtypeStructs (or arrays) with target shardings: the params
      and the non-param collections (`routing_state`, `batch_stats`, ...) to restore; the optimizer state and step
      are not read. Frozen parameters the run saved beside its steps are read too.
    partial: False: every leaf of `target` must be in the checkpoint. True: the leaves the checkpoint lacks are left
      out of the result (they keep their initialisation, e.g. adapters added to a trained model).

  Returns:
    The restored variables as nested dicts in `target`'s layout (only the leaves the checkpoint has, with partial).

  Raises:
    CheckpointNotFound / CheckpointError: no checkpoint, a corrupted one, or one whose parameters do not fit `target`
      (a leaf the model lacks, a shape that differs, or with partial=False a leaf the checkpoint lacks).
  """
  directory = checkpoint_dir(path)
  where = f"{key}={path!r}"
  if not os.path.isdir(directory):
    raise CheckpointNotFound(f"{where}: no such directory {directory}")
  ckpt = Checkpointer(directory, create=False)
  try:
    step = ckpt.latest_step()
    if step is None:
      raise CheckpointNotFound(f"{where}: no checkpoint found in {directory}")
    for name in (step, FROZEN):
      problem = ckpt.verify(name) if os.path.isdir(os.path.join(directory, str(name))) else None
      if problem:
        raise CheckpointError(f"{where}: " + ckpt._corrupted(step, problem))
    step_dir, frozen_dir = os.path.join(directory, str(step), "state"), os.path.join(directory, FROZEN)
    in_step_dir = _saved_shapes(step_dir)
    in_frozen_dir = {"params." + k: v for k, v in _saved_shapes(frozen_dir).items()}
    saved = {**in_step_dir, **in_frozen_dir}
    flat = {
      ("params", *p) if k == "params" else ("collections", k, *p): leaf
      for k, tree in target.items()
      for p, leaf in traverse_util.flatten_dict(dict(tree)).items()
    }
    wanted = {".".join(map(str, p)): p for p in flat}
    for name, shape in saved.items():
      if name.startswith(("params.", "collections.")) and name not in wanted:
        raise CheckpointError(f"{where}: the checkpoint holds {name} (shape {shape}), which the model does not have")
    for name, p in wanted.items():
      if name not in saved and not partial:
        raise CheckpointError(f"{where}: {name} is not in checkpoint step {step} of {directory}")
      if name in saved and saved[name] != tuple(flat[p].shape):
        raise CheckpointError(
          f"{where}: {name} has shape {saved[name]} in the checkpoint but {tuple(flat[p].shape)} in the model"
        )
    in_step = {p: flat[p] for n, p in wanted.items() if n in in_step_dir}
    in_frozen = {p[1:]: flat[p] for n, p in wanted.items() if n in in_frozen_dir}
    restored = {}
    try:
      with _quiet_orbax():
        if in_step:
          restored.update(traverse_util.flatten_dict(_pytree_restore(step_dir, in_step)))
        if in_frozen:
          restored.update(
            {("params", *k): v for k, v in traverse_util.flatten_dict(_pytree_restore(frozen_dir, in_frozen)).items()}
          )
    except Exception as e:  # pylint: disable=broad-except
      raise CheckpointError(
        f"{where}: checkpoint step {step} in {directory} cannot be restored ({type(e).__name__}: {_first_line(e)})"
      ) from None
  finally:
    ckpt.manager.close()
  variables = {}
  for p, value in restored.items():
    key, rest = ("params", p[1:]) if p[0] == "params" else (p[1], p[2:])
    variables.setdefault(key, {})[rest] = value
  variables = {k: traverse_util.unflatten_dict(v) for k, v in variables.items()}
  bad = _first_non_finite(variables)
  if bad:
    raise CheckpointError(f"{where}: checkpoint step {step} in {directory} holds non-finite values in {bad}")
  return variables


def _saved_shapes(state_dir):
  """{orbax leaf name: shape} of a saved pytree (metadata only); {} when there is none."""
  if not os.path.isdir(state_dir):
    return {}
  try:
    with _quiet_orbax():
      metadata = ocp.StandardCheckpointer().metadata(state_dir).item_metadata
  except Exception:  # pylint: disable=broad-except  # unreadable metadata: the restore itself reports it
    return {}
  return {m.name: tuple(m.shape) for m in jax.tree.leaves(metadata) if hasattr(m, "shape")}


def _pytree_restore(directory, flat_target):
  """Restore the leaves `flat_target` ({path tuple: ShapeDtypeStruct or array}) of the pytree saved in `directory`."""
  item = traverse_util.unflatten_dict(flat_target)
  return ocp.PyTreeCheckpointer().restore(
    directory,
    args=ocp.args.PyTreeRestore(
      item=item, restore_args=ocp.checkpoint_utils.construct_restore_args(item), partial_restore=True
    ),
  )


def _like(target, tree):
  """`tree`'s leaves in `target`'s pytree structure (orbax returns namedtuples as tuples/dicts)."""
  return jax.tree.unflatten(jax.tree.structure(target), jax.tree.leaves(tree))


def _first_line(e):
  text = str(e).strip().splitlines()
  return text[0][:300] if text else ""
