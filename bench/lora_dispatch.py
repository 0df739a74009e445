"""Forward+backward time of a mixture of LoRA experts: sparse grouped-matmul dispatch vs all experts (dense), as ratios.

Both compute `y = scale * sum_e w_te (x_t A_e) B_e` for top-k routing over E LoRA experts of rank r
(`zoo.layers.lora_dispatch`): 'dense' runs every expert on every token and weights them (one rank-E*r LoRA, PEFT's
X-LoRA), 'sparse' sorts the (token, expert) pairs by expert and runs the two grouped matmuls of the selected pairs
only (`kernels.gmm_gather`, `kernels.gmm`, `kernels.scatter_combine`). The routing (softmax top-k over random
logits) is fixed outside the timed step; the step is the gradient of a loss of y with respect to x, the adapters and
the combine weights. Prints a markdown table; `--out FILE` appends it to FILE. `--small` shrinks the shapes to a
few seconds on a CPU.

  .venv/bin/python bench/lora_dispatch.py [--implementation xla] [--experts 4,8,16] [--ranks 8,64] [--tokens 4096]
      [--d 512] [--k 2] [--reps 5] [--small] [--out bench/RESULTS.md]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp

from zoo import kernels
from zoo.layers import lora_dispatch
from zoo.routing import lora_routers

SCALE = 2.0  # alpha / r; any constant


def _time(fn, args, reps):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return statistics.median(times)


def _step(sparse, expert_ids, implementation):
  def loss(x, lora_a, lora_b, weights):
    if sparse:
      y = lora_dispatch.sparse_lora_experts(
        x, lora_a, lora_b, expert_ids, weights, SCALE, implementation=implementation
      )
    else:
      y = lora_dispatch.dense_lora_experts(x, lora_a, lora_b, weights, SCALE)
    return jnp.sum(y * y)

  return jax.jit(jax.grad(loss, (0, 1, 2, 3)))


def run(tokens, d, k, experts_list, ranks, implementation, reps, dtype):
  rows = []
  for num_experts in experts_list:
    for rank in ranks:
      ks = jax.random.split(jax.random.PRNGKey(0), 4)
      x = jax.random.normal(ks[0], (tokens, d), dtype)
      lora_a = (jax.random.normal(ks[1], (num_experts, d, rank), jnp.float32) * d**-0.5).astype(dtype)
      lora_b = (jax.random.normal(ks[2], (num_experts, rank, d), jnp.float32) * rank**-0.5).astype(dtype)
      routing = lora_routers.lora_mixer(jax.random.normal(ks[3], (tokens, num_experts), jnp.float32), k)
      args = (x, lora_a, lora_b, routing.weights)
      t_dense = _time(_step(False, None, implementation), args, reps)
      t_sparse = _time(_step(True, routing.expert_ids, implementation), args, reps)
      rows.append(
        f"| {num_experts} | {rank} | {k / num_experts:.3f} | {t_dense * 1e3:.1f} | {t_sparse * 1e3:.1f} | "
        f"{t_sparse / t_dense:.2f} |"
      )
  header = (
    f"LoRA experts forward+backward, {tokens} tokens, d_in = d_out = {d}, top-{k}, {jnp.dtype(dtype).name}, "
    f"implementation {implementation}, backend {jax.default_backend()} ({jax.devices()[0].device_kind}), "
    f"median of {reps}\n\n"
    "| experts | rank | k / E (active fraction) | dense ms | sparse ms | sparse / dense |\n|---|---|---|---|---|---|"
  )
  return "\n".join([header] + rows) + "\n"


def _ints(text):
  return tuple(int(v) for v in text.split(","))


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument(
    "--implementation",
    default=None,
    help=f"grouped-matmul implementation, one of {kernels.IMPLEMENTATIONS} (default per backend)",
  )
  parser.add_argument("--experts", type=_ints, default=(4, 8, 16), help="comma list of expert counts")
  parser.add_argument("--ranks", type=_ints, default=(8, 64), help="comma list of LoRA ranks")
  parser.add_argument("--tokens", type=int, help="tokens per step (default 4096, or 256 with --small)")
  parser.add_argument("--d", type=int, help="d_in = d_out (default 512, or 64 with --small)")
  parser.add_argument("--k", type=int, default=2, help="experts per token")
  parser.add_argument("--reps", type=int, default=5)
  parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  parser.add_argument("--small", action="store_true", help="small shapes (256 tokens, d=64) for a CPU smoke test")
  parser.add_argument("--out", help="append the table to this file")
  args = parser.parse_args()
  implementation = kernels.choose_implementation(args.implementation)  # raises on an unknown name
  if not all(1 <= args.k <= e for e in args.experts):
    raise SystemExit(f"--k={args.k} must be between 1 and every expert count {args.experts}")
  tokens = args.tokens or (256 if args.small else 4096)
  d = args.d or (64 if args.small else 512)
  table = run(tokens, d, args.k, args.experts, args.ranks, implementation, args.reps, jnp.dtype(args.dtype))
  print(table)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n" + table)


if __name__ == "__main__":
  main()
