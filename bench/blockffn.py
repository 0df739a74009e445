"""BlockFFN chunk-skipping dispatch vs. running every expert (papers.md A2): time ratio by chunk-level sparsity.

  python bench/blockffn.py [--tokens 512 --embed 256 --experts 16 --width 64 --chunk 8]

Router outputs r are random with a chosen fraction of (chunk, expert) pairs off for the whole chunk (CLS); prints
one table of dense time / chunk-skip time measured in this run (a ratio > 1 is a speed-up).
"""

import argparse
import time

import jax
import jax.numpy as jnp

from zoo.routing import sparsity


def _time(fn, *args, repeats=5):
  jax.block_until_ready(fn(*args))
  start = time.perf_counter()
  for _ in range(repeats):
    jax.block_until_ready(fn(*args))
  return (time.perf_counter() - start) / repeats


def main():
  parser = argparse.ArgumentParser()
  for name, default in (("tokens", 512), ("embed", 256), ("experts", 16), ("width", 64), ("chunk", 8)):
    parser.add_argument(f"--{name}", type=int, default=default)
  a = parser.parse_args()
  keys = jax.random.split(jax.random.key(0), 4)
  x = jax.random.normal(keys[0], (1, a.tokens, a.embed))
  w = {
    "up": jax.random.normal(keys[1], (a.experts, a.embed, a.width)) / a.embed**0.5,
    "down": jax.random.normal(keys[2], (a.experts, a.width, a.embed)) / a.width**0.5,
  }
  dense = jax.jit(
    lambda x, r: jnp.einsum(
      "bte,bted->btd", r, jnp.stack([jax.nn.silu(x @ w["up"][e]) @ w["down"][e] for e in range(a.experts)], axis=2)
    )
  )
  skip = jax.jit(lambda x, r: sparsity.chunk_sparse_ffn(x, r, w, a.chunk))
  print(
    f"backend={jax.default_backend()} tokens={a.tokens} embed={a.embed} experts={a.experts} width={a.width} "
    f"chunk={a.chunk}"
  )
  print(f"{'target CLS':>10} {'measured CLS':>12} {'dense/skip':>10}")
  for off in (0.0, 0.5, 0.75, 0.9):
    chunks = a.tokens // a.chunk
    on = jax.random.uniform(keys[3], (1, chunks, 1, a.experts)) >= off
    r = jax.nn.relu(jax.random.normal(keys[3], (1, chunks, a.chunk, a.experts))) * on
    r = r.reshape(1, a.tokens, a.experts)
    ratio = _time(dense, x, r) / _time(skip, x, r)
    print(f"{off:10.2f} {float(sparsity.chunk_level_sparsity(r, a.chunk)):12.3f} {ratio:10.2f}")


if __name__ == "__main__":
  main()
