"""R2R token routing (papers.md C1) on the trained pool: quality, speed and cost of routed decoding against the small
and the large model alone, measured in one run.

  python tools/r2r.py --small workdirs/pool_small --large workdirs/pool_large --out workdirs/r2r
  python bench/r2r_decode.py --small workdirs/pool_small --large workdirs/pool_large --router workdirs/r2r

Data: validation-split windows that the router never saw (the iterator of `tools/r2r.py`'s threshold prompts, past
the batch those came from).

- Accuracy (teacher forcing): next-token accuracy on `--eval-batches` batches of those windows when each position's
  prediction is the small model's greedy token, the large model's, or the routed one (the large model's where the
  router flags the small model's state); plus the fraction routed.
- Decoding: `--prompts` prompts (`--prompt-len` tokens of those windows), `--new` greedy tokens each, in batches of
  each of `--batches`: small alone and large alone (`zoo.engine.generate`, KV cache) and R2R
  (`zoo.routing.r2r.routed_generate`, both KV caches). Tokens/s = generated tokens / wall time of the whole pass
  (prefills included), best of `--repeats` passes after a compile pass. Quality of the generated text: its mean NLL
  under the large model (nats per token), and the fraction of positions equal to the large model's own output.
- Cost: fraction of generated tokens the large model wrote, the large model's processed positions per generated
  token (the lazy cache updates re-feed accepted tokens), and average parameters per generated token (R2R's
  "active parameters": small + router + routed fraction x large).
"""

import argparse
import json
import platform
import time

import jax
import numpy as np

from zoo.data import make_iterator
from zoo.engine import runs
from zoo.engine.generate import generate
from zoo.engine.writers import read_config
from zoo.routing import r2r


def _eval_batches(config, record, count, batch_size):
  """`count` validation batches after the threshold prompts' batch (same iterator as tools/r2r.py)."""
  seed, val_prompts = record["labelling"]["seed"], record["labelling"]["val_prompts"]
  it = make_iterator(config.data, split=config.data.eval_split, global_batch_size=val_prompts, seed=seed, repeat=False)
  next(it)  # the threshold's prompts
  rows = {"inputs": [], "targets": [], "mask": []}
  while sum(len(r) for r in rows["inputs"]) < count * batch_size:
    batch = next(it)
    for k in rows:
      rows[k].append(batch[k])
  rows = {k: np.concatenate(v)[: count * batch_size] for k, v in rows.items()}
  return [{k: v[i * batch_size : (i + 1) * batch_size] for k, v in rows.items()} for i in range(count)]


def _timed(fn, repeats):
  """(result of the last call, best wall seconds of `repeats` calls after one compile call)."""
  result = fn()
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    result = fn()
    best = min(best, time.perf_counter() - start)
  return result, best


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--small", required=True)
  parser.add_argument("--large", required=True)
  parser.add_argument("--router", required=True, help="the --out directory of tools/r2r.py")
  for name, default in (
    ("prompts", 16),
    ("prompt-len", 32),
    ("new", 64),
    ("eval-batches", 4),
    ("eval-batch-size", 16),
    ("repeats", 2),
  ):
    parser.add_argument(f"--{name}", type=int, default=default)
  parser.add_argument("--batches", default="1,8", help="comma-separated decoding batch sizes")
  args = parser.parse_args()
  batches = [int(b) for b in args.batches.split(",")]

  small, small_vars = runs.load_lm_run(args.small)
  large, large_vars = runs.load_lm_run(args.large)
  router, router_vars, record = r2r.load_router(args.router)
  route, route_params = r2r.router_route(router), {"variables": router_vars, "threshold": record["threshold"]}
  config = read_config(args.small)
  top_k = router.top_k
  counts = {"small": small.num_params(), "large": large.num_params(), "router": router.num_params()}

  # Teacher-forced next-token accuracy.
  data = _eval_batches(config, record, args.eval_batches, args.eval_batch_size)
  hits = {"small": 0.0, "large": 0.0, "R2R": 0.0}
  flagged = weight = 0.0
  for batch in data:
    tokens = np.concatenate([batch["inputs"], batch["targets"][:, -1:]], axis=1)
    preds = r2r.teacher_forced_routing(
      small, small_vars, large, large_vars, tokens, route=route, route_params=route_params, top_k=top_k
    )
    for name, pred in zip(hits, preds[:3]):
      hits[name] += float(np.sum((pred == batch["targets"]) * batch["mask"]))
    flagged += float(np.sum(preds[3] * batch["mask"]))
    weight += float(np.sum(batch["mask"]))
  accuracy = {k: v / weight for k, v in hits.items()}
  tf_routed = flagged / weight

  # Decoding.
  prompts = np.concatenate([b["inputs"] for b in data])[: args.prompts, : args.prompt_len]
  if len(prompts) < args.prompts:
    raise SystemExit(f"r2r_decode: only {len(prompts)} evaluation rows for --prompts={args.prompts}")
  rows = []
  outputs = {}
  for b in batches:
    groups = [prompts[i : i + b] for i in range(0, len(prompts) - b + 1, b)]

    def single(model, variables, groups=groups):
      return [np.asarray(generate(model, variables, g, max_new_tokens=args.new)) for g in groups]

    def routed(groups=groups):
      return [
        r2r.routed_generate(
          small,
          small_vars,
          large,
          large_vars,
          g,
          max_new_tokens=args.new,
          route=route,
          route_params=route_params,
          top_k=top_k,
        )
        for g in groups
      ]

    generated = len(groups) * b * args.new
    results = {}
    for name, fn in (
      ("small", lambda: single(small, small_vars)),
      ("large", lambda: single(large, large_vars)),
      ("R2R", routed),
    ):
      out, seconds = _timed(fn, args.repeats)
      if name == "R2R":
        routed_frac = float(np.mean(np.concatenate([o[1] for o in out])))
        large_tokens = sum(o[2]["large_tokens"] for o in out) / generated
        out = [o[0] for o in out]
      else:
        routed_frac, large_tokens = (1.0, 1.0) if name == "large" else (0.0, 0.0)
      results[name] = (np.concatenate(out), generated / seconds, routed_frac, large_tokens)
    outputs[b] = results
    for name, (tokens, tps, frac, large_tokens) in results.items():
      nll = r2r.sequence_nll(large, large_vars, tokens, args.prompt_len)
      same = float(np.mean(tokens[:, args.prompt_len :] == results["large"][0][:, args.prompt_len :]))
      active = counts["small"] + counts["router"] + frac * counts["large"] if name == "R2R" else counts[name]
      rows.append(
        {
          "batch": b,
          "decoder": name,
          "tokens_per_sec": tps,
          "speed_vs_large": tps / results["large"][1],
          "large_nll": nll,
          "same_as_large": same,
          "routed": frac,
          "large_positions_per_token": large_tokens,
          "active_params": active,
        }
      )

  print(
    f"machine: {platform.machine()} {platform.processor() or ''}, {jax.devices()[0].platform}, jax {jax.__version__}"
  )
  print(
    f"params: small {counts['small']}, large {counts['large']}, router {counts['router']}; "
    f"tau {record['threshold']:.4f} (val recall {record['routing']['val']['recall']:.3f})"
  )
  print(f"\nTeacher-forced next-token accuracy on {int(weight)} held-out validation tokens:\n")
  print("| predictor | accuracy | routed to large |\n|---|---:|---:|")
  for name, acc in accuracy.items():
    frac = {"small": 0.0, "large": 1.0, "R2R": tf_routed}[name]
    print(f"| {name} | {acc:.4f} | {frac:.3f} |")
  print(
    f"\nGreedy decoding, {args.prompts} prompts of {args.prompt_len} tokens, {args.new} new tokens each; tokens/s best "
    f"of {args.repeats} passes:\n"
  )
  print(
    "| batch | decoder | tokens/s | x large | NLL under large | same as large | routed | large pos./token "
    "| active params |\n|---:|---|---:|---:|---:|---:|---:|---:|---:|"
  )
  for r in rows:
    print(
      f"| {r['batch']} | {r['decoder']} | {r['tokens_per_sec']:.0f} | {r['speed_vs_large']:.2f} | {r['large_nll']:.3f} "
      f"| {r['same_as_large']:.3f} | {r['routed']:.3f} | {r['large_positions_per_token']:.2f} "
      f"| {r['active_params'] / 1e6:.3f}M |"
    )
  print(json.dumps({"accuracy": accuracy, "teacher_forced_routed": tf_routed, "decoding": rows, "params": counts}))


if __name__ == "__main__":
  main()
