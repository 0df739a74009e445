"""Block-sparse matmul (zoo.block_sparse) vs dense on XLA:CPU (papers.md E "SparseByteNN": 1.27x at 30% sparsity).

  python bench/block_sparse.py [--small] [--tokens 512,2048] [--repeats 5]

x [tokens, 1024] @ W [1024, 4096], float32; random block masks at 0/30/50/70/90% block sparsity for block shapes
(16, 16), (32, 32), (64, 64), (1, 16). Both jitted and warmed up; dense and sparse calls interleaved, best of N with
`block_until_ready`. Prints a markdown table of speed-up = dense time / sparse time (> 1 is faster than dense).
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

from zoo import block_sparse as bs

SPARSITIES = (0.0, 0.3, 0.5, 0.7, 0.9)
BLOCKS = ((16, 16), (32, 32), (64, 64), (1, 16))


def _interleaved(dense, sparse, args_d, args_s, repeats):
  jax.block_until_ready(dense(*args_d))
  jax.block_until_ready(sparse(*args_s))
  best_d = best_s = float("inf")
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(dense(*args_d))
    best_d = min(best_d, time.perf_counter() - start)
    start = time.perf_counter()
    jax.block_until_ready(sparse(*args_s))
    best_s = min(best_s, time.perf_counter() - start)
  return best_d, best_s


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--small", action="store_true", help="smoke test: 64 tokens, W [128, 256]")
  parser.add_argument("--tokens", default="512,2048")
  parser.add_argument("--repeats", type=int, default=5)
  a = parser.parse_args()
  tokens, k, n = [int(t) for t in a.tokens.split(",")], 1024, 4096
  if a.small:
    tokens, k, n, a.repeats = [64], 128, 256, 2
  rng = np.random.default_rng(0)
  kernel = rng.standard_normal((k, n)).astype(np.float32) / k**0.5
  dense = jax.jit(lambda x, w: x @ w)
  sparse = jax.jit(bs.matmul)
  print(
    f"x [tokens, {k}] @ W [{k}, {n}] float32, layout {bs.LAYOUT}, best of {a.repeats}, interleaved; "
    "cells: dense ms / sparse ms = speed-up"
  )
  header = "| tokens | block | " + " | ".join(f"{round(s * 100)}%" for s in SPARSITIES) + " |"
  print(header)
  print("|" + "---|" * (2 + len(SPARSITIES)), flush=True)
  for m in tokens:
    x = jnp.asarray(rng.standard_normal((m, k)).astype(np.float32))
    for block in BLOCKS:
      cells = []
      for s in SPARSITIES:
        grid = (k // block[0], n // block[1])
        mask = np.zeros(grid, bool).reshape(-1)
        mask[rng.permutation(mask.size)[: round((1 - s) * mask.size)]] = True  # exact block sparsity
        mask = mask.reshape(grid)
        w = jnp.asarray(kernel * np.repeat(np.repeat(mask, block[0], 0), block[1], 1))
        packed = bs.pack(kernel, mask, block)
        td, ts = _interleaved(dense, sparse, (x, w), (x, packed), a.repeats)
        cells.append(f"{td * 1e3:.1f}/{ts * 1e3:.1f} = **{td / ts:.2f}x**")
      print(f"| {m} | {block[0]}x{block[1]} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
  main()
