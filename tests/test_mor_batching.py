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


def _one_at_a_time(model, variables, prompts, eos_id=None):
  """Each request decoded alone with the model's cached decoding (requests of equal shape share a call)."""
  out = [None] * len(prompts)
  for shape in sorted(set(zip(PROMPT_LENGTHS, NEW_TOKENS))):
    idx = [i for i, s in enumerate(zip(PROMPT_LENGTHS, NEW_TOKENS)) if s == shape]
    tokens = generate(model, variables, jnp.stack([prompts[i] for i in idx]), max_new_tokens=shape[1], eos_id=eos_id)
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
  # The first token of a request is sampled in its prefill call, which also runs its prelude: boundary steps (the
  # coda) ran only on tokens that left the recursion, one per later token.
  assert stats.jobs["boundary"] == sum(NEW_TOKENS) - len(prompts)
  if config["kv_mode"] == "share":  # some block steps had no job at depth 0 and projected no keys/values
    assert 0 < stats.read_only_block_steps < stats.steps["block"]
  else:
    assert stats.read_only_block_steps == 0
  assert stats.prompt_tokens == sum(PROMPT_LENGTHS) and stats.generated_tokens == sum(NEW_TOKENS)
  assert stats.prefill_seconds > 0 and stats.decode_seconds > 0
  # Tokens left the recursion at different depths, and block steps ran jobs of different depths together.
  assert (stats.depth_counts[1:-1] > 0).any() and stats.depth_counts[-1] > 0
  assert stats.mixed_depth_steps > 0
  assert stats.occupancy.shape == (sum(stats.steps.values()), 4)


def _eos_candidate(outputs):
  """A token that one request samples first and another in the middle of its output: as EOS it ends a sequence at
  its prefill call and another at a boundary step."""
  for out in outputs:
    if any(out[0] in o[1:-1] and o[0] != out[0] for o in outputs):
      return int(out[0])
  raise AssertionError(f"no token of {outputs} is both a first token and a middle one")


@pytest.mark.parametrize(
  "config",
  [dict(router="expert", kv_mode="recursion"), dict(router="token", kv_mode="share")],
  ids=lambda c: c["router"],
)
def test_engine_stops_at_eos_where_generate_pads(config):
  model = build_model(dict(name="mor", num_layers=5, num_recursions=3, sharing="middle_cycle", **SHAPE, **config))
  variables = _variables(model)
  prompts = _requests()
  eos = _eos_candidate(_one_at_a_time(model, variables, prompts))
  engine = DepthBatchingEngine(model, variables, batch_size=2, num_slots=3, max_length=12, eos_id=eos)
  outputs, stats = engine.run(prompts, list(NEW_TOKENS))
  # generate keeps every row to its full length, padding a finished one with EOS: equal up to and including the EOS.
  expected = _one_at_a_time(model, variables, prompts, eos_id=eos)
  stops = []
  for i, (got, want) in enumerate(zip(outputs, expected)):
    hits = np.flatnonzero(want == eos)
    end = hits[0] + 1 if len(hits) else len(want)
    np.testing.assert_array_equal(got, want[:end], err_msg=f"request {i}")
    stops.append(end if end < len(want) else None)
  assert 1 in stops and any(s is not None and s > 1 for s in stops), stops  # at a prefill and at a boundary
  assert stats.admissions == len(prompts) and stats.slot_reuses == len(prompts) - 3
  assert stats.generated_tokens == sum(len(o) for o in outputs) < sum(NEW_TOKENS)


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


def test_depth_batching_evaluator_through_evaluate(tmp_path):
  # evaluate.py's path: trainer.evaluate on a checkpoint, config.evals naming the evaluator (small options).
  from configs.mor_vanilla import mor_model
  from test_engine import tiny_config
  from test_engine_eval import SMALL_LM, save_init_checkpoint
  from zoo.engine import trainer

  c = tiny_config()
  c.depth_batching.update(requests=6, new_tokens=4, batch_size=2, num_slots=3, prompt_min=2, prompt_max=8)
  c.model = type(c.model)({**mor_model(2, "expert"), **SMALL_LM, "num_layers": 4})
  c.evals = ("depth_batching",)
  save_init_checkpoint(c, tmp_path)
  _, results, _ = trainer.evaluate(c, str(tmp_path))
  r = {k.removeprefix("depth_batching_"): v for k, v in results.items() if k.startswith("depth_batching_")}
  assert r["requests_served"] == 6 and r["generated_tokens"] == 6 * 4
  assert r["slot_reuses"] == 6 - 3  # every admission after the first 3 refills a freed slot
  # The engine steps decode all tokens but each request's first (sampled by its prefill), by recursions run (0..N_r).
  assert sum(r["tokens_per_depth"]) == 6 * (4 - 1) and len(r["tokens_per_depth"]) == 3
  assert r["tokens_per_s"] > 0 and r["prefill_tokens_per_s"] > 0 and r["decode_tokens_per_s"] > 0
  assert 0 < r["block_fill"] <= 1 and 0 < r["boundary_fill"] <= 1
  assert r["plot"] == str(tmp_path / "depth_batching_occupancy_1.png")
  assert (tmp_path / "depth_batching_occupancy_1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
  assert "sample" not in results  # only the evaluators config.evals names


def test_depth_batching_options_and_refusals():
  import ml_collections

  from zoo.evaluators import get_evaluator
  from zoo.evaluators.depth_batching import DEFAULTS, options
  from zoo.models import ConfigError

  config = ml_collections.ConfigDict({"depth_batching": {"requests": 4, "batch_size": 2}})
  assert options(config) == {**DEFAULTS, "requests": 4, "batch_size": 2}
  assert options(ml_collections.ConfigDict()) == DEFAULTS
  for bad, match in (
    ({"request": 4}, "unknown key config.depth_batching.request"),
    ({"new_tokens": 0}, r"new_tokens=0 is invalid; allowed: >= 1"),
    ({"prompt_min": 9, "prompt_max": 8}, "prompt_max=8 is invalid"),
  ):
    with pytest.raises(ConfigError, match=match):
      options(ml_collections.ConfigDict({"depth_batching": bad}))
  cls = get_evaluator("depth_batching")
  sequence = build_model(dict(name="mor", num_layers=6, num_recursions=3, sharing="sequence", router="token", **SHAPE))
  assert "cycle" in cls.unmet(sequence, "lm")
  assert cls.unmet(build_model(dict(name="dense_lm", num_layers=2, **SHAPE)), "lm") is None
  assert "tasks" in cls.unmet(build_model(dict(name="dense_lm", num_layers=2, **SHAPE)), "classification")
