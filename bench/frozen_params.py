"""A train step that trains about 1% of a model's parameters: the engine's split (frozen parameters are inputs, not
differentiated, with no optimizer state) against the former way (gradients for every parameter, frozen ones given a
zero update by `optax.multi_transform`), in one run on the same model, data and devices.

Memory is XLA's estimate for the compiled step (arguments + non-aliased outputs + temporaries, per device; the state
is donated); time is the median wall time of a step. Prints a markdown table; `--out FILE` appends it to FILE.

  .venv/bin/python bench/frozen_params.py [--reps 10] [--out bench/RESULTS.md]
"""

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import optax

from configs.dense_lm import get_config
from zoo.engine import partition, sharding
from zoo.engine.memory import compiled_memory
from zoo.engine.trainer import Experiment

TRAINABLE = ("^final_norm/", "^layers_5/attention/query/")  # about 1% of the model below


def _config():
  c = get_config()
  c.model.update(num_layers=6, embed_dim=256, num_heads=4, num_kv_heads=2, mlp_dim=768)
  c.data.seq_len = 128
  c.train.batch_size = 16
  c.trainable_params = TRAINABLE
  return c


def _former(exp):
  """The experiment as the engine ran it before the split: every parameter differentiated (the frozen gradients
  summed over micro-batches and in the gradient norm), the frozen ones given a zero update and no Adam moments (as
  `optax.multi_transform` with `set_to_zero` did)."""
  mask, inner = dict(exp.mask), exp.tx
  exp.mask = {path: True for path in mask}

  def init(params):
    return inner.init(partition.split(params, mask)[0])

  def update(grads, state, params=None):
    trainable, frozen = partition.split(grads, mask)
    updates, state = inner.update(trainable, state, None if params is None else partition.split(params, mask)[0])
    return partition.merge(updates, jax.tree.map(jnp.zeros_like, frozen)), state

  exp.tx = optax.GradientTransformation(init, update)
  return exp


def _measure(exp, reps):
  state, shardings = exp.init_state()
  step = exp.compile_train_step(shardings, exp.abstract_state()[0])
  need, parts = compiled_memory(step)
  batches = exp.make_iterator(exp.config.data.train_split, repeat=True)
  times = []
  with sharding.mesh_context(exp.mesh):
    for i in range(reps + 2):
      batch = sharding.global_batch(exp.pad(next(batches)), exp.mesh)
      start = time.perf_counter()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      if i >= 2:  # the first steps warm up
        times.append(time.perf_counter() - start)
  trainable = partition.count(state.params)
  return {
    "memory": need,
    "temporaries": parts["temporaries"],
    "time": statistics.median(times),
    "trainable": trainable,
    "total": trainable + partition.count(state.frozen),
  }


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--reps", type=int, default=10)
  parser.add_argument("--out", help="append the table to this file")
  args = parser.parse_args(argv)
  rows = {
    "gradients for all, zero update for frozen (former)": _measure(_former(Experiment(_config())), args.reps),
    "frozen split before differentiation (engine)": _measure(Experiment(_config()), args.reps),
  }
  former, split = rows.values()  # the former differentiates every parameter: its 'trainable' is the whole model
  lines = [
    f"Train step of a {former['trainable'] / 1e6:.2f}M-parameter dense LM (6 layers, width 256, batch 16 x 128) "
    f"training {split['trainable']:,} of its parameters ({100 * split['trainable'] / former['trainable']:.2f}%), "
    f"{jax.devices()[0].platform}, {len(jax.devices())} device(s), jax {jax.__version__}:",
    "",
    "| step | step memory (MiB) | of which temporaries (MiB) | step time (ms) | memory vs former | time vs former |",
    "|---|---|---|---|---|---|",
  ]
  for name, r in rows.items():
    lines.append(
      f"| {name} | {r['memory'] / 2**20:.1f} | {r['temporaries'] / 2**20:.1f} | {1e3 * r['time']:.1f} | "
      f"{r['memory'] / former['memory']:.2f}x | {r['time'] / former['time']:.2f}x |"
    )
  table = "\n".join(lines)
  print(table)
  if args.out:
    with open(args.out, "a") as f:
      f.write("\n" + table + "\n")


if __name__ == "__main__":
  main()
