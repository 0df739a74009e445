"""Train-step cost of the MoE LM against the dense LM as the data-parallel device count grows.

  python bench/moe_devices.py [--devices 1,2,8] [--steps 5]

For each device count N, a fresh process with N virtual CPU devices (`--xla_force_host_platform_device_count=N`)
builds the engine's train step of `configs/moe_mixtral.py` and of `configs/dense_lm.py` (same mesh: the batch split
over N devices, no expert axis), runs two warm-up steps, then `--steps` timed steps, and prints the median wall
seconds and the CPU seconds (user + system of the process) per step. The N virtual devices share the same cores, so
with pure data parallelism the CPU seconds per step stay about constant as N grows; growth means work repeated on
every device. The MoE / dense ratio of CPU seconds is the figure to compare across N and across versions.
"""

import argparse
import json
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def measure(name, steps):
  """{'wall': median seconds per step, 'cpu': CPU seconds per step} of configs/<name>.py's train step."""
  import importlib

  import jax
  import numpy as np

  from zoo.engine import sharding
  from zoo.engine.trainer import Experiment

  config = importlib.import_module(f"configs.{name}").get_config()
  exp = Experiment(config)
  state, shardings = exp.init_state()
  step = exp.compile_train_step(shardings, exp.abstract_state()[0])
  batches = exp.make_iterator(config.data.train_split, repeat=True)
  walls, cpu = [], 0.0
  with sharding.mesh_context(exp.mesh):
    for i in range(2 + steps):
      batch = sharding.global_batch(exp.pad(next(batches)), exp.mesh)
      start, start_cpu = time.perf_counter(), time.process_time()
      state, metrics = step(state, batch)
      jax.block_until_ready(metrics)
      if i >= 2:
        walls.append(time.perf_counter() - start)
        cpu += time.process_time() - start_cpu
  return {"wall": float(np.median(walls)), "cpu": cpu / steps}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
  parser.add_argument("--devices", default="1,2,8", help="comma-separated device counts")
  parser.add_argument("--steps", type=int, default=5)
  parser.add_argument("--child", default="", help=argparse.SUPPRESS)
  args = parser.parse_args(argv)
  if args.child:
    sys.path.insert(0, ROOT)
    print(json.dumps({name: measure(name, args.steps) for name in args.child.split(",")}))
    return
  try:
    counts = [int(d) for d in args.devices.split(",")]
  except ValueError:
    counts = []
  if not counts or min(counts) < 1 or args.steps < 1:
    parser.error(f"--devices={args.devices!r} --steps={args.steps}: allowed: positive integers (comma-separated)")
  print(f"load average before: {os.getloadavg()[0]:.2f}")
  print("| devices | dense wall s | dense CPU s | MoE wall s | MoE CPU s | MoE / dense CPU |")
  print("|---:|---:|---:|---:|---:|---:|")
  for n in counts:
    env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={n}")
    out = (
      subprocess.run(
        [sys.executable, __file__, "--child", "dense_lm,moe_mixtral", "--steps", str(args.steps)],
        capture_output=True,
        text=True,
        env=env,
        cwd=ROOT,
        check=True,
      )
      .stdout.strip()
      .splitlines()[-1]
    )
    r = json.loads(out)
    d, m = r["dense_lm"], r["moe_mixtral"]
    print(f"| {n} | {d['wall']:.3f} | {d['cpu']:.3f} | {m['wall']:.3f} | {m['cpu']:.3f} | {m['cpu'] / d['cpu']:.2f} |")
  print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
  main()
