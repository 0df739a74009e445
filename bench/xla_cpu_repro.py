"""Minimal reproductions of where XLA:CPU loses to PyTorch in the dense LM's train step (`bench/cpu_train_step.py`
locates them in the profile): each piece at the step's shapes (32 x 128 tokens, width 128, 4 heads of 32, FFN 384),
jax and torch timed in the same run.

  python bench/xla_cpu_repro.py [--repeats 30] [--threads 2]

1. SwiGLU's backward: XLA fuses the gate's gradient (silu'(g) * u * dh) with the transpose that feeds the
   weight-gradient matmul; the fused op costs more than the two pieces apart.
2. Causal attention forward + backward: the zoo's einsum + mask + softmax, `jax.nn.dot_product_attention` (XLA's
   implementation on CPU), and torch's `scaled_dot_product_attention`.
3. The matmuls of the step: GFLOP/s of `jnp.dot` vs `torch.mm` at the FFN's shapes, forward and weight gradient.
Prints median milliseconds and the ratios.
"""

import argparse
import time

import jax
import jax.numpy as jnp
import numpy as np

N, D, H, HEADS, T = 4096, 128, 384, 4, 128  # tokens, width, FFN width, heads, sequence


def _median_ms(fn, args, repeats):
  jax.block_until_ready(fn(*args))
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def _torch_ms(fn, repeats):
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return float(np.median(times)) * 1e3


def swiglu_backward(repeats):
  rng = np.random.default_rng(0)
  g, u, dh = (jnp.asarray(rng.standard_normal((N, H)), jnp.float32) for _ in range(3))
  gate_grad = jax.jit(lambda g, u, dh: dh * u * jax.grad(lambda g: jnp.sum(jax.nn.silu(g)))(g))
  transpose = jax.jit(lambda x: x.T + 0.0)
  fused = jax.jit(lambda g, u, dh: (dh * u * jax.grad(lambda g: jnp.sum(jax.nn.silu(g)))(g)).T + 0.0)
  apart = _median_ms(gate_grad, (g, u, dh), repeats) + _median_ms(transpose, (g,), repeats)
  together = _median_ms(fused, (g, u, dh), repeats)
  print(f"| SwiGLU gate gradient + transpose [{N}, {H}] | two ops: elementwise + transpose {apart:.2f} ms | "
        f"one fused op {together:.2f} ms | fused / apart = {together / apart:.1f}x |")  # fmt: skip


def attention(repeats, torch):
  rng = np.random.default_rng(1)
  b, hd = N // T, D // HEADS
  q, k, v, dy = (rng.standard_normal((b, T, HEADS, hd)).astype(np.float32) for _ in range(4))
  mask = np.tril(np.ones((T, T), bool))

  def einsum_attention(q, k, v):
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k) / np.sqrt(hd)
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    return jnp.einsum("bhqk,bkhd->bqhd", jax.nn.softmax(logits, -1), v)

  def library_attention(q, k, v):
    return jax.nn.dot_product_attention(q, k, v, is_causal=True, implementation="xla")

  def fwd_bwd(f):
    return jax.jit(lambda q, k, v, dy: jax.grad(lambda q, k, v: jnp.sum(f(q, k, v) * dy), (0, 1, 2))(q, k, v))

  args = tuple(jnp.asarray(x) for x in (q, k, v, dy))
  np.testing.assert_allclose(einsum_attention(*args[:3]), library_attention(*args[:3]), atol=2e-5)
  zoo = _median_ms(fwd_bwd(einsum_attention), args, repeats)
  lib = _median_ms(fwd_bwd(library_attention), args, repeats)
  tq, tk, tv = (torch.tensor(x.transpose(0, 2, 1, 3), requires_grad=True) for x in (q, k, v))
  tdy = torch.tensor(dy.transpose(0, 2, 1, 3))

  def torch_step():
    out = torch.nn.functional.scaled_dot_product_attention(tq, tk, tv, is_causal=True)
    torch.autograd.grad(out, (tq, tk, tv), tdy)

  ref = _torch_ms(torch_step, repeats)
  print(f"| causal attention fwd + bwd, [{b}, {T}, {HEADS}, {hd}] | einsum + mask + softmax {zoo:.2f} ms, "
        f"jax.nn.dot_product_attention {lib:.2f} ms | torch sdpa {ref:.2f} ms | jax / torch = {zoo / ref:.1f}x, "
        f"{lib / ref:.1f}x |")  # fmt: skip


def matmuls(repeats, torch):
  rng = np.random.default_rng(2)
  x, w = rng.standard_normal((N, D)).astype(np.float32), rng.standard_normal((D, H)).astype(np.float32)
  dy = rng.standard_normal((N, H)).astype(np.float32)
  cases = {
    "x @ W [4096,128]x[128,384]": (jax.jit(jnp.dot), (x, w), lambda tx, tw, tdy: torch.mm(tx, tw)),
    "dW = x^T dy [128,4096]x[4096,384]": (
      jax.jit(lambda x, dy: x.T @ dy),
      (x, dy),
      lambda tx, tw, tdy: torch.mm(tx.t(), tdy),
    ),
  }
  tx, tw, tdy = torch.tensor(x), torch.tensor(w), torch.tensor(dy)
  flops = 2 * N * D * H
  for name, (fn, args, torch_fn) in cases.items():
    j = _median_ms(fn, tuple(jnp.asarray(a) for a in args), repeats)
    t = _torch_ms(lambda torch_fn=torch_fn: torch_fn(tx, tw, tdy), repeats)
    print(f"| matmul {name} | jax {flops / j / 1e6:.0f} GFLOP/s ({j:.2f} ms) | torch {flops / t / 1e6:.0f} GFLOP/s "
          f"({t:.2f} ms) | jax / torch time = {j / t:.1f}x |")  # fmt: skip


def main():
  parser = argparse.ArgumentParser()
  parser.add_argument("--repeats", type=int, default=30)
  parser.add_argument("--threads", type=int, default=2)
  a = parser.parse_args()
  import torch  # pylint: disable=g-import-not-at-top  (the `hf` extra)

  torch.set_num_threads(a.threads)
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch {torch.__version__} ({a.threads} threads), "
        f"median of {a.repeats}")  # fmt: skip
  print("| piece | jax | peer | ratio |")
  print("|---|---|---|---|")
  swiglu_backward(a.repeats)
  attention(a.repeats, torch)
  matmuls(a.repeats, torch)


if __name__ == "__main__":
  main()
