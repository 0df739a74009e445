"""A key/value cache for autoregressive decoding: one small pytree per attention layer.

Slot `s` of the cache holds the key/value of absolute position `s`, so the cache also serves sliding-window layers
(the window is applied by the attention mask; slots outside it are simply not attended). `length[b]` is one past the
largest position written in row `b`; slots at or past it are invalid. The functions below hold that slot logic for
every cache of this layout (`KVCache`, `zoo.layers.mla.MLACache`).
"""

import flax.struct
import jax
import jax.numpy as jnp


def check_positive_dims(cache, **dims):
  """Raises a ValueError naming the first of `dims` (name=value) that is not a positive integer; `cache` names the
  cache class in the message."""
  for name, value in dims.items():
    if int(value) < 1:
      raise ValueError(f"{cache}.create: {name}={value} must be a positive integer")


def write_slots(cache, buffers, values, positions, length):
  """Writes each of `values` [batch, length, ...] into its buffer [batch, max_length, ...] at `positions`.

  Args:
    cache: the cache class's name, for the messages.
    buffers: the cache's arrays [batch, max_length, ...].
    values: one array [batch, length, ...] per buffer (cast to its dtype).
    positions: [batch, length] int, each in [0, max_length) (positions past the end are dropped by the scatter).
    length: [batch] int32, one past the largest position written so far.

  Returns:
    (the updated buffers as a tuple, the updated length).
  """
  new_shape, max_length = values[0].shape, buffers[0].shape[1]
  if positions.shape != new_shape[:2]:
    raise ValueError(f"{cache}.update: positions {positions.shape} must be [batch, length] = {new_shape[:2]}")
  if new_shape[1] > max_length:
    raise ValueError(f"{cache}.update: {new_shape[1]} new tokens do not fit max_length={max_length}")
  rows = jnp.arange(new_shape[0])[:, None]
  written = tuple(b.at[rows, positions].set(v.astype(b.dtype), mode="drop") for b, v in zip(buffers, values))
  return written, jnp.maximum(length, jnp.max(positions, axis=1).astype(jnp.int32) + 1)


def slot_positions(length, max_length):
  """(key_positions [batch, max_length] int32, key_valid [batch, max_length] bool) of the slots, given `length`
  [batch]."""
  slots = jnp.broadcast_to(jnp.arange(max_length, dtype=jnp.int32), (length.shape[0], max_length))
  return slots, slots < length[:, None]


@flax.struct.dataclass
class KVCache:
  """k, v: [batch, max_length, kv_heads, head_dim]; length: [batch] int32."""

  k: jax.Array
  v: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, batch_size, max_length, num_kv_heads, head_dim, dtype=jnp.float32):
    """An empty cache (zeros, length 0)."""
    check_positive_dims(
      "KVCache", batch_size=batch_size, max_length=max_length, num_kv_heads=num_kv_heads, head_dim=head_dim
    )
    shape = (batch_size, max_length, num_kv_heads, head_dim)
    return cls(k=jnp.zeros(shape, dtype), v=jnp.zeros(shape, dtype), length=jnp.zeros((batch_size,), jnp.int32))

  @property
  def max_length(self):
    return self.k.shape[1]

  def update(self, k, v, positions):
    """Write new keys/values at their absolute positions.

    Args:
      k, v: [batch, length, kv_heads, head_dim].
      positions: [batch, length] int, each in [0, max_length) (positions past the end are dropped by the scatter;
        keep them in range).

    Returns:
      the updated KVCache.
    """
    if k.shape != v.shape or k.shape[0] != self.k.shape[0] or k.shape[2:] != self.k.shape[2:]:
      raise ValueError(f"KVCache.update: k {k.shape} / v {v.shape} do not fit a cache of shape {self.k.shape}")
    (k, v), length = write_slots("KVCache", (self.k, self.v), (k, v), positions, self.length)
    return KVCache(k=k, v=v, length=length)

  def read(self):
    """Returns (k, v, key_positions [batch, max_length], key_valid [batch, max_length] bool)."""
    return self.k, self.v, *slot_positions(self.length, self.max_length)
