"""A key/value cache for autoregressive decoding: one small pytree per attention layer.

Slot `s` of the cache holds the key/value of absolute position `s`, so the cache also serves sliding-window layers
(the window is applied by the attention mask; slots outside it are simply not attended). `length[b]` is one past the
largest position written in row `b`; slots at or past it are invalid.
"""
import flax.struct
import jax
import jax.numpy as jnp


@flax.struct.dataclass
class KVCache:
  """k, v: [batch, max_length, kv_heads, head_dim]; length: [batch] int32."""
  k: jax.Array
  v: jax.Array
  length: jax.Array

  @classmethod
  def create(cls, batch_size, max_length, num_kv_heads, head_dim, dtype=jnp.float32):
    """An empty cache (zeros, length 0)."""
    for name, value in (("batch_size", batch_size), ("max_length", max_length), ("num_kv_heads", num_kv_heads),
                        ("head_dim", head_dim)):
      if int(value) < 1:
        raise ValueError(f"KVCache.create: {name}={value} must be a positive integer")
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
    if positions.shape != k.shape[:2]:
      raise ValueError(f"KVCache.update: positions {positions.shape} must be [batch, length] = {k.shape[:2]}")
    if k.shape[1] > self.max_length:
      raise ValueError(f"KVCache.update: {k.shape[1]} new tokens do not fit max_length={self.max_length}")
    rows = jnp.arange(k.shape[0])[:, None]
    return KVCache(k=self.k.at[rows, positions].set(k.astype(self.k.dtype), mode="drop"),
                   v=self.v.at[rows, positions].set(v.astype(self.v.dtype), mode="drop"),
                   length=jnp.maximum(self.length, jnp.max(positions, axis=1).astype(jnp.int32) + 1))

  def read(self):
    """Returns (k, v, key_positions [batch, max_length], key_valid [batch, max_length] bool)."""
    slots = jnp.broadcast_to(jnp.arange(self.max_length, dtype=jnp.int32), (self.k.shape[0], self.max_length))
    return self.k, self.v, slots, slots < self.length[:, None]
