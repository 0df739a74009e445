"""Compare finished runs: one markdown row per workdir with parameters, training FLOPs and the validation loss.

  python tools/compare_runs.py workdirs/mor_vanilla workdirs/recursive_nr3 workdirs/mor_expert_nr3
  python tools/compare_runs.py workdirs/dense_lm workdirs/moe_mixtral --metrics load_imbalance --every-eval

Each workdir needs the `config.json` and `metrics.jsonl` that train.py writes. Columns: the run (the workdir's
name), the model, its unique parameters, the parameters one token uses, the steps trained, the training tokens
(steps x batch x sequence length), the training FLOPs (the model's analytic `train_flops_per_token` x tokens; '-'
for models without one) and the last evaluation's loss and bits per byte (accuracy for classifiers). `--metrics`
adds other evaluation keys (their mean when the value is a list, e.g. one per layer); `--every-eval` adds the
validation loss at every evaluated step.
"""

import argparse
import os
import sys

import numpy as np

from zoo.engine.writers import read_config, read_metrics
from zoo.models import build_model


def summarize(workdir, extra_metrics=()):
  """The table row of one run, as a dict (see the module docstring for the keys)."""
  config = read_config(workdir)
  records = read_metrics(workdir)
  trained = [r for r in records if "loss" in r]
  evals = [r for r in records if any(k.startswith("eval_") for k in r)]
  if not trained or not evals:
    raise ValueError(f"{workdir}: metrics.jsonl has no training or no evaluation record yet")
  model = build_model(config.model)
  steps = trained[-1]["step"]
  seq_len = config.data.get("seq_len")
  tokens = steps * int(config.train.batch_size) * seq_len if seq_len else None
  flops = None
  if tokens and hasattr(model, "train_flops_per_token"):
    flops = model.train_flops_per_token(seq_len) * tokens
  params = model.num_params() if hasattr(model, "num_params") else None
  active = model.num_active_params() if hasattr(model, "num_active_params") else params
  last = evals[-1]
  row = {
    "run": os.path.basename(os.path.normpath(workdir)),
    "model": config.model.name,
    "params": params,
    "active_params": active,
    "steps": steps,
    "tokens": tokens,
    "train_flops": flops,
    "eval_step": last["step"],
  }
  for key in ("eval_loss", "eval_bits_per_byte", "eval_accuracy", *(f"eval_{m}" for m in extra_metrics)):
    if key in last:
      row[key] = float(np.mean(last[key]))
  row["eval_loss_by_step"] = {r["step"]: r["eval_loss"] for r in evals if "eval_loss" in r}
  return row


def _fmt(value):
  if value is None:
    return "-"
  if isinstance(value, float):
    return f"{value:.3e}" if abs(value) >= 1e5 else f"{value:.4f}"
  if isinstance(value, int) and value >= 10_000:
    return f"{value:,}"
  return str(value)


def markdown_table(rows, every_eval=False):
  """Rows from `summarize` as a markdown table."""
  keys = [k for k in rows[0] if k != "eval_loss_by_step"]
  for row in rows[1:]:
    keys += [k for k in row if k not in keys and k != "eval_loss_by_step"]
  header = list(keys)
  steps = []
  if every_eval:
    steps = sorted({s for row in rows for s in row["eval_loss_by_step"] if s > 0})
    header += [f"loss@{s}" for s in steps]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for row in rows:
    cells = [_fmt(row.get(k)) for k in keys] + [_fmt(row["eval_loss_by_step"].get(s)) for s in steps]
    lines.append("| " + " | ".join(cells) + " |")
  return "\n".join(lines)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("workdirs", nargs="+")
  parser.add_argument("--metrics", default="", help="comma-separated extra evaluation keys, without 'eval_'")
  parser.add_argument("--every-eval", action="store_true", help="add the validation loss of every evaluated step")
  args = parser.parse_args(argv)
  extra = [m for m in args.metrics.split(",") if m]
  try:
    rows = [summarize(w, extra) for w in args.workdirs]
  except (FileNotFoundError, ValueError) as e:
    sys.exit(f"compare_runs: {e}")
  print(markdown_table(rows, args.every_eval))


if __name__ == "__main__":
  main()
