"""What train.py and evaluate.py share: flags, multi-host start-up, and one-line errors instead of tracebacks."""

import ast
import atexit
import contextlib
import logging as stdlib_logging
import os
import sys
import threading

import ml_collections
from absl import flags, logging
from ml_collections import config_flags

from zoo.engine.checkpoint import CheckpointError
from zoo.models import ConfigError


def define_flags():
  """--config (a configs/*.py file, with --config.KEY=VALUE overrides), --workdir and the multi-host flags."""
  # New keys are accepted by the flag parser so that any model field can be overridden even when the config file
  # does not list it (`--config.model.chunk_coef=0`); `validate_config` and `build_model` then reject unknown keys
  # with the list of valid ones.
  config_flags.DEFINE_config_file(
    "config", None, "experiment config file, e.g. configs/dense_lm.py", lock_config=False, accept_new_attributes=True
  )
  flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, tb/ and eval results")
  flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-host: index of this process")
  flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's parser, with a bad flag, config file or override reported in one line (exit code 2)."""
  path = _config_path(argv)
  if path is not None:
    check_config_file(path)
  try:
    rest = flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # what ml_collections raises for a bad override
    fail(f"bad --config override: {e}")
  except Exception as e:  # pylint: disable=broad-except  # the config file raised while it was loaded
    fail(f"--config={path}: {type(e).__name__}: {e}")
  config = flags.FLAGS.config
  if not isinstance(config, ml_collections.ConfigDict):
    fail(
      f"--config={path}: get_config() returned a {type(config).__name__}; allowed: an ml_collections.ConfigDict "
      "(start from configs.base.get_base_config)"
    )
  return rest


def _config_path(argv):
  """The file of `--config=PATH` / `--config PATH` in argv (without a ':' argument suffix), or None."""
  for i, arg in enumerate(argv):
    if arg.startswith("--config="):
      return arg.split("=", 1)[1].split(":", 1)[0]
    if arg == "--config" and i + 1 < len(argv):
      return argv[i + 1].split(":", 1)[0]
  return None


def check_config_file(path):
  """One line (exit 2) unless `path` is a Python file that defines get_config()."""
  if not os.path.exists(path):
    fail(f"--config={path} does not exist; allowed: a Python file defining get_config(), e.g. configs/dense_lm.py")
  if not os.path.isfile(path):
    fail(f"--config={path} is not a file; allowed: a Python file defining get_config(), e.g. configs/dense_lm.py")
  if not path.endswith(".py"):
    fail(f"--config={path} is not a .py file; allowed: a Python file defining get_config(), e.g. configs/dense_lm.py")
  try:
    with open(path, "rb") as f:
      tree = ast.parse(f.read(), filename=path)
  except (SyntaxError, ValueError, OSError) as e:
    line = f" line {e.lineno}" if getattr(e, "lineno", None) else ""
    fail(f"--config={path}{line}: {type(e).__name__}: {getattr(e, 'msg', e)}")
  if not any(isinstance(node, ast.FunctionDef) and node.name == "get_config" for node in tree.body):
    fail(
      f"--config={path} defines no get_config(); allowed: a Python file defining get_config() that returns an "
      "ml_collections.ConfigDict"
    )


def fail(error, code=2):
  print(f"error: {_one_line(error)}", file=sys.stderr)
  sys.exit(code)


def _one_line(error):
  text = str(error).replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  return " ".join(text.split())


class _DropTracebacks:
  """sys.stderr's stand-in: drops the tracebacks that end in one of `drop`, passes everything else through as it comes
  (progress bars included). Python prints a traceback in pieces, so a traceback is collected line by line until its
  first unindented line after the header; nothing is held longer than that (and all of it at exit)."""

  def __init__(self, stream, drop):
    self._stream, self._drop, self._lock = stream, drop, threading.Lock()
    self._block, self._line = None, ""
    atexit.register(self.flush)

  def write(self, text):
    with self._lock:
      if self._block is None and not text.startswith("Traceback (most recent call last):"):
        self._stream.write(text)
        return len(text)
      if self._block is None:
        self._block = []
      self._line += text
      while "\n" in self._line and self._block is not None:
        line, self._line = self._line.split("\n", 1)
        self._block.append(line + "\n")
        if len(self._block) > 1 and line[:1].strip():
          if line.strip() not in self._drop:
            self._stream.write("".join(self._block))
          self._block = None
      if self._block is None and self._line:
        rest, self._line = self._line, ""
        self._stream.write(rest)
    return len(text)

  def flush(self):
    with self._lock:
      if self._block is not None:
        self._stream.write("".join(self._block) + self._line)
        self._block, self._line = None, ""
    self._stream.flush()

  def __getattr__(self, name):
    return getattr(self._stream, name)


def quiet_checkpoint_noise():
  """Keep a failed checkpoint read or write to the one line the engine prints: orbax logs the failure from each of its
  background threads with a traceback, and asyncio logs one ('Event loop is closed', 'Task exception was never
  retrieved') for every tensorstore write still pending when orbax gives up, and tensorstore prints 'Event loop is
  closed' tracebacks of its own."""

  class _NoCheckpointNoise(stdlib_logging.Filter):
    def filter(self, record):
      return (
        "orbax" not in record.pathname
        and record.name != "asyncio"
        and not (record.exc_info and str(record.exc_info[1]) == "Event loop is closed")
      )

  for handler in stdlib_logging.getLogger().handlers:
    handler.addFilter(_NoCheckpointNoise())
  sys.stderr = _DropTracebacks(sys.stderr, {"RuntimeError: Event loop is closed"})


def initialize():
  """Join the multi-host run described by the flags or the environment."""
  from zoo.engine.distributed import maybe_initialize

  maybe_initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)


def start(argv, override_example):
  """An entry point's start: warnings-only logging, quiet checkpoint noise, no stray arguments (`override_example`
  shows what an override looks like), then the multi-host join."""
  logging.set_verbosity(logging.WARNING)
  quiet_checkpoint_noise()
  if len(argv) > 1:
    fail(f"unexpected arguments {argv[1:]}; overrides look like {override_example}")
  initialize()


@contextlib.contextmanager
def one_line_errors(fatal=()):
  """Ends the process with one line for an error raised in the block: exit code 2 for USER_ERRORS, 1 for an OSError
  (a full disk, a vanished mount) or one of the exception types `fatal`."""
  try:
    yield
  except USER_ERRORS as e:
    fail(e)
  except OSError as e:
    fail(f"{type(e).__name__}: {e}", code=1)
  except fatal as e:
    fail(e, code=1)


# Errors that mean "the user asked for something wrong": printed as one line, exit code 2.
USER_ERRORS = (
  ConfigError,
  ValueError,
  CheckpointError,
  FileNotFoundError,
  PermissionError,
  IsADirectoryError,
  NotADirectoryError,
)
