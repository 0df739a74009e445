"""Autoregressive decoding with the model's KV cache: one prefill call, then one jitted call per new token.

Uses the LM contract of `zoo.models`: `init_cache(batch_size, max_length)` (called with `method="init_cache"`) and
`__call__(tokens, positions=..., cache=...)` returning the updated cache in `ModelOutput.cache`.
"""

import functools

import jax
import jax.numpy as jnp


def sample_logits(logits, rng, *, temperature=0.0, top_k=0):
  """Pick the next token.

  Args:
    logits: [batch, vocab].
    rng: a PRNG key (unused when greedy).
    temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
    top_k: > 0 keeps only the k largest logits; 0 keeps all.

  Returns:
    tokens: [batch] int32.
  """
  logits = logits.astype(jnp.float32)
  if temperature == 0.0:
    return jnp.argmax(logits, axis=-1).astype(jnp.int32)
  logits = logits / temperature
  if top_k > 0:
    kth = jax.lax.top_k(logits, top_k)[0][:, -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1).astype(jnp.int32)


def generate(model, variables, prompt, *, max_new_tokens, rng=None, temperature=0.0, top_k=0, eos_id=None):
  """Continue `prompt` by `max_new_tokens` tokens.

  Args:
    model: an LM-task Linen module (see CONTRIBUTING.md).
    variables: its variables (`params` plus any other collections).
    prompt: [batch, prompt_len] int32, every row the same length.
    max_new_tokens: how many tokens to add.
    rng: PRNG key for sampling (default key(0)).
    temperature, top_k: see `sample_logits`.
    eos_id: when given, rows that produced it keep producing it (the loop still runs to the end).

  Returns:
    tokens: [batch, prompt_len + max_new_tokens] int32.
  """
  prompt = jnp.asarray(prompt, jnp.int32)
  batch, prompt_len = prompt.shape
  if max_new_tokens <= 0:
    return prompt
  rng = jax.random.key(0) if rng is None else rng
  cache = model.apply(variables, batch, prompt_len + max_new_tokens, method="init_cache")
  positions = jnp.broadcast_to(jnp.arange(prompt_len, dtype=jnp.int32), (batch, prompt_len))
  logits, cache = _prefill(model, variables, prompt, positions, cache)
  sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
  token = sample(logits, jax.random.fold_in(rng, 0))
  done = jnp.zeros((batch,), bool)
  out = [token]
  for i in range(1, max_new_tokens):
    if eos_id is not None:
      done = done | (token == eos_id)
    position = jnp.full((batch, 1), prompt_len + i - 1, jnp.int32)
    logits, cache = _decode(model, variables, token[:, None], position, cache)
    token = sample(logits, jax.random.fold_in(rng, i))
    if eos_id is not None:
      token = jnp.where(done, eos_id, token)
    out.append(token)
  return jnp.concatenate([prompt, jnp.stack(out, axis=1)], axis=1)


@functools.partial(jax.jit, static_argnums=0)
def _prefill(model, variables, tokens, positions, cache):
  logits, out = model.apply(variables, tokens, positions=positions, cache=cache)
  return logits[:, -1], out.cache


@functools.partial(jax.jit, static_argnums=0)
def _decode(model, variables, token, position, cache):
  logits, out = model.apply(variables, token, positions=position, cache=cache)
  return logits[:, -1], out.cache
