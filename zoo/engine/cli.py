"""What train.py and evaluate.py share: flags, multi-host start-up, and one-line errors instead of tracebacks."""
import sys

from absl import flags
from ml_collections import config_flags

from zoo.engine.checkpoint import CheckpointError
from zoo.models import ConfigError


def define_flags():
  """--config (a configs/*.py file, with --config.KEY=VALUE overrides), --workdir and the multi-host flags."""
  # New keys are accepted by the flag parser so that any model field can be overridden even when the config file
  # does not list it (`--config.model.chunk_coef=0`); `validate_config` and `build_model` then reject unknown keys
  # with the list of valid ones.
  config_flags.DEFINE_config_file("config", None, "experiment config file, e.g. configs/dense_lm.py",
                                  lock_config=False, accept_new_attributes=True)
  flags.DEFINE_string("workdir", None, "directory for checkpoints, metrics.jsonl, tb/ and eval results")
  flags.DEFINE_string("coordinator_address", None, "multi-host: host:port of process 0")
  flags.DEFINE_integer("num_processes", None, "multi-host: number of processes")
  flags.DEFINE_integer("process_id", None, "multi-host: index of this process")
  flags.mark_flags_as_required(["config", "workdir"])


def parse_flags(argv):
  """absl's parser, with a bad flag or override reported in one line (exit code 2)."""
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:
    fail(e)
  except (AttributeError, KeyError, TypeError, ValueError) as e:  # what ml_collections raises for a bad override
    fail(f"bad --config override: {e}")


def fail(error, code=2):
  print(f"error: {_one_line(error)}", file=sys.stderr)
  sys.exit(code)


def _one_line(error):
  text = str(error).replace("\\'", "'").replace("\\n", " ").replace("\n", " ")
  return " ".join(text.split())


def initialize():
  """Join the multi-host run described by the flags or the environment."""
  from zoo.engine.distributed import maybe_initialize
  maybe_initialize(flags.FLAGS.coordinator_address, flags.FLAGS.num_processes, flags.FLAGS.process_id)


# Errors that mean "the user asked for something wrong": printed as one line, exit code 2.
USER_ERRORS = (ConfigError, ValueError, CheckpointError, FileNotFoundError)
