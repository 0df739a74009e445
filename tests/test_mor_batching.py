"""Continuous depth-wise batching (zoo/engine/mor_batching.py): greedy outputs equal one-at-a-time decoding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.engine.generate import generate
from zoo.engine.mor_batching import DepthBatchingEngine
from zoo.models import build_model

SHAPE = dict(vocab_size=64, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=64)
# Mixed prompt lengths and new-token counts; more requests than slots, so slots are refilled.
PROMPT_LENGTHS = (2, 5, 5, 2, 5, 2)
NEW_TOKENS = (5, 3, 3, 5, 3, 5)


def _requests():
  rng = np.random.default_rng(0)
  return [rng.integers(3, SHAPE["vocab_size"], size=n).astype(np.int32) for n in PROMPT_LENGTHS]


def _variables(model):
  variables = nn.meta.unbox(model.init(jax.random.key(1), jnp.zeros((1, 4), jnp.int32)))
  params = dict(variables["params"])
  for name in [n for n in params if n.startswith("step_routers_")]:
    # Decisive expert-choice routers: decision logits far from 0, so some tokens exit early and none sits on the edge.
    params[name] = jax.tree.map(lambda w: 30.0 * w, params[name])
  return {**variables, "params": params}


def _one_at_a_time(model, variables, prompts):
  """Each request decoded alone with the model's cached decoding (requests of equal shape share a call)."""
  out = [None] * len(prompts)
  for shape in sorted(set(zip(PROMPT_LENGTHS, NEW_TOKENS))):
    idx = [i for i, s in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS)) if s == shape]
    tokens = generate(model, variables, jnp.stack([prompts[i] for i in idx]), max_new_tokens=shape[1])
    for row, i in enumerate(idx):
      out[i] = np.asarray(tokens[row, shape[0] :])
  return out


@pytest.mark.parametrize(
  "config",
  [
    dict(router="expert", kv_mode="recursion"),
    dict(router="expert", kv_mode="share"),
    dict(router="token", kv_mode="recursion"),
    dict(router="token", kv_mode="share"),
  ],
  ids=lambda c: f"{c['router']}-{c['kv_mode']}",
)
def test_engine_equals_one_at_a_time_decoding(config):
  model = build_model(dict(name="mor", num_layers=5, num_recursions=3, sharing="middle_cycle", **SHAPE, **config))
  variables = _variables(model)
  prompts = _requests()
  engine = DepthBatchingEngine(model, variables, batch_size=2, num_slots=3, max_length=12)
  outputs, stats = engine.run(prompts, list(NEW_TOKENS))
  expected = _one_at_a_time(model, variables, prompts)
  for i, (got, want) in enumerate(zip(outputs, expected)):
    np.testing.assert_array_equal(got, want, err_msg=f"request {i}")
  # No request lost or duplicated: each admitted once and given exactly its tokens.
  assert stats.admissions == len(prompts)
  assert [len(o) for o in outputs] == list(NEW_TOKENS)
  # 6 requests through 3 slots: every admission after the first 3 refills a freed slot.
  assert stats.slot_reuses == len(prompts) - 3
  # Tokens left the recursion at different depths, and block steps ran jobs of different depths together.
  assert (stats.depth_counts[1:-1] > 0).any() and stats.depth_counts[-1] > 0
  assert stats.mixed_depth_steps > 0
  assert stats.occupancy.shape == (sum(stats.steps.values()), 4)


def test_engine_serves_the_dense_baseline():
  model = build_model(dict(name="dense_lm", num_layers=3, **SHAPE))
  variables = _variables(model)
  prompts = _requests()
  outputs, stats = DepthBatchingEngine(model, variables, batch_size=2, num_slots=3, max_length=12).run(
    prompts, list(NEW_TOKENS)
  )
  for got, want in zip(outputs, _one_at_a_time(model, variables, prompts)):
    np.testing.assert_array_equal(got, want)
  assert stats.slot_reuses == len(prompts) - 3
  assert stats.depth_counts.tolist() == [0, sum(NEW_TOKENS) - len(prompts)]


def test_engine_refuses_sharing_that_differs_by_depth():
  model = build_model(dict(name="mor", num_layers=6, num_recursions=3, sharing="sequence", router="token", **SHAPE))
  with pytest.raises(ValueError, match="cycle"):
    DepthBatchingEngine(model, {}, batch_size=2, max_length=8)
