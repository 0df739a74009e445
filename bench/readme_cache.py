"""Expert-cache hit rate, Belady vs LRU, on the routes of a Read-ME model over validation text (papers.md A4,
Read-ME Sec. 4.2). The pre-gate gives every token's expert ahead, which Belady's eviction needs.

Without `--workdir` the model is the tiny `configs/readme_moe.py` architecture, RANDOMLY INITIALISED, so the routes
reflect an untrained pre-gate; with `--workdir` it is that run's trained model (its `config.json` and latest
checkpoint). Accesses are the tokens' experts in decoding order (sequence after sequence). Also reports the expert
loads of lookahead expert-aware batching against arrival order (one load per batch of one expert).

  .venv/bin/python bench/readme_cache.py [--num_experts 8] [--batches 4]
  .venv/bin/python bench/readme_cache.py --workdir workdirs/readme_backbone
"""

import argparse

import jax
import numpy as np

from configs.readme_moe import get_config
from zoo.data import make_iterator
from zoo.engine.checkpoint import restore_variables
from zoo.engine.trainer import Experiment
from zoo.engine.writers import read_config
from zoo.models import build_model
from zoo.routing.expert_cache import belady_hits, expert_aware_batches, hit_rate, lru_hits


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--num_experts", type=int, default=8)
  parser.add_argument("--batches", type=int, default=4)
  parser.add_argument("--seq_len", type=int, default=128)
  parser.add_argument("--workdir", default=None, help="a trained readme_moe run (default: a random init)")
  args = parser.parse_args()
  if args.workdir:
    config = read_config(args.workdir)
    exp = Experiment(config)
    variables = restore_variables(args.workdir, exp.abstract_state()[0].variables())
    model = exp.model
    args.num_experts = model.num_experts
    print(f"trained model: {args.workdir}")
  else:
    config = get_config()
    config.model.num_experts = args.num_experts
    config.data.seq_len = args.seq_len
    model = build_model(config.model)
  it = make_iterator(config.data, split="validation", global_batch_size=8, seed=0, repeat=False)
  batch = next(it)
  if not args.workdir:
    variables = model.init(jax.random.key(0), batch["inputs"][:1])
  route = jax.jit(lambda v, t: model.apply(v, t, method="route"))
  accesses = []
  for _ in range(args.batches):
    batch = next(it)
    routes = np.asarray(route(variables, batch["inputs"]))
    accesses.append(routes[batch["mask"] > 0])
  accesses = np.concatenate(accesses)
  load = np.bincount(accesses, minlength=args.num_experts) / accesses.size
  print(f"{accesses.size} accesses over {args.num_experts} experts; load per expert: {np.round(load, 3).tolist()}\n")
  print("| cache size | LRU hit rate | Belady hit rate |")
  print("|---:|---:|---:|")
  for size in range(1, args.num_experts):
    print(f"| {size} | {hit_rate(lru_hits(accesses, size)):.3f} | {hit_rate(belady_hits(accesses, size)):.3f} |")
  window = accesses[:1024]
  print("\n| scheduling (first 1024 tokens, batch <= 32) | expert loads |")
  print("|---|---:|")
  arrival = 1 + int(np.sum(window[1:] != window[:-1]))
  print(f"| arrival order (a load when the expert changes) | {arrival} |")
  for lookahead in (32, 256, None):
    print(f"| expert-aware, lookahead {lookahead or 'all'} | {len(expert_aware_batches(window, 32, lookahead))} |")


if __name__ == "__main__":
  main()
