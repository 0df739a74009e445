"""The pool of models for the routers between models (`zoo.routing.model_pool`): loading runs, the pool's errors,
measured and analytic costs, corpus queries and per-query scores, on two tiny randomly initialised LMs."""

import json
import os
import types

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_engine import tiny_config
from tools import route_models
from zoo.engine import runs
from zoo.engine.checkpoint import Checkpointer
from zoo.models import ConfigError, build_model
from zoo.routing import model_pool

SHAPES = {
  "tiny_a": dict(num_layers=1, embed_dim=16, mlp_dim=32),
  "tiny_b": dict(num_layers=2, embed_dim=32, mlp_dim=64),
}


def member_config(name, **model):
  config = tiny_config()
  config.model.update(num_heads=2, num_kv_heads=1, **SHAPES[name], **model)
  return config


def write_run(workdir, config, checkpoint=True):
  workdir.mkdir(parents=True, exist_ok=True)
  if checkpoint:  # random parameters as step 1 (the pool reads only the parameters)
    model, rng = build_model(config.model), np.random.default_rng(len(str(workdir)))
    shapes = jax.eval_shape(lambda: model.init(jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"])
    params = jax.tree.map(lambda s: rng.normal(0.0, 0.3, s.shape).astype(s.dtype), nn.meta.unbox(shapes))
    ckpt = Checkpointer(str(workdir / "checkpoints"), use_async=False)
    ckpt.save(1, types.SimpleNamespace(step=1, params=params, opt_state={}, collections={}, frozen=None), {"n": 0})
    ckpt.close()
  with open(workdir / "config.json", "w") as f:  # what train.py writes (`MetricsWriter.write_config`)
    f.write(config.to_json_best_effort())
  return str(workdir)


@pytest.fixture(scope="module")
def pool_dirs(tmp_path_factory):
  root = tmp_path_factory.mktemp("pool")
  # Listed large first: the pool sorts its members by forward FLOPs per token.
  return [f"{n}={write_run(root / n, member_config(n))}" for n in ("tiny_b", "tiny_a")]


@pytest.fixture(scope="module")
def pool(pool_dirs):
  return runs.load_pool(pool_dirs)


def test_load_pool_sorts_by_flops_and_restores_the_checkpoints(pool):
  assert pool.names == ("tiny_a", "tiny_b") and pool.vocab_size == 259 and pool.tokenizer == "bytes"
  a, b = pool.members
  assert a.step == 1 and a.num_params == a.model.num_params() and b.num_params == b.model.num_params()
  assert a.forward_flops_per_token(16) == pytest.approx(a.model.train_flops_per_token(16) / 3)
  assert a.forward_flops_per_token(16) < b.forward_flops_per_token(16)
  assert pool.member("tiny_b") is b
  with pytest.raises(ConfigError, match="'huge' is not in the pool; allowed: tiny_a, tiny_b"):
    pool.member("huge")


def test_pool_errors(tmp_path, pool_dirs):
  with pytest.raises(ConfigError, match="no such run directory"):
    runs.load_pool([pool_dirs[0], f"x={tmp_path / 'missing'}"])
  empty = write_run(tmp_path / "empty", member_config("tiny_a"), checkpoint=False)
  with pytest.raises(ConfigError, match="pool member 'empty': no checkpoint in"):
    runs.load_pool([pool_dirs[0], empty])
  other = write_run(tmp_path / "other", member_config("tiny_a", vocab_size=300), checkpoint=False)
  with pytest.raises(ConfigError, match="must share one tokenizer and vocabulary.*vocab 300"):
    runs.load_pool([pool_dirs[0], other])
  with pytest.raises(ConfigError, match="at least two members"):
    runs.load_pool(pool_dirs[:1])
  with pytest.raises(ConfigError, match="occur twice"):
    model_pool.parse_pool("a=x,a=y")
  assert model_pool.parse_pool("workdirs/pool_small,big=w/l") == [("small", "workdirs/pool_small"), ("big", "w/l")]


def test_costs_queries_scores_and_routing_data(pool):
  tokens, category, names = model_pool.corpus_queries(
    pool.members[0].config.data, prompt_len=6, continuation_len=4, max_queries=12, seed=0
  )
  assert tokens.shape == (12, 10) and category.shape == (12,) and set(category) <= set(range(len(names)))
  assert tokens.min() >= 0 and tokens.max() < 259 and not np.any(tokens == 256)  # byte ids, never padding
  costs = model_pool.measure_costs(pool, tokens[:4], repeats=2)
  for m in pool.members:
    c = costs[m.name]
    assert len(c.timings) == 2 and c.seconds_per_token == pytest.approx(np.median(c.timings) / 40)
    assert c.tokens_per_second == pytest.approx(1 / c.seconds_per_token) and c.params == m.num_params
  scores = model_pool.score_queries(pool, tokens, prompt_len=6, batch_size=8)  # 12 queries: one padded batch
  assert scores["accuracy"].shape == scores["neg_loss"].shape == scores["confidence"].shape == (12, 2)
  assert scores["features"].shape == (12, 16 + 2)  # the cheapest member's width + prompt confidence + prompt loss
  assert np.all((scores["accuracy"] >= 0) & (scores["accuracy"] <= 1)) and np.all(scores["neg_loss"] < 0)
  assert np.all((scores["confidence"] > 0) & (scores["confidence"] <= 1))
  # A query's scores do not depend on its batch: scoring the first 4 alone gives the same numbers.
  alone = model_pool.score_queries(pool, tokens[:4], prompt_len=6, batch_size=4)
  np.testing.assert_allclose(alone["neg_loss"], scores["neg_loss"][:4], rtol=1e-5)
  data = model_pool.routing_data(pool, costs, scores, category, names, prompt_len=6, query_len=10, unit="flops")
  seconds = [costs[n].seconds_per_token for n in data.members]  # columns in increasing measured cost
  assert seconds == sorted(seconds) and np.allclose(data.cost, [costs[n].flops_per_token * 10 for n in data.members])
  assert np.allclose(data.feature_cost, costs["tiny_a"].flops_per_token * 6)
  with pytest.raises(ConfigError, match="quality='bleu'"):
    model_pool.routing_data(pool, costs, scores, category, names, prompt_len=6, query_len=10, quality="bleu")


def test_split_queries_partitions():
  train, val, test = model_pool.split_queries(20, (0.5, 0.25, 0.25), seed=1)
  assert (len(train), len(val), len(test)) == (10, 5, 5)
  assert sorted(np.concatenate([train, val, test]).tolist()) == list(range(20))
  with pytest.raises(ConfigError, match="cannot fill"):
    model_pool.split_queries(2)


def test_route_models_tool(pool_dirs, tmp_path, capsys):
  out = str(tmp_path / "routes")
  argv = ["--pool", ",".join(pool_dirs), "--out", out, "--queries", "40", "--prompt_len", "8"]
  argv += ["--continuation_len", "8", "--batch_size", "8", "--repeats", "1", "--budgets", "0.5,0.9,1.2", "--quality"]
  argv += ["neg_loss"]  # the random members tie on accuracy
  route_models.main(argv)
  printed = capsys.readouterr().out
  assert "| router | family | timing | APGR | CPT(50%) | CPT(80%) | AIQ |" in printed and "cost_quality.png" in printed
  with open(os.path.join(out, "results.json")) as f:
    results = json.load(f)
  assert list(results["routers"]) == list(route_models.DEFAULT_ROUTERS)
  assert results["queries"] == {"total": 40, "train": 20, "validation": 10, "test": 10}
  best = max(np.asarray(r["curve"])[:, 2].max() for r in results["routers"].values())
  assert np.asarray(results["routers"]["oracle"]["curve"])[:, 2].max() == pytest.approx(best)  # nobody beats it
  assert os.path.getsize(os.path.join(out, "cost_quality.png")) > 0
  with pytest.raises(SystemExit) as stop:
    route_models.main(argv)  # the results are not overwritten without --overwrite
  assert stop.value.code == 2 and "already holds results.json" in capsys.readouterr().err
  with pytest.raises(SystemExit) as stop:
    route_models.main(argv[:4] + ["--budgets", "-1"])
  assert stop.value.code == 2 and "--budgets='-1'" in capsys.readouterr().err
