"""Evaluate a checkpoint: metrics, routing plots, and (language models) a text sample decoded with the KV cache.

  python evaluate.py --config configs/dense_lm.py --workdir DIR [--step N] [--config.KEY=VALUE ...]
  python evaluate.py --config configs/dense_lm.py --workdir DIR --config.init_from=hf:HF_MODEL_DIR

Without a checkpoint in DIR, the variables of config.init_from (a zoo checkpoint or a Hugging Face directory) are
scored as step 0. Routed models also get the local routing consistency (SRP/SCH) and plots in DIR.

Prints human-readable results and, as its last line, one JSON object with the metrics (also written to
DIR/eval_<step>.json).
"""

import json

from absl import app, flags

from zoo.engine import cli

cli.define_flags()
flags.DEFINE_integer("step", None, "checkpoint step to evaluate (default: the latest)")


def main(argv):
  cli.start(argv, "--config.train.batch_size=64")
  from zoo.engine.trainer import evaluate

  with cli.one_line_errors():
    step, results, sample = evaluate(flags.FLAGS.config, flags.FLAGS.workdir, step=flags.FLAGS.step)
  print(f"checkpoint step {step} of {flags.FLAGS.workdir}, split {flags.FLAGS.config.data.eval_split!r}:")
  for key, value in results.items():
    if isinstance(value, float):
      print(f"  {key:24s} {value:.4f}")
    elif key not in ("sample",) and not isinstance(value, list):
      print(f"  {key:24s} {value}")
  if sample is not None:
    print("sample:\n" + sample)
  print(json.dumps({"step": step, **results}))


if __name__ == "__main__":
  app.run(main, flags_parser=cli.parse_flags)
