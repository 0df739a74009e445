"""Compile the Pallas grouped-matmul kernels for GPU or TPU on a host without either, and report what compiled.

  pip install triton                        # GPU: the Triton compiler
  python tools/compile_kernels.py triton    # sm_90 (H100); --arch 80 for A100
  python tools/compile_kernels.py triton --tilings 64x64x128,128x64x128 --warps 4,8 --stages 3,4
  pip install 'jax[tpu]==<installed jax version>'   # TPU: libtpu, which compiles ahead of time for a topology
  python tools/compile_kernels.py tpu --chips v4,v5e,v5p,v6e

The kernels are those of a dropless MoE step at each shape of bench/gmm.py: forward gmm, its gather-fused form, and
their gradients (dlhs gmm with rhs transposed, drhs tgmm and its gather-fused form).

triton: each kernel's Triton module is captured from jax (kernels/triton_modules.py), verified, and compiled by
`triton.compile` to PTX and cubin for `--arch`. Columns: shared memory (KiB) and whether it fits one block on that
arch, registers per thread and spilled bytes (`ptxas -v`), tensor-core instructions in the PTX (wgmma = Hopper
warpgroup MMA, mma = mma.sync) and asynchronous copies (cp.async: loads the software pipeline overlaps with the
math). The `triton` package may be newer than the Triton inside jaxlib's GPU plugin.

tpu: the whole forward + backward step is compiled ahead of time by XLA and Mosaic for one chip of each TPU
generation (`jax.experimental.topologies`), in bfloat16 and float32; a kernel Mosaic rejects fails the row with
Mosaic's message. `--model-configs` adds the training gradient of each config's model (bfloat16 activations,
dropless gather-fused dispatch, its batch and sequence length) with the Pallas kernels forced
(`kernels.default_implementation`).

A kernel that does not compile is a bug the CPU tests cannot see; these are compile facts, not speed (bench/gmm.py
on the accelerator measures speed).
"""

import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile
import time

import jax
import jax.numpy as jnp

from zoo import kernels
from zoo.kernels import gmm_gpu, triton_modules
from zoo.kernels.gmm import DEFAULT_TILING

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the checkout, whose bench/gmm.py is loaded

# Largest dynamic shared memory one thread block may use, per compute capability (CUDA programming guide).
SHARED_LIMIT_KIB = {80: 163, 86: 99, 89: 99, 90: 227}
# One chip of each TPU generation, as `jax.experimental.topologies` names the smallest slice.
TPU_TOPOLOGIES = {"v4": "v4:2x2x1", "v5e": "v5e:2x2", "v5p": "v5p:2x2x1", "v6e": "v6e:2x2"}


def load_gmm_bench():
  """bench/gmm.py as a module (its cases and tiling parser)."""
  spec = importlib.util.spec_from_file_location("gmm_bench", os.path.join(ROOT, "bench", "gmm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def bench_cases(gmm_bench, wanted=None):
  """The (name, m, k, n, g) cases of bench/gmm.py at full size, one per shape (group sizes do not change a kernel)."""
  shapes = {}
  for name, m, k, n, sizes in gmm_bench.cases(small=False):
    shapes.setdefault((m, k, n, len(sizes)), name)
  cases = [(name, *shape) for shape, name in shapes.items()]
  if wanted:
    unknown = sorted(set(wanted) - {c[0] for c in cases})
    if unknown:
      sys.exit(f"unknown case(s) {unknown}; the cases are {[c[0] for c in cases]}")
    cases = [c for c in cases if c[0] in wanted]
  return cases


def moe_step(implementation, tiling, gather):
  """Gradient (in x and rhs) of a loss through gmm or gmm_gather: lowers the forward and both backward kernels."""

  def loss(x, rhs, sizes, row_ids):
    if gather:
      out = kernels.gmm_gather(x, row_ids, rhs, sizes, implementation=implementation, tiling=tiling)
    else:
      out = kernels.gmm(x, rhs, sizes, implementation=implementation, tiling=tiling)
    return jnp.sum(out.astype(jnp.float32))

  return jax.grad(loss, (0, 1))


def step_args(m, k, n, g, dtype, sharding=None):
  def struct(shape, dt):
    return jax.ShapeDtypeStruct(shape, dt, sharding=sharding)

  return struct((m, k), dtype), struct((g, k, n), dtype), struct((g,), jnp.int32), struct((m,), jnp.int32)


def triton_kernels(m, k, n, g, tiling):
  """{kernel label: TritonModule} for the five kernels of a dropless MoE step at these shapes (bf16)."""
  args = step_args(m, k, n, g, jnp.bfloat16)
  with triton_modules.capture() as plain:
    triton_modules.lower_for_cuda(moe_step("pallas_gpu", tiling, False), *args)
  with triton_modules.capture() as gathered:
    triton_modules.lower_for_cuda(moe_step("pallas_gpu", tiling, True), *args)
  # Lowering order of a gradient: forward, dlhs, drhs.
  found = {
    "gmm": plain[0],
    "gmm rhs^T (dlhs)": plain[1],
    "tgmm (drhs)": plain[2],
    "gmm gather": gathered[0],
    "tgmm gather (drhs)": gathered[2],
  }
  for label, module in found.items():
    if module.error:
      raise RuntimeError(f"the Triton module of {label} fails MLIR verification:\n{module.error}")
  return found


def compile_triton(module, arch, warps, stages):
  """Compiles one Triton module with the triton package; returns a dict of its resources."""
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  from triton.backends.nvidia.compiler import get_ptxas  # pylint: disable=g-import-not-at-top

  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, f"{module.name}.ttir")
    with open(source, "w") as f:
      f.write(module.asm)
    compiled = triton.compile(
      source, target=GPUTarget("cuda", arch, 32), options={"num_warps": warps, "num_stages": stages}
    )
    ptx = compiled.asm["ptx"]
    ptx_path = os.path.join(tmp, "kernel.ptx")
    with open(ptx_path, "w") as f:
      f.write(ptx)
    suffix = "a" if arch >= 90 else ""
    report = subprocess.run(
      [get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx_path, "-o", os.path.join(tmp, "kernel.cubin")],
      capture_output=True,
      text=True,
      check=True,
    ).stderr
  registers = re.search(r"Used (\d+) registers", report)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
  return {
    "shared_kib": compiled.metadata.shared / 1024,
    "registers": int(registers.group(1)) if registers else -1,
    "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else -1,
    "wgmma": ptx.count("wgmma.mma_async"),
    "mma": ptx.count("mma.sync"),
    "cp_async": ptx.count("cp.async."),
  }


def add_row(lines, cells):
  """Appends the markdown table row of `cells` to `lines` and prints it."""
  line = "| " + " | ".join(map(str, cells)) + " |"
  lines.append(line)
  print(line, flush=True)


def compile_status(compile_step):
  """(status, seconds) of running compile_step(): status "yes", or "**no**: " and the error's first line."""
  start = time.perf_counter()
  try:
    compile_step()
    status = "yes"
  except Exception as error:  # pylint: disable=broad-except
    status = "**no**: " + str(error).splitlines()[0][:200].replace("|", "/")
  return status, time.perf_counter() - start


def run_triton(args, cases, tilings):
  try:
    import triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("compiling for GPU needs the Triton compiler: pip install triton")
  lines = [
    f"## Triton kernels compiled for sm_{args.arch} (triton {triton.__version__}, jax {jax.__version__})",
    "",
    "| case | tiling | warps | stages | kernel | shared KiB | fits | registers | spilled bytes | wgmma | mma | "
    "cp.async |",
    "|---|---|---|---|---|---|---|---|---|---|---|---|",
  ]
  print("\n".join(lines), flush=True)
  limit = SHARED_LIMIT_KIB.get(args.arch)
  for name, m, k, n, g in cases:
    for tiling in tilings or [DEFAULT_TILING["pallas_gpu"]]:
      modules = triton_kernels(m, k, n, g, tiling)
      params = gmm_gpu.compiler_params(tiling)
      warps = [int(w) for w in args.warps.split(",")] if args.warps else [params.num_warps]
      stages = [int(s) for s in args.stages.split(",")] if args.stages else [params.num_stages]
      for num_warps in warps:
        for num_stages in stages:
          for label, module in modules.items():
            r = compile_triton(module, args.arch, num_warps, num_stages)
            fits = "?" if limit is None else ("yes" if r["shared_kib"] <= limit else "**no**")
            resources = [r[key] for key in ("registers", "spill_bytes", "wgmma", "mma", "cp_async")]
            cells = [name, "x".join(map(str, tiling)), num_warps, num_stages, label, f"{r['shared_kib']:.0f}", fits]
            add_row(lines, [*cells, *resources])
  return lines


def model_gradient(config_path, sharding):
  """(grad fn, abstract args) of the LM loss of a config's model with dropless dispatch in bfloat16."""
  from zoo.models import build_model  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("experiment_config", config_path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  model = build_model(config.model, dispatch="dropless", dtype="bfloat16")
  tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32, sharding=sharding)
  variables = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, tokens.shape[1]), jnp.int32)))
  variables = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding), variables)

  def loss(variables, tokens):
    logits, out = model.apply(variables, tokens)
    labels = jax.nn.one_hot(tokens[:, 1:], logits.shape[-1])
    return -jnp.mean(jnp.sum(labels * jax.nn.log_softmax(logits[:, :-1]), -1)) + out.aux_loss

  return jax.grad(loss), (variables, tokens)


def run_tpu(args, cases, tilings):
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top

  chips = args.chips.split(",")
  unknown = sorted(set(chips) - set(TPU_TOPOLOGIES))
  if unknown:
    sys.exit(f"unknown chip(s) {unknown}; choose from {sorted(TPU_TOPOLOGIES)}")
  lines = [
    f"## Mosaic kernels compiled ahead of time for TPU (jax {jax.__version__})",
    "",
    "| case | chip | tiling | dtype | step | compiles | seconds |",
    "|---|---|---|---|---|---|---|",
  ]
  print("\n".join(lines), flush=True)
  failures = 0
  for chip in chips:
    try:
      topology = topologies.get_topology_desc(topology_name=TPU_TOPOLOGIES[chip], platform="tpu")
    except Exception as error:  # pylint: disable=broad-except
      sys.exit(
        f"cannot describe a {chip} TPU here ({error}); compiling for TPU needs libtpu: "
        "pip install 'jax[tpu]==<installed jax version>'"
      )
    sharding = jax.sharding.SingleDeviceSharding(topology.devices[0])
    device = f"{chip} ({topology.devices[0].device_kind})"
    for name, m, k, n, g in cases:
      for tiling in tilings or [DEFAULT_TILING["pallas_tpu"]]:
        for dtype in (jnp.bfloat16, jnp.float32):
          for gather in (False, True):
            step = jax.jit(moe_step("pallas_tpu", tiling, gather))
            status, seconds = compile_status(lambda: step.lower(*step_args(m, k, n, g, dtype, sharding)).compile())
            failures += status != "yes"
            step_name = f"{'gather gmm' if gather else 'gmm'} fwd + bwd"
            cells = [name, device, "x".join(map(str, tiling)), jnp.dtype(dtype).name, step_name, status]
            add_row(lines, [*cells, f"{seconds:.1f}"])
    for config_path in args.model_configs.split(",") if args.model_configs else []:

      def compile_model():
        grad, abstract = model_gradient(config_path, sharding)
        with kernels.default_implementation("pallas_tpu"):
          jax.jit(grad).lower(*abstract).compile()

      status, seconds = compile_status(compile_model)
      failures += status != "yes"
      model = f"{os.path.basename(config_path)} training gradient"
      add_row(lines, [model, device, "default", "bfloat16", "dropless, gather-fused", status, f"{seconds:.1f}"])
  if failures:
    print(f"{failures} step(s) failed to compile", file=sys.stderr)
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("backend", choices=["triton", "tpu"])
  parser.add_argument("--tilings", default=None, help="comma list of TMxTKxTN (default: the kernel's)")
  parser.add_argument("--cases", default=None, help="comma list of bench/gmm.py case names (default: all shapes)")
  parser.add_argument("--arch", type=int, default=90, help="triton: compute capability x10 (90 = H100, 80 = A100)")
  parser.add_argument("--warps", default=None, help="triton: comma list of num_warps (default: the kernel's)")
  parser.add_argument("--stages", default=None, help="triton: comma list of num_stages (default: the kernel's)")
  parser.add_argument("--chips", default=",".join(TPU_TOPOLOGIES), help="tpu: comma list of TPU generations")
  parser.add_argument(
    "--model-configs",
    default="configs/moe_mixtral.py",
    help="tpu: comma list of config files whose model's training gradient to compile ('' for none)",
  )
  parser.add_argument("--out", default=None, help="also write the markdown table to this file")
  args = parser.parse_args()
  gmm_bench = load_gmm_bench()
  tilings = [gmm_bench.parse_tiling(t) for t in args.tilings.split(",")] if args.tilings else []
  cases = bench_cases(gmm_bench, args.cases.split(",") if args.cases else None)
  lines = (run_triton if args.backend == "triton" else run_tpu)(args, cases, tilings)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
