"""Forward+backward time of one MoE layer under each dispatch mode, as ratios.

Ratios are to (a) a dense SwiGLU FFN with the same active FLOPs (hidden width k * expert width) and (b) computing
all experts on every token (the 'dense' dispatch). Router included (softmax top-k). Dropless dispatch is timed
with its three token permutations: gather-fused ('fused': `kernels.gmm_gather` + `kernels.scatter_combine`, no
permuted copy of the activations) and a sorted copy ('custom_vjp', 'gather'). Prints a markdown table; `--out FILE`
appends it to FILE. `--small` shrinks the shapes so that a CPU run finishes in about a minute.

  .venv/bin/python bench/moe_layer.py [--small] [--tokens 2048] [--reps 5] [--out bench/RESULTS.md]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from zoo import routing
from zoo.routing import dispatch

CONFIGS = (
  # name, experts, k, embed, expert width
  ("top-2 of 8, d=512", 8, 2, 512, 1024),
  ("fine-grained top-6 of 64, d=512", 64, 6, 512, 256),
)
SMALL_CONFIGS = (
  ("top-2 of 8, d=128", 8, 2, 128, 256),
  ("fine-grained top-6 of 32, d=128", 32, 6, 128, 64),
)
SMALL_TOKENS = 512


def _time(fn, args, reps):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _moe_step(k, mode, capacity_factor, permute="fused"):
  def loss(x, router_kernel, w):
    r = routing.softmax_topk(x @ router_kernel, k)
    if mode == "dropless":
      y, _ = dispatch.dropless_ffn(x, r.expert_ids, r.weights, w, "swiglu", permute=permute)
    else:
      y, _ = routing.moe_ffn(x, r, w, dispatch=mode, capacity_factor=capacity_factor)
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, (0, 1, 2)))


def _dense_step():
  def loss(x, w):
    y = (jax.nn.silu(x @ w["gate"]) * (x @ w["up"])) @ w["down"]
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, (0, 1)))


def run(tokens, reps, dtype, configs=CONFIGS):
  rows = []
  for name, experts, k, embed, width in configs:
    ks = jax.random.split(jax.random.PRNGKey(0), 8)
    x = jax.random.normal(ks[0], (tokens, embed), dtype)
    router_kernel = jax.random.normal(ks[1], (embed, experts), jnp.float32) * 0.02
    w = {
      "gate": jax.random.normal(ks[2], (experts, embed, width), dtype) * embed**-0.5,
      "up": jax.random.normal(ks[3], (experts, embed, width), dtype) * embed**-0.5,
      "down": jax.random.normal(ks[4], (experts, width, embed), dtype) * width**-0.5,
    }
    dense_w = {
      "gate": jax.random.normal(ks[5], (embed, k * width), dtype) * embed**-0.5,
      "up": jax.random.normal(ks[6], (embed, k * width), dtype) * embed**-0.5,
      "down": jax.random.normal(ks[7], (k * width, embed), dtype) * (k * width) ** -0.5,
    }
    t_dense = _time(_dense_step(), (x, dense_w), reps)
    t_all = _time(_moe_step(k, "dense", None), (x, router_kernel, w), reps)
    variants = [("dense FFN, equal active FLOPs", t_dense), ("all experts ('dense')", t_all)]
    for label, mode, cf, permute in (
      ("capacity, cf=1.0", "capacity", 1.0, None),
      ("capacity, cf=1.25", "capacity", 1.25, None),
      ("dropless, gather-fused (no permuted copy)", "dropless", None, "fused"),
      ("dropless, custom_vjp permutation", "dropless", None, "custom_vjp"),
      ("dropless, gather permutation", "dropless", None, "gather"),
    ):
      step = _moe_step(k, mode, cf, permute or "fused")
      variants.append((label, _time(step, (x, router_kernel, w), reps)))
    for label, t in variants:
      rows.append(f"| {name} | {label} | {t * 1e3:.1f} | {t / t_dense:.2f} | {t / t_all:.2f} |")
  header = (
    f"MoE layer forward+backward, {tokens} tokens, {jnp.dtype(dtype).name}, "
    f"backend {jax.default_backend()} ({jax.devices()[0].device_kind}), median of {reps}\n\n"
    "| config | variant | ms | / dense equal-FLOPs | / all experts |\n|---|---|---|---|---|"
  )
  return "\n".join([header] + rows) + "\n"


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--small", action="store_true", help=f"small shapes ({SMALL_TOKENS} tokens, d=128) for CPU")
  parser.add_argument("--tokens", type=int, help="tokens per step (default 2048, or 512 with --small)")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--out", help="append the table to this file")
  args = parser.parse_args()
  tokens = args.tokens or (SMALL_TOKENS if args.small else 2048)
  table = run(tokens, args.reps, jnp.dtype(args.dtype), SMALL_CONFIGS if args.small else CONFIGS)
  print(table)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n" + table)


if __name__ == "__main__":
  main()
