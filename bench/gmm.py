"""Grouped-matmul benchmark: TFLOP/s of each kernel implementation vs a dense matmul and jax.lax.ragged_dot.

Usage:
  python bench/gmm.py                                  # full shapes, implementations available on this backend
  python bench/gmm.py --small                          # tiny shapes (CPU smoke test, < 1 minute)
  python bench/gmm.py --implementations xla,pallas_gpu --out bench/gmm_h100.md
  python bench/gmm.py --implementations xla,pallas_gpu --tilings 64x64x128,128x64x128,128x32x128  # tile sweep

Cases (bf16): Mixtral-like (g=8, k=4096, n=14336), fine-grained DeepSeekMoE-like (g=64, k=2048, n=1408), and the
fine-grained case with Zipf-skewed group sizes. For each: forward (gmm) and backward (dlhs gmm + drhs tgmm) time,
TFLOP/s, ratio to a dense matmul of equal FLOPs and to ragged_dot. Then an MoE layer (top-2 routing, sort, up gmm,
SiLU, down gmm, weighted scatter combine; forward + backward) with and without the gather fusion. With --tilings,
every Pallas implementation is timed once per tiling (TMxTKxTN), each as its own row.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo import kernels

DEFAULTS = {"tpu": "xla,pallas_tpu", "gpu": "xla,pallas_gpu", "cpu": "xla"}


def cases(small):
  """(name, m, k, n, group_sizes) per case; m is the routed row count (tokens * top_k)."""
  rng = np.random.default_rng(0)
  if small:
    full = [("mixtral-like", 256, 128, 384, 8), ("fine-grained", 512, 128, 96, 16)]
  else:
    full = [("mixtral-like", 16384, 4096, 14336, 8), ("fine-grained", 32768, 2048, 1408, 64)]
  out = []
  for name, m, k, n, g in full:
    out.append((name, m, k, n, np.full(g, m // g, np.int32)))
  name, m, k, n, g = full[-1]
  zipf = 1.0 / np.arange(1, g + 1) ** 1.2
  sizes = np.floor(zipf / zipf.sum() * m).astype(np.int32)
  sizes[0] += m - sizes.sum()
  out.append((name + " zipf-skewed", m, k, n, rng.permutation(sizes)))
  return out


def parse_tiling(text):
  """'128x64x128' -> (128, 64, 128)."""
  parts = text.lower().split("x")
  if len(parts) != 3 or not all(p.isdigit() for p in parts):
    raise SystemExit(f"a tiling is written TMxTKxTN, e.g. 128x64x128; got {text!r}")
  return tuple(int(p) for p in parts)


def timeit(fn, *args, reps):
  """Median seconds per call of a jitted fn (after a compile + warm-up call)."""
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(reps):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def variants(impls, tilings):
  """(label, implementation, tiling) per timed variant: xla once, each Pallas implementation once per tiling."""
  out = []
  for impl in impls:
    if impl == "xla" or not tilings:
      out.append((impl, impl, None))
    else:
      out += [(f"{impl} {'x'.join(map(str, t))}", impl, t) for t in tilings]
  return out


def bench_case(name, m, k, n, sizes, impls, reps):
  """Table rows of one case; impls is a list of (label, implementation, tiling)."""
  key = jax.random.key(0)
  lhs = jax.random.normal(key, (m, k), jnp.bfloat16)
  rhs = jax.random.normal(jax.random.fold_in(key, 1), (len(sizes), k, n), jnp.bfloat16) / np.sqrt(k)
  gs = jnp.asarray(sizes)
  flops = 2.0 * int(sizes.sum()) * k * n
  dense_w = rhs[0]
  fwd_dense = jax.jit(lambda a, w: a @ w)
  bwd_dense = jax.jit(jax.grad(lambda a, w: jnp.sum((a @ w).astype(jnp.float32)), (0, 1)))
  base = {"fwd": timeit(fwd_dense, lhs, dense_w, reps=reps), "bwd": timeit(bwd_dense, lhs, dense_w, reps=reps)}
  results = {}
  for label, impl, tiling in [("xla", "xla", None)] + [v for v in impls if v[0] != "xla"]:

    def call(a, w, impl=impl, tiling=tiling):
      return kernels.gmm(a, w, gs, implementation=impl, tiling=tiling)

    fwd = jax.jit(call)
    bwd = jax.jit(jax.grad(lambda a, w, call=call: jnp.sum(call(a, w).astype(jnp.float32)), (0, 1)))
    results[label] = {"fwd": timeit(fwd, lhs, rhs, reps=reps), "bwd": timeit(bwd, lhs, rhs, reps=reps)}
  rows = []
  for label, t in results.items():
    if label not in [v[0] for v in impls]:
      continue
    for pass_, mult in (("fwd", 1), ("bwd", 2)):
      rows.append(
        f"| {name} | {m}x{k}x{n}, g={len(sizes)} | {label} | {pass_} | {t[pass_] * 1e3:.3f} | "
        f"{mult * flops / t[pass_] / 1e12:.2f} | {base[pass_] / t[pass_]:.2f} | "
        f"{results['xla'][pass_] / t[pass_]:.2f} |"
      )
  return rows


def moe_layer(impl, tiling, fused, num_experts, top_k):
  """Loss of a minimal dropless MoE FFN (sort by expert, up gmm, SiLU, down gmm, weighted combine)."""

  def loss(x, logits, w_up, w_down):
    t = x.shape[0]
    weights, experts = jax.lax.top_k(jax.nn.softmax(logits.astype(jnp.float32)), top_k)  # [t, top_k]
    order = jnp.argsort(experts.reshape(-1), stable=True)
    row_ids = (order // top_k).astype(jnp.int32)
    sizes = jnp.bincount(experts.reshape(-1), length=num_experts).astype(jnp.int32)
    if fused:
      h = kernels.gmm_gather(x, row_ids, w_up, sizes, implementation=impl, tiling=tiling)
    else:
      h = kernels.gmm(x[row_ids], w_up, sizes, implementation=impl, tiling=tiling)
    y = kernels.gmm(jax.nn.silu(h), w_down, sizes, implementation=impl, tiling=tiling)
    out = kernels.scatter_combine(y, row_ids, weights.reshape(-1)[order], t)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.jit(jax.value_and_grad(loss, (0, 2, 3)))


def bench_moe(small, impls, reps):
  t, d, f, e, top_k = (128, 64, 96, 8, 2) if small else (8192, 4096, 14336, 8, 2)
  key = jax.random.key(1)
  x = jax.random.normal(key, (t, d), jnp.bfloat16)
  logits = jax.random.normal(jax.random.fold_in(key, 1), (t, e), jnp.float32)
  w_up = jax.random.normal(jax.random.fold_in(key, 2), (e, d, f), jnp.bfloat16) / np.sqrt(d)
  w_down = jax.random.normal(jax.random.fold_in(key, 3), (e, f, d), jnp.bfloat16) / np.sqrt(f)
  rows = []
  for label, impl, tiling in impls:
    times = {
      fused: timeit(moe_layer(impl, tiling, fused, e, top_k), x, logits, w_up, w_down, reps=reps)
      for fused in (False, True)
    }
    rows.append(
      f"| {t} tokens, d={d}, f={f}, {e} experts top-{top_k} | {label} | {times[False] * 1e3:.3f} | "
      f"{times[True] * 1e3:.3f} | {times[False] / times[True]:.2f} |"
    )
  return rows


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
  parser.add_argument(
    "--implementations", default=None, help=f"comma list from {kernels.IMPLEMENTATIONS}; default per backend {DEFAULTS}"
  )
  parser.add_argument(
    "--tilings",
    default=None,
    help="comma list of TMxTKxTN; times each Pallas implementation once per tiling (default: its own)",
  )
  parser.add_argument("--reps", type=int, default=None, help="timed calls per measurement (median)")
  parser.add_argument("--out", default=None, help="also write the markdown table to this file")
  args = parser.parse_args()
  backend = jax.default_backend()
  impls = (args.implementations or DEFAULTS.get(backend, "xla")).split(",")
  for impl in impls:
    kernels.choose_implementation(impl)  # raises on an unknown name
  tilings = [parse_tiling(t) for t in args.tilings.split(",")] if args.tilings else []
  impls = variants(impls, tilings)
  reps = args.reps or (3 if args.small else 20)
  device = jax.devices()[0]
  lines = [
    f"## Grouped matmul, bf16, on {device.device_kind} ({backend}, jax {jax.__version__})",
    "",
    "Ratios > 1 mean faster than the dense matmul of equal FLOPs / than jax.lax.ragged_dot.",
    "",
    "| case | m x k x n | implementation | pass | ms | TFLOP/s | vs dense | vs ragged_dot |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for case in cases(args.small):
    lines += bench_case(*case, impls, reps)
  lines += [
    "",
    "### MoE layer (forward + backward), with and without the gather fusion",
    "",
    "| layer | implementation | unfused ms | fused ms | speed-up |",
    "|---|---|---|---|---|",
  ]
  lines += bench_moe(args.small, impls, reps)
  table = "\n".join(lines)
  print(table)
  if args.out:
    with open(args.out, "w") as f:
      f.write(table + "\n")


if __name__ == "__main__":
  main()
