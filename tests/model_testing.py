"""Helpers of the model tests: tiny MoE language-model sizes and a model initialised on a few tokens."""

import jax
import jax.numpy as jnp
import pytest

from zoo.models import build_model

# Sizes of a tiny MoE language model; a test adds its model's name and fields.
TINY_MOE = dict(
  vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, mlp_dim=32, num_experts=4, expert_mlp_dim=8, dispatch="dense"
)


def init_tiny(config, batch=2, length=8):
  """(model, tokens [batch, length] from key 0, variables from key 1) of build_model(config)."""
  model = build_model(config)
  tokens = jax.random.randint(jax.random.key(0), (batch, length), 0, config["vocab_size"])
  return model, tokens, jax.jit(model.init)(jax.random.key(1), tokens)


def decode_stepwise(model, variables, tokens):
  """Logits [batch, length, vocab] of decoding `tokens` [batch, length] one token at a time with the model's cache."""
  batch, length = tokens.shape
  cache = model.apply(variables, batch, length, method="init_cache")
  decode = jax.jit(lambda token, cache: model.apply(variables, token, cache=cache))
  steps = []
  for t in range(length):
    logits, out = decode(tokens[:, t : t + 1], cache)
    cache = out.cache
    steps.append(logits)
  return jnp.concatenate(steps, axis=1)


def tiny_fixture(config):
  """A module-scoped pytest fixture `tiny`: init_tiny(config), i.e. (model, tokens [2, 8], variables)."""

  @pytest.fixture(scope="module")
  def tiny():
    return init_tiny(config)

  return tiny
