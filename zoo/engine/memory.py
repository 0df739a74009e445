"""Will a compiled step fit? XLA's memory estimate of a compiled program against a device's memory."""

import os

import jax

from zoo.models import ConfigError

GIB = 2**30


def device_memory(device):
  """Bytes one device may use: the accelerator's limit, or on CPU the host's physical memory shared by its local
  CPU devices."""
  stats = device.memory_stats() if hasattr(device, "memory_stats") else None
  if stats and stats.get("bytes_limit"):
    return int(stats["bytes_limit"])
  host = os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
  return host // max(1, sum(d.platform == device.platform for d in jax.local_devices()))


def compiled_memory(compiled):
  """(bytes per device, parts) of a `jax.stages.Compiled`: arguments + outputs not aliased to them + temporaries."""
  m = compiled.memory_analysis()
  if m is None:
    return None, {}
  parts = {
    "arguments": m.argument_size_in_bytes,
    "outputs": m.output_size_in_bytes - m.alias_size_in_bytes,
    "temporaries": m.temp_size_in_bytes,
  }
  return sum(parts.values()), parts


def check_memory(compiled, device, what_to_lower):
  """Raise ConfigError when `compiled` needs more memory than `device` has, naming both figures.

  Args:
    compiled: a compiled step (`jax.jit(f).lower(...).compile()`).
    device: one device of the mesh.
    what_to_lower: the config keys that shrink the step, for the message.
  """
  need, parts = compiled_memory(compiled)
  have = device_memory(device)
  if need is None or need <= have:
    return
  detail = ", ".join(f"{k} {v / GIB:.2f} GiB" for k, v in parts.items())
  raise ConfigError(
    f"one training step needs about {need / GIB:.1f} GiB per device (XLA's estimate: {detail}) but a "
    f"{device.platform} device has {have / GIB:.1f} GiB; lower {what_to_lower}"
  )
