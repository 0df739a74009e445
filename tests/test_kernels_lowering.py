"""The accelerator paths lower from this CPU host: Mosaic for TPU, Triton for CUDA (forward and gradients).

Mosaic verifies its kernels while lowering; Triton does not (the GPU compiler parses the module later, on the
device), so `test_triton_modules_verify` runs the MLIR verifier on every Triton module the kernels produce.
"""

import jax
import jax.numpy as jnp
import pytest

from zoo import kernels
from zoo.kernels import triton_modules

S = jax.ShapeDtypeStruct
TRITON = triton_modules.TRITON_CUSTOM_CALL


def _loss(implementation, gather, tiling=None):
  def loss(x, rhs, sizes, row_ids):
    if gather:
      out = kernels.gmm_gather(x, row_ids, rhs, sizes, implementation=implementation, tiling=tiling)
    else:
      out = kernels.gmm(x, rhs, sizes, implementation=implementation, tiling=tiling)
    return jnp.sum(out.astype(jnp.float32) ** 2)

  return jax.value_and_grad(loss, (0, 1))


def _args(dtype):
  # k = 4100 is not a multiple of the default k-tiles (512 TPU, 64 GPU), n = 1408 not of the 512 n-tile.
  return S((300, 4100), dtype), S((8, 4100, 1408), dtype), S((8,), jnp.int32), S((520,), jnp.int32)


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_tpu_path_lowers_to_mosaic(dtype, gather):
  exported = jax.export.export(jax.jit(_loss("pallas_tpu", gather)), platforms=["tpu"])(*_args(dtype))
  # forward gmm, dlhs gmm, drhs tgmm
  assert exported.mlir_module().count("stablehlo.custom_call @tpu_custom_call") == 3


@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_gpu_path_lowers_to_triton(dtype, gather):
  exported = triton_modules.lower_for_cuda(_loss("pallas_gpu", gather), *_args(dtype))
  assert exported.mlir_module().count(f"stablehlo.custom_call @{TRITON}") == 3


def test_tgmm_lowers_for_both():
  args = (S((4100, 520), jnp.bfloat16), S((520, 1408), jnp.bfloat16), S((8,), jnp.int32))
  tpu = jax.export.export(jax.jit(lambda *a: kernels.tgmm(*a, implementation="pallas_tpu")), platforms=["tpu"])(*args)
  assert "tpu_custom_call" in tpu.mlir_module()
  gpu = triton_modules.lower_for_cuda(lambda *a: kernels.tgmm(*a, implementation="pallas_gpu"), *args)
  assert TRITON in gpu.mlir_module()


# The default tiling (8 warps) and the former 64x32x64 (4 warps).
@pytest.mark.parametrize("tiling", [None, (64, 32, 64)])
@pytest.mark.parametrize("gather", [False, True])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_triton_modules_verify(dtype, gather, tiling):
  with triton_modules.capture() as built:
    triton_modules.lower_for_cuda(_loss("pallas_gpu", gather, tiling), *_args(dtype))
  suffix = "_gather_triton" if gather else "_triton"
  assert sorted(module.name for module in built) == sorted(["gmm" + suffix, "gmm_triton", "tgmm" + suffix])
  assert [(module.name, module.error) for module in built if module.error] == []
  assert all(module.asm.startswith('"builtin.module"') for module in built)
