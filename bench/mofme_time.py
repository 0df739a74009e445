"""MoFME against the conventional MoE of the same expert count (papers.md E; the paper claims > 72% fewer parameters
and 39% less time): parameters, train-step time (forward + backward + AdamW update, the engine's compiled step) and
inference time (the jitted forward, `deterministic=True`), in one run, on the same batch and input size.

Two sizes:
- `digits`: `configs/mofme_digits.py` and its ':moe' role as shipped (8x8x1 digits, 2x2 patches = 16 tokens, width
  64, 2 blocks, 4 experts, top-2, T = 5 router samples in training), batch 64.
- `larger`: closer to the paper's setting [guess: the paper's models are ViT-style deweathering networks; here the
  same classifier at 32x32x3, 4x4 patches = 64 tokens, width 128, 2 blocks, 4 heads, 16 experts, top-2, Adaptor and
  expert width 4 x 128; sized for a 2-core CPU]: the digits resized to 32x32 with the gray channel replicated
  (`data.image_size=32`, `data.channels=3`), batch 16.
Each size runs three models: 'moe' (full GELU experts), 'mofme' (the authors' dense A_i, B_i) and 'mofme diagonal'.
Timing: after 2 warm-up calls, `--reps` interleaved rounds (every model's train step, then every model's forward);
each figure is the median wall time on one device. Prints one markdown table of the figures and their ratios to the
MoE of the same size.

  .venv/bin/python bench/mofme_time.py [--reps 10] [--sizes digits,larger]
"""

import argparse
import platform
import statistics
import time

import jax

from configs.mofme_digits import get_config
from zoo.engine import partition, sharding
from zoo.engine.trainer import Experiment

LARGER = dict(
  channels=3, patch_size=4, embed_dim=128, depth=2, num_heads=4, num_experts=16, top_k=2, hidden_dim=512
)  # [guess] see the module docstring
MODELS = {"moe": ("moe", "dense"), "mofme": ("mofme", "dense"), "mofme diagonal": ("mofme", "diagonal")}


def _config(size, ffn, modulation):
  config = get_config(ffn)
  config.model.modulation = modulation
  if size == "larger":
    config.model.update(LARGER)
    config.data.update(image_size=32, channels=3)
    config.train.batch_size = 16
  return config


class _Runner:
  """One model's compiled train step and forward on a fixed batch."""

  def __init__(self, config):
    self.exp = Experiment(config, devices=jax.devices()[:1])
    self.state, shardings = self.exp.init_state()
    self.train_step = self.exp.compile_train_step(shardings, self.exp.abstract_state()[0])
    batch = next(self.exp.make_iterator(config.data.train_split, repeat=True))
    self.batch = sharding.global_batch(self.exp.pad(batch), self.exp.mesh)
    model = self.exp.model
    self.forward = jax.jit(lambda variables, images: model.apply(variables, images=images, deterministic=True)[0])
    self.params = partition.count(self.state.params) + partition.count(self.state.frozen)
    self.ffn_params = model.ffn_params()
    self.times = {"train": [], "infer": []}

  def train(self):
    with sharding.mesh_context(self.exp.mesh):
      start = time.perf_counter()
      self.state, metrics = self.train_step(self.state, self.batch)
      jax.block_until_ready(metrics)
    return time.perf_counter() - start

  def infer(self):
    start = time.perf_counter()
    jax.block_until_ready(self.forward(self.state.variables(), self.batch["image"]))
    return time.perf_counter() - start


def measure(size, reps):
  runners = {name: _Runner(_config(size, *spec)) for name, spec in MODELS.items()}
  for i in range(reps + 2):
    for kind in ("train", "infer"):
      for runner in runners.values():
        elapsed = getattr(runner, kind)()
        if i >= 2:
          runner.times[kind].append(elapsed)
  return {
    name: {
      "params": r.params,
      "ffn": r.ffn_params,
      **{k: statistics.median(v) for k, v in r.times.items()},
      "shape": r.batch["image"].shape,
    }
    for name, r in runners.items()
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--sizes", default="digits,larger")
  args = parser.parse_args(argv)
  lines = [
    f"{platform.processor() or platform.machine()}, {jax.devices()[0].platform} ({jax.devices()[0].device_kind}), "
    f"1 device, jax {jax.__version__}, median of {args.reps} rounds:",
    "",
    "| size | batch | model | parameters | one FFN layer | train step (ms) | inference (ms) | params vs MoE | "
    "FFN layer vs MoE | train vs MoE | inference vs MoE |",
    "|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  for size in args.sizes.split(","):
    rows = measure(size, args.reps)
    base = rows["moe"]
    for name, r in rows.items():
      lines.append(
        f"| {size} | {'x'.join(map(str, r['shape']))} | {name} | {r['params']:,} | {r['ffn']:,} | "
        f"{1e3 * r['train']:.1f} | {1e3 * r['infer']:.2f} | {r['params'] / base['params']:.2f}x | "
        f"{r['ffn'] / base['ffn']:.2f}x | {r['train'] / base['train']:.2f}x | {r['infer'] / base['infer']:.2f}x |"
      )
    print("\n".join(lines[-len(rows) :]), flush=True)
  print("\n".join(lines))


if __name__ == "__main__":
  main()
