"""Train (or resume) an experiment.

  python train.py --config configs/dense_lm.py --workdir DIR [--config.KEY=VALUE ...]

Fine-tune a Hugging Face model with --config.init_from=hf:HF_MODEL_DIR (its config.json sets config.model).
Running the same command again resumes from the latest checkpoint in DIR. Multi-host: start one process per host
with --coordinator_address=HOST:PORT --num_processes=N --process_id=I (or the JAX_* environment variables; TPU pods
and SLURM are detected).
"""

from absl import app, flags

from zoo.engine import cli

cli.define_flags()
flags.DEFINE_integer(
  "step",
  None,
  "resume from this checkpoint step instead of the latest (e.g. when the latest is "
  "corrupted); the later steps are set aside (renamed, not deleted)",
)


def main(argv):
  cli.start(argv, "--config.train.steps=100")
  from zoo.engine.trainer import TrainingDivergedError, train

  with cli.one_line_errors(fatal=TrainingDivergedError):
    train(flags.FLAGS.config, flags.FLAGS.workdir, step=flags.FLAGS.step)


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
