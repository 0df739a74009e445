"""Train (or resume) an experiment.

  python train.py --config configs/dense_lm.py --workdir DIR [--config.KEY=VALUE ...]

Fine-tune a Hugging Face model with --config.init_from=hf:HF_MODEL_DIR (its config.json sets config.model).
Running the same command again resumes from the latest checkpoint in DIR. Multi-host: start one process per host
with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the JAX_* environment variables; TPU pods
and SLURM are detected).
"""

from absl import app, flags, logging

from zoo.engine import cli

cli.define_flags()
flags.DEFINE_integer(
  "step",
  None,
  "resume from this checkpoint step instead of the latest (e.g. when the latest is "
  "corrupted); the later steps are set aside (renamed, not deleted)",
)


def main(argv):
  logging.set_verbosity(logging.WARNING)
  cli.quiet_checkpoint_noise()
  if len(argv) > 1:
    cli.fail(f"unexpected arguments {argv[1:]}; overrides look like --config.train.steps=100")
  cli.initialize()
  from zoo.engine.trainer import TrainingDivergedError, train

  try:
    train(flags.FLAGS.config, flags.FLAGS.workdir, step=flags.FLAGS.step)
  except cli.USER_ERRORS as e:
    cli.fail(e)
  except OSError as e:  # a full disk, a vanished mount: one line, not a traceback
    cli.fail(f"{type(e).__name__}: {e}", code=1)
  except TrainingDivergedError as e:
    cli.fail(e, code=1)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
