"""CPU inference throughput of the zoo's LowFormer (`zoo/models/lowformer.py`, jitted) against timm's (PyTorch, eval
mode, `torch.no_grad()`), the same architecture with the same random weights, in one run.

timm's model is created with `pretrained=False`, its BatchNorm statistics and norm affines randomised, and converted
with `zoo.checkpoints.timm_weights.timm_to_zoo`; the largest logit difference of the two on the benchmark batch is
printed as the check that they compute the same function. float32 everywhere, random images. Timing: after
`--warmup` rounds, `--rounds` interleaved rounds (zoo, then timm) of one forward of `--batch` images each; each figure
is the median wall time of a forward (the zoo's with `block_until_ready`), reported as images/s. torch runs with
`torch.set_num_threads(--threads)`; XLA's CPU runtime uses the machine's cores (its own thread pool). The zoo's
compile time (first call) is printed apart.

  .venv/bin/python bench/vision_throughput.py [--variants b0] [--batch 8] [--sizes 224,128] [--rounds 10]
      [--warmup 2] [--threads 2]
"""

import argparse
import os
import platform
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np
import timm
import torch

from zoo.checkpoints.timm_weights import randomise_norms, timm_to_zoo
from zoo.models import build_model


def measure(variant, batch, size, rounds, warmup):
  """{zoo, timm: images/s, compile_s, max_abs_diff} of one variant at one image size."""
  torch.manual_seed(0)
  reference = randomise_norms(timm.create_model(f"lowformer_{variant}", pretrained=False).eval())
  model = build_model(dict(name="lowformer", variant=variant))
  variables = jax.device_put(timm_to_zoo(reference.state_dict(), model))
  images = np.random.default_rng(0).normal(size=(batch, 3, size, size)).astype(np.float32)
  torch_images = torch.from_numpy(images)
  jax_images = jax.device_put(jnp.asarray(images.transpose(0, 2, 3, 1)))
  apply = jax.jit(lambda v, x: model.apply(v, x)[0])
  start = time.perf_counter()
  zoo_logits = apply(variables, jax_images).block_until_ready()
  compile_s = time.perf_counter() - start
  with torch.no_grad():
    timm_logits = reference(torch_images).numpy()
  diff = float(np.abs(np.asarray(zoo_logits) - timm_logits).max())
  times = {"zoo": [], "timm": []}
  for i in range(warmup + rounds):
    start = time.perf_counter()
    apply(variables, jax_images).block_until_ready()
    zoo_s = time.perf_counter() - start
    start = time.perf_counter()
    with torch.no_grad():
      reference(torch_images)
    timm_s = time.perf_counter() - start
    if i >= warmup:
      times["zoo"].append(zoo_s)
      times["timm"].append(timm_s)
  out = {k: batch / statistics.median(v) for k, v in times.items()}
  return {**out, "compile_s": compile_s, "max_abs_diff": diff}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--variants", default="b0")
  parser.add_argument("--batch", type=int, default=8)
  parser.add_argument("--sizes", default="224,128")
  parser.add_argument("--rounds", type=int, default=10)
  parser.add_argument("--warmup", type=int, default=2)
  parser.add_argument("--threads", type=int, default=2)
  args = parser.parse_args()
  torch.set_num_threads(args.threads)
  print(
    f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; jax {jax.__version__} "
    f"({jax.default_backend()}), torch {torch.__version__} ({args.threads} threads), timm {timm.__version__}; "
    f"batch {args.batch}, float32, median of {args.rounds} rounds after {args.warmup}"
  )
  print("| model | image | zoo images/s | timm images/s | zoo / timm | zoo compile s | max abs logit diff |")
  print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
  for variant in args.variants.split(","):
    for size in (int(s) for s in args.sizes.split(",")):
      r = measure(variant, args.batch, size, args.rounds, args.warmup)
      print(
        f"| lowformer_{variant} | {size}x{size} | {r['zoo']:.1f} | {r['timm']:.1f} | {r['zoo'] / r['timm']:.2f} | "
        f"{r['compile_s']:.1f} | {r['max_abs_diff']:.1e} |",
        flush=True,
      )


if __name__ == "__main__":
  main()
