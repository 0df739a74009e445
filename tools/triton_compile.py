"""Compile the GPU grouped-matmul kernels to PTX and cubin on any host (no GPU) and report their resources.

  pip install triton          # the Triton compiler; nothing else in the project needs it
  python tools/triton_compile.py
  python tools/triton_compile.py --tilings 64x64x128,128x64x128 --warps 4,8 --stages 3,4 --out /tmp/sm90.md

For each case of bench/gmm.py (bf16), tiling, num_warps and num_stages, the five Triton kernels of a dropless MoE
step are lowered by jax (kernels/triton_modules.py), verified, and compiled by `triton.compile` for the target
(default sm_90, H100): the forward gmm, its gather-fused form, the dlhs gmm (rhs transposed), the drhs tgmm and its
gather-fused form. Columns: shared memory (KiB) and whether it fits one block's limit on the target, registers per thread and spilled bytes (`ptxas -v`), tensor-core
instructions in the PTX (wgmma = Hopper warpgroup MMA, mma = the older mma.sync) and asynchronous copies (cp.async:
loads the software pipeline overlaps with the math). A kernel that fails to compile stops the run with triton's
message. These are compile facts, not speed (that is bench/gmm.py on a GPU), and the `triton` package may be newer
than the Triton inside jaxlib's GPU plugin.
"""
import argparse
import importlib.util
import os
import re
import subprocess
import sys
import tempfile

import jax
import jax.numpy as jnp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import kernels  # noqa: E402  pylint: disable=g-import-not-at-top
from kernels import gmm_gpu  # noqa: E402  pylint: disable=g-import-not-at-top
from kernels.gmm import DEFAULT_TILING  # noqa: E402  pylint: disable=g-import-not-at-top
from kernels import triton_modules  # noqa: E402  pylint: disable=g-import-not-at-top

S = jax.ShapeDtypeStruct
# Largest dynamic shared memory one thread block may use, per compute capability (CUDA programming guide).
SHARED_LIMIT_KIB = {80: 163, 86: 99, 89: 99, 90: 227}


def load_gmm_bench():
  """bench/gmm.py as a module (its cases and tiling parser)."""
  spec = importlib.util.spec_from_file_location("gmm_bench", os.path.join(ROOT, "bench", "gmm.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def bench_cases(gmm_bench):
  """The (name, m, k, n, g) cases of bench/gmm.py at full size, one per shape (group sizes do not change a kernel)."""
  shapes = {}
  for name, m, k, n, sizes in gmm_bench.cases(small=False):
    shapes.setdefault((m, k, n, len(sizes)), name)
  return [(name, *shape) for shape, name in shapes.items()]


def lower_kernels(m, k, n, g, tiling):
  """{kernel label: TritonModule} for the five kernels of a dropless MoE step at these shapes (bf16)."""
  def loss(gather):
    def f(x, rhs, sizes, row_ids):
      if gather:
        out = kernels.gmm_gather(x, row_ids, rhs, sizes, implementation="pallas_gpu", tiling=tiling)
      else:
        out = kernels.gmm(x, rhs, sizes, implementation="pallas_gpu", tiling=tiling)
      return jnp.sum(out.astype(jnp.float32))
    return jax.grad(f, (0, 1))

  args = (S((m, k), jnp.bfloat16), S((g, k, n), jnp.bfloat16), S((g,), jnp.int32), S((m,), jnp.int32))
  with triton_modules.capture() as plain:
    triton_modules.lower_for_cuda(loss(False), *args)
  with triton_modules.capture() as gathered:
    triton_modules.lower_for_cuda(loss(True), *args)
  # Lowering order of a gradient: forward, dlhs, drhs.
  found = {"gmm": plain[0], "gmm rhs^T (dlhs)": plain[1], "tgmm (drhs)": plain[2],
           "gmm gather": gathered[0], "tgmm gather (drhs)": gathered[2]}
  for label, module in found.items():
    if module.error:
      raise RuntimeError(f"the Triton module of {label} fails MLIR verification:\n{module.error}")
  return found


def compile_module(module, arch, warps, stages):
  """Compiles one module with triton; returns a dict of its resources."""
  import triton  # pylint: disable=g-import-not-at-top
  from triton.backends.compiler import GPUTarget  # pylint: disable=g-import-not-at-top
  from triton.backends.nvidia.compiler import get_ptxas  # pylint: disable=g-import-not-at-top
  with tempfile.TemporaryDirectory() as tmp:
    source = os.path.join(tmp, f"{module.name}.ttir")
    with open(source, "w") as f:
      f.write(module.asm)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32),
                              options={"num_warps": warps, "num_stages": stages})
    ptx = compiled.asm["ptx"]
    ptx_path = os.path.join(tmp, "kernel.ptx")
    with open(ptx_path, "w") as f:
      f.write(ptx)
    suffix = "a" if arch >= 90 else ""
    report = subprocess.run([get_ptxas(arch).path, "-v", f"--gpu-name=sm_{arch}{suffix}", ptx_path, "-o",
                             os.path.join(tmp, "kernel.cubin")], capture_output=True, text=True, check=True).stderr
  registers = re.search(r"Used (\d+) registers", report)
  spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
  return {"shared_kib": compiled.metadata.shared / 1024,
          "registers": int(registers.group(1)) if registers else -1,
          "spill_bytes": int(spills.group(1)) + int(spills.group(2)) if spills else -1,
          "wgmma": ptx.count("wgmma.mma_async"), "mma": ptx.count("mma.sync"), "cp_async": ptx.count("cp.async.")}


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  default_tiling = "x".join(map(str, DEFAULT_TILING["pallas_gpu"]))
  parser.add_argument("--tilings", default=default_tiling, help="comma list of TMxTKxTN (default: the kernel's)")
  parser.add_argument("--warps", default=None, help="comma list of num_warps (default: the kernel's per tiling)")
  parser.add_argument("--stages", default=None, help="comma list of num_stages (default: the kernel's per tiling)")
  parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x10 (90 = H100, 80 = A100)")
  parser.add_argument("--cases", default=None, help="comma list of bench/gmm.py case names (default: all)")
  parser.add_argument("--out", default=None, help="also write the markdown table to this file")
  args = parser.parse_args()
  try:
    import triton  # pylint: disable=g-import-not-at-top
  except ImportError:
    sys.exit("tools/triton_compile.py needs the Triton compiler: pip install triton")
  gmm_bench = load_gmm_bench()
  tilings = [gmm_bench.parse_tiling(t) for t in args.tilings.split(",")]
  cases = bench_cases(gmm_bench)
  if args.cases:
    wanted = args.cases.split(",")
    unknown = sorted(set(wanted) - {c[0] for c in cases})
    if unknown:
      sys.exit(f"unknown case(s) {unknown}; the cases are {[c[0] for c in cases]}")
    cases = [c for c in cases if c[0] in wanted]
  lines = [f"## Triton kernels compiled for sm_{args.arch} (triton {triton.__version__}, jax {jax.__version__})", "",
           "| case | tiling | warps | stages | kernel | shared KiB | fits | registers | spilled bytes | wgmma | mma | "
           "cp.async |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
  print("\n".join(lines), flush=True)
  limit = SHARED_LIMIT_KIB.get(args.arch)
  for name, m, k, n, g in cases:
    for tiling in tilings:
      modules = lower_kernels(m, k, n, g, tiling)
      params = gmm_gpu.compiler_params(tiling)
      warps = [int(w) for w in args.warps.split(",")] if args.warps else [params.num_warps]
      stages = [int(s) for s in args.stages.split(",")] if args.stages else [params.num_stages]
      for num_warps in warps:
        for num_stages in stages:
          for label, module in modules.items():
            r = compile_module(module, args.arch, num_warps, num_stages)
            fits = "?" if limit is None else ("yes" if r["shared_kib"] <= limit else "**no**")
            line = (f"| {name} | {'x'.join(map(str, tiling))} | {num_warps} | {num_stages} | {label} | "
                    f"{r['shared_kib']:.0f} | {fits} | {r['registers']} | {r['spill_bytes']} | {r['wgmma']} | {r['mma']} | "
                    f"{r['cp_async']} |")
            lines.append(line)
            print(line, flush=True)
  if args.out:
    with open(args.out, "w") as f:
      f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
  main()
