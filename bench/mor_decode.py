"""Batched KV-cache decoding throughput of Mixture-of-Recursions vs the vanilla dense LM (papers.md A1).

  python bench/mor_decode.py [--batch 16 --prompt 16 --new 64 --repeats 3]
  python bench/mor_decode.py --workdirs workdirs/mor_vanilla,workdirs/mor_expert_nr3,...

Models at the isoFLOP study's shape (configs/mor_vanilla.py: width 128, effective depth 8), randomly initialised
(throughput does not depend on the weights, except through the depths MoR's routers pick; the mean depth is printed),
or the trained runs of `--workdirs` (the first is the reference of the ratio; the prompts are then validation text
and the table adds each run's validation loss, so models of equal quality can be compared).
Each model decodes with `zoo.engine.generate` (one jitted prefill, then one jitted call per token); prints one table of
tokens/s and the ratio to vanilla, measured in this run.

What it measures: this implementation decodes a static batch, so a recursion runs for the whole batch while any of
its tokens needs it, masking the tokens that left, and is skipped only when none does (see zoo/models/mor.py): early
exits save compute at small batch sizes. KV sharing skips the key/value projections of recursions r > 0 and reads
one recursion's cache. The paper's throughput gains come from continuous depth-wise batching (refilling the slots of
exited tokens), which is not implemented here.
"""

import argparse
import os
import time

import jax
import jax.numpy as jnp

from configs.mor_vanilla import SHAPE, mor_model
from zoo.data import make_iterator
from zoo.engine.checkpoint import restore_variables
from zoo.engine.generate import generate
from zoo.engine.trainer import Experiment
from zoo.engine.writers import read_config, read_metrics
from zoo.models import build_model


def main():
  parser = argparse.ArgumentParser()
  for name, default in (("batch", 16), ("prompt", 16), ("new", 64), ("repeats", 3)):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--workdirs", default="", help="comma-separated trained runs (default: random inits)")
  a = parser.parse_args()
  if a.workdirs:
    cases = [_trained(w) for w in a.workdirs.split(",")]
    data = cases[0][3].data
    batch = next(make_iterator(data, split=data.eval_split, global_batch_size=a.batch, seed=0, repeat=False))
    prompt = jnp.asarray(batch["inputs"][:, : a.prompt])
  else:
    prompt = jax.random.randint(jax.random.key(0), (a.batch, a.prompt), 3, SHAPE["vocab_size"])
    cases = [
      (label, build_model(cfg), None, None)
      for label, cfg in (
        ("vanilla (dense_lm)", {"name": "dense_lm", **SHAPE}),
        ("recursive N_r=3", mor_model(3, "none")),
        ("MoR expert N_r=3, recursion-wise KV", mor_model(3, "expert")),
        ("MoR expert N_r=3, KV sharing", mor_model(3, "expert", "share")),
        ("MoR token N_r=3, recursion-wise KV", mor_model(3, "token")),
      )
    ]
  rows = []
  for label, model, variables, config in cases:
    if variables is None:
      variables = jax.jit(model.init)(jax.random.key(1), prompt)
    run = lambda: jax.block_until_ready(generate(model, variables, prompt, max_new_tokens=a.new))
    run()  # compile
    times = []
    for _ in range(a.repeats):
      start = time.perf_counter()
      run()
      times.append(time.perf_counter() - start)
    depth = ""
    if hasattr(model, "depth_per_token"):
      depth = f"{float(jnp.mean(model.apply(variables, prompt, method='depth_per_token'))):.2f}"
    loss = "" if config is None else f"{_last_eval_loss(config.workdir):.4f}"
    rows.append((label, a.batch * a.new / min(times), depth, loss))
  base = rows[0][1]
  print(f"backend={jax.default_backend()} batch={a.batch} prompt={a.prompt} new_tokens={a.new}")
  print(f"| model | tokens/s | ratio to {rows[0][0]} | mean depth (prompt) | validation loss |\n|---|---|---|---|---|")
  for label, tps, depth, loss in rows:
    print(f"| {label} | {tps:.1f} | {tps / base:.2f} | {depth} | {loss} |")


def _trained(workdir):
  """(label, model, variables, config) of the trained run in `workdir` (config.workdir is set to it)."""
  config = read_config(workdir)
  exp = Experiment(config)
  variables = restore_variables(workdir, exp.abstract_state()[0].variables())
  config.workdir = workdir
  return os.path.basename(os.path.normpath(workdir)), exp.model, variables, config


def _last_eval_loss(workdir):
  return [r for r in read_metrics(workdir) if "eval_loss" in r][-1]["eval_loss"]


if __name__ == "__main__":
  main()
