"""The Triton modules the GPU kernels lower to, captured on any host (no GPU needed).

Mosaic (TPU) verifies its kernels while lowering; Pallas-Triton does not: the module travels as bytecode inside the
custom call and is first parsed by the GPU compiler on the device. Capturing the modules here lets a CPU host run
the MLIR verifier on them (tests/test_kernels_lowering.py) and compile them to PTX and cubin with the `triton`
package (tools/compile_kernels.py). The hook wraps a private jax function, the one place that builds the module.
"""

import contextlib
from typing import NamedTuple, Optional

import jax
from jax._src.pallas.triton import pallas_call_registration

TRITON_CUSTOM_CALL = "__gpu$xla.gpu.triton"


class TritonModule(NamedTuple):
  """One lowered kernel.

  Attributes:
    name: the kernel name (the pallas_call's `name=`).
    asm: the module as MLIR text (generic form), readable by `triton.compile` as a `.ttir` file.
    error: the MLIR verifier's message, or None when the module verifies.
  """

  name: str
  asm: str
  error: Optional[str]


@contextlib.contextmanager
def capture():
  """Yields a list that receives a TritonModule for every Triton kernel lowered inside the block."""
  built = []
  registration = pallas_call_registration.lowering
  lower = registration.lower_jaxpr_to_triton_module

  def lower_and_keep(*args, **kwargs):
    result = lower(*args, **kwargs)
    operation = result.module.operation
    try:
      operation.verify()
      error = None
    except Exception as verifier_error:  # the MLIR verifier raises with the failing op and its source line
      error = str(verifier_error)
    built.append(
      TritonModule(operation.attributes["sym_name"].value, operation.get_asm(print_generic_op_form=True), error)
    )
    return result

  registration.lower_jaxpr_to_triton_module = lower_and_keep
  try:
    yield built
  finally:
    registration.lower_jaxpr_to_triton_module = lower


def lower_for_cuda(fn, *args):
  """Lowers jit(fn) at the given shapes (jax.ShapeDtypeStruct) for CUDA from any host; returns the
  jax.export.Exported."""
  return jax.export.export(
    jax.jit(fn), platforms=["cuda"], disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(TRITON_CUSTOM_CALL)]
  )(*args)
