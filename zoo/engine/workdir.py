"""The workdir of a run: its checks, the lock that keeps one `train.py` per workdir, and its config history.

A workdir holds `checkpoints/`, `metrics.jsonl`, `tb/`, `config.json` (the config of the latest start) and
`config.step<N>.json` (the config a run had before it was resumed at step N with a different one).
"""

import datetime
import fcntl
import json
import os
import socket

LOCK_FILE = ".lock"


class WorkdirError(ValueError):
  """The workdir cannot be used; the message names it and says what is allowed."""


def check_workdir(workdir, *, create):
  """The absolute path of `workdir`, checked to be a writable directory (created when `create`).

  Raises:
    WorkdirError: it is a file, cannot be created, or is not writable.
  """
  path = os.path.abspath(workdir)
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"--workdir={workdir} is a file; allowed: a directory (created when missing)")
  if not os.path.exists(path):
    if not create:
      raise WorkdirError(f"--workdir={workdir} does not exist; train first with train.py --workdir {workdir}")
    try:
      os.makedirs(path)
    except OSError as e:
      raise WorkdirError(f"--workdir={workdir} cannot be created ({e.strerror}); allowed: a path you can write") from e
  if not os.access(path, os.W_OK | os.X_OK):
    raise WorkdirError(
      f"--workdir={workdir} is not writable; allowed: a directory you can write (copy a read-only run to one first)"
    )
  return path


class WorkdirLock:
  """An exclusive `flock` on `WORKDIR/.lock`, held while a run trains in the workdir.

  The kernel drops the lock when its process ends, however it ends (kill -9 included), so a stale lock file of a dead
  process never blocks a restart. The file records the holder (pid, host, start time) for the message of the
  refused second run. (`flock` on a network file system is as reliable as that file system's locks.)
  """

  def __init__(self, workdir):
    self.path = os.path.join(workdir, LOCK_FILE)
    self._file = None

  def __enter__(self):
    f = open(self.path, "a+")
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise WorkdirError(
        f"--workdir={os.path.dirname(self.path)} is in use by a training run ({holder}); allowed: "
        "one train.py per workdir: wait for it to finish, stop it (it saves on SIGTERM), or use "
        "another --workdir"
      ) from None
    f.seek(0)
    f.truncate()
    started = datetime.datetime.now().isoformat(timespec="seconds")
    f.write(f"pid {os.getpid()} on {socket.gethostname()} since {started}\n")
    f.flush()
    self._file = f
    return self

  def __exit__(self, *exc):
    fcntl.flock(self._file, fcntl.LOCK_UN)
    self._file.close()


def _flat(tree, prefix=""):
  out = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      out.update(_flat(value, f"{prefix}{key}."))
    else:
      out[prefix + key] = value
  return out


def record_config(workdir, config, start_step):
  """Write `config` as `WORKDIR/config.json` (atomically); when a run resumes (start_step > 0) with a config that
  differs from the one recorded, the old file is kept as `config.step<start_step>.json`.

  Returns:
    ['key: old -> new', ...] for a resumed run whose config changed (empty otherwise).
  """
  path = os.path.join(workdir, "config.json")
  text = config.to_json_best_effort(indent=2, sort_keys=True) + "\n"
  changes = []
  if start_step > 0 and os.path.exists(path):
    with open(path) as f:
      old_text = f.read()
    if old_text != text:
      try:
        old = _flat(json.loads(old_text))
        new = _flat(json.loads(text))
        changes = [
          f"{k}: {old.get(k, '(unset)')!r} -> {new.get(k, '(unset)')!r}"
          for k in sorted(set(old) | set(new))
          if old.get(k) != new.get(k)
        ]
      except ValueError:
        changes = ["config.json was unreadable"]
      kept, n = os.path.join(workdir, f"config.step{start_step}.json"), 1
      while os.path.exists(kept):
        kept, n = os.path.join(workdir, f"config.step{start_step}.{n}.json"), n + 1
      os.replace(path, kept)
  partial = path + ".partial"
  with open(partial, "w") as f:
    f.write(text)
  os.replace(partial, path)
  return changes
