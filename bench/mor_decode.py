"""Decoding throughput of Mixture-of-Recursions vs the vanilla dense LM and the Recursive Transformer (papers.md A1),
served by continuous depth-wise batching (`zoo.engine.mor_batching`).

  python bench/mor_decode.py [--requests 128 --new 32 --batches 8,16,32,64 --plot mor_decode_occupancy.png]
  python bench/mor_decode.py --workdirs w/mor_vanilla,w/recursive_nr3,w/mor_expert_nr3,... --batches 8,16,32,64
  python bench/mor_decode.py --small --models vanilla,expert   # a quick smoke run
  python bench/mor_decode.py --fixed           # also the fixed-batch decoding of zoo.engine.generate

Models at the isoFLOP study's shape (configs/mor_vanilla.py: width 128, effective depth 8), randomly initialised
(throughput does not depend on the weights, except through the depths MoR's routers pick; the recursions per
generated token are printed), or the trained runs of `--workdirs` (the first is the reference of the ratio; the
prompts are then validation text and the table adds each run's validation loss, so models of equal quality can be
compared).

Every model serves the same request set (`--requests` prompts of mixed lengths, `--prompt-min` to `--prompt-max`
tokens, `--new` greedy tokens each) with the same engine at each batch size: a queue, `--slots` x batch sequence
slots refilled as sequences finish, and engine steps of `batch` jobs (the shared block on jobs of any depth, or the
boundary: coda, sampling, prelude). The vanilla model is served as one depth (its block is all its layers), the
Recursive Transformer as N_r depths that every token runs. Tokens/s counts generated tokens over the wall time of
the whole run (prefills included), best of `--repeats` runs after a compile run; the ratio is to the first model at
the same batch size, measured in this run. A second table splits the best run's time: prefill (prompt tokens per
second of the prefill calls, which also sample each request's first token and run its prelude) and decoding (the
other generated tokens per second of the engine steps).

`--plot` writes a PNG of the slot occupancy per depth over engine steps (each MoR model at the largest batch size).
"""

import argparse
import os
import time

import jax
import numpy as np

from configs.mor_vanilla import SHAPE, mor_model
from zoo.data import make_iterator
from zoo.engine.checkpoint import restore_variables
from zoo.engine.generate import generate
from zoo.engine.mor_batching import DepthBatchingEngine
from zoo.engine.trainer import Experiment
from zoo.engine.writers import read_config, read_metrics
from zoo.evaluators.depth_batching import plot_occupancy
from zoo.models import build_model

RANDOM_MODELS = {  # --models key: (label, model config)
  "vanilla": ("vanilla (dense_lm)", {"name": "dense_lm", **SHAPE}),
  "recursive": ("Recursive, N_r=3", mor_model(3, "none")),
  "expert": ("MoR expert, N_r=3, recursion-wise KV", mor_model(3, "expert")),
  "expert_share": ("MoR expert, N_r=3, KV sharing", mor_model(3, "expert", "share")),
  "token": ("MoR token, N_r=3, recursion-wise KV", mor_model(3, "token")),
  "token_share": ("MoR token, N_r=3, KV sharing", mor_model(3, "token", "share")),
}


def main():
  parser = argparse.ArgumentParser()
  for name, default in (
    ("requests", 128),
    ("prompt-min", 8),
    ("prompt-max", 48),
    ("new", 32),
    ("slots", 2),
    ("repeats", 2),
  ):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--batches", default="8,16,32,64", help="comma-separated batch sizes (jobs per engine step)")
  parser.add_argument("--workdirs", default="", help="comma-separated trained runs (default: random inits)")
  parser.add_argument("--plot", default="", help="PNG of the slot occupancy per depth over engine steps")
  parser.add_argument("--models", default=",".join(RANDOM_MODELS), help="random-init models, from: %(default)s")
  parser.add_argument("--small", action="store_true", help="a quick smoke run (8 short requests, batch 4)")
  parser.add_argument("--fixed", action="store_true", help="also time fixed-batch decoding (zoo.engine.generate)")
  a = parser.parse_args()
  if a.small:
    a.requests, a.prompt_min, a.prompt_max, a.new, a.repeats, a.batches = 8, 4, 8, 4, 1, "4"
  batches = [int(b) for b in a.batches.split(",")]
  rng = np.random.default_rng(0)
  lengths = rng.integers(a.prompt_min, a.prompt_max + 1, size=a.requests)
  if a.workdirs:
    cases = [_trained(w) for w in a.workdirs.split(",")]
    prompts = _validation_prompts(cases[0][3], lengths)
  else:
    prompts = [rng.integers(3, SHAPE["vocab_size"], size=n).astype(np.int32) for n in lengths]
    cases = []
    for key in a.models.split(","):
      if key not in RANDOM_MODELS:
        parser.error(f"--models: {key!r} is not one of {', '.join(RANDOM_MODELS)}")
      label, cfg = RANDOM_MODELS[key]
      model = build_model(cfg)
      variables = jax.jit(model.init)(jax.random.key(1), np.zeros((1, 8), np.int32))
      cases.append((label, model, variables, None))
  max_length = int(max(lengths)) + a.new
  total = a.requests * a.new
  rows, plots = [], []
  split = []  # (label, batch, EngineStats of the best run)
  for label, model, variables, config in cases:
    tps, depth, fill = [], "", []
    for b in batches:
      engine = DepthBatchingEngine(model, variables, batch_size=b, num_slots=a.slots * b, max_length=max_length)
      engine.run(prompts, a.new)  # compile
      best, stats = float("inf"), None
      for _ in range(a.repeats):
        start = time.perf_counter()
        outputs, run_stats = engine.run(prompts, a.new)
        elapsed = time.perf_counter() - start
        if elapsed < best:
          best, stats = elapsed, run_stats
      assert sum(len(o) for o in outputs) == total
      tps.append(total / best)
      split.append((label, b, stats))
      fill.append(f"{stats.fill('block'):.2f}/{stats.fill('boundary'):.2f}")
      counts = stats.depth_counts
      depth = f"{np.dot(np.arange(len(counts)), counts) / max(1, counts.sum()):.2f}"
    if hasattr(model, "num_recursions") and model.router != "none":
      plots.append((label, stats))
    loss = "-" if config is None else f"{_last_eval_loss(config.workdir):.4f}"
    rows.append((label, loss, depth, tps, fill))
  print(
    f"backend={jax.default_backend()} requests={a.requests} prompts={a.prompt_min}-{a.prompt_max} tokens "
    f"new_tokens={a.new} slots={a.slots}x batch, greedy, continuous depth-wise batching"
  )
  head = " | ".join(f"tokens/s, batch {b} | ratio" for b in batches)
  print(f"| model | validation loss | recursions per token | {head} | batch fill (block/boundary) |")
  print("|---|---:|---:|" + "---:|---:|" * len(batches) + "---|")
  for label, loss, depth, tps, fill in rows:
    cells = " | ".join(f"{t:.0f} | {t / base:.2f}" for t, base in zip(tps, rows[0][3]))
    print(f"| {label} | {loss} | {depth or '-'} | {cells} | {', '.join(fill)} |")
  print("\nprefill and decoding apart (the best run of each):")
  print(
    "| model | batch | prefill tokens/s | decode tokens/s | prefill s | decode s | block steps "
    "| block steps without K/V projection |"
  )
  print("|---|---:|---:|---:|---:|---:|---:|---:|")
  for label, b, st in split:
    print(
      f"| {label} | {b} | {st.prefill_tokens_per_s():.0f} | {st.decode_tokens_per_s():.0f} | "
      f"{st.prefill_seconds:.3f} | {st.decode_seconds:.3f} | {st.steps['block']} | {st.read_only_block_steps} |"
    )
  if a.fixed:
    _fixed_batch_table(cases, prompts, a.new, batches)
  if a.plot and plots:
    plot_occupancy(plots, a.plot, batches[-1])
    print(f"occupancy plot: {a.plot}")


def _fixed_batch_table(cases, prompts, new, batches):
  """Tokens/s of fixed-batch decoding (`zoo.engine.generate`: one prefill, then one call per token for the whole
  batch) on the first `batch` prompts cut to the shortest one's length."""
  print("\nfixed-batch decoding (zoo.engine.generate), prompts cut to equal length:")
  print("| model | " + " | ".join(f"tokens/s, batch {b} | ratio" for b in batches) + " |")
  print("|---|" + "---:|---:|" * len(batches))
  base = None
  for label, model, variables, _ in cases:
    tps = []
    for b in batches:
      group = prompts[:b] if len(prompts) >= b else (prompts * b)[:b]
      width = min(len(p) for p in group)
      prompt = np.stack([p[:width] for p in group])
      run = lambda: jax.block_until_ready(generate(model, variables, prompt, max_new_tokens=new))
      run()
      start = time.perf_counter()
      run()
      tps.append(b * new / (time.perf_counter() - start))
    base = base or tps
    print(f"| {label} | " + " | ".join(f"{t:.0f} | {t / r:.2f}" for t, r in zip(tps, base)) + " |")


def _validation_prompts(config, lengths):
  """Prompts of `lengths` tokens cut from validation text rows."""
  data = config.data
  it = make_iterator(data, split=data.eval_split, global_batch_size=len(lengths), seed=0, repeat=False)
  rows = next(it)["inputs"]
  return [np.asarray(rows[i % len(rows), :n], np.int32) for i, n in enumerate(lengths)]


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
