"""LSF-IDM inference time: the BERT-style teacher vs the BiLSTM student of `configs/lsf_idm_can.py` on windows of
32 CAN IDs (papers.md F: distillation is for a detector light enough for an in-vehicle ECU).

  python bench/lsf_idm.py [--batches 1,64,1024] [--repeats 20] [--small]

Both models jitted, warmed up, float32, on random windows (weights do not change the time); teacher and student calls
interleaved, best of N with `block_until_ready`. Prints a markdown table: parameters, ms per batch, windows per second
and the student's speed-up over the teacher.
"""

import argparse
import time

import jax
import jax.numpy as jnp

from configs import lsf_idm_can
from zoo.models import build_model


def _best(fn, args, repeats):
  best = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    best = min(best, time.perf_counter() - start)
  return best


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--batches", default="1,64,1024")
  parser.add_argument("--repeats", type=int, default=20)
  parser.add_argument("--small", action="store_true", help="smoke test: batch 4, 2 repeats")
  a = parser.parse_args()
  batches = [4] if a.small else [int(b) for b in a.batches.split(",")]
  repeats = 2 if a.small else a.repeats
  models = {
    name: build_model(dict(cfg)) for name, cfg in (("teacher", lsf_idm_can.TEACHER), ("student", lsf_idm_can.STUDENT))
  }
  window = 32
  print(f"windows of {window} CAN IDs, float32, {jax.devices()[0].platform}, best of {repeats}, interleaved")
  print("| batch | teacher params | student params | teacher ms | student ms | student windows/s | speed-up |")
  print("|---|---|---|---|---|---|---|", flush=True)
  for b in batches:
    tokens = jax.random.randint(jax.random.key(0), (b, window), 2, lsf_idm_can.STUDENT["vocab_size"])
    mask = jnp.ones((b, window), jnp.float32)
    fns, params, times = {}, {}, {"teacher": float("inf"), "student": float("inf")}
    for name, model in models.items():
      variables = model.init(jax.random.key(1), tokens, mask=mask)
      params[name] = sum(x.size for x in jax.tree.leaves(variables["params"]))
      fn = jax.jit(lambda v, t, m, model=model: model.apply(v, t, mask=m)[0])
      jax.block_until_ready(fn(variables, tokens, mask))
      fns[name] = (fn, (variables, tokens, mask))
    for _ in range(repeats):
      for name, (fn, args) in fns.items():
        times[name] = min(times[name], _best(fn, args, 1))
    t, s = times["teacher"], times["student"]
    print(
      f"| {b} | {params['teacher']:,} | {params['student']:,} | {t * 1e3:.3f} | {s * 1e3:.3f} | {b / s:,.0f} | "
      f"{t / s:.2f}x |",
      flush=True,
    )


if __name__ == "__main__":
  main()
