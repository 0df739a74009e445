"""The engine's model hooks and exact evaluation: every test example scored once, frozen parameters
(`trainable_params`), init_from restoring non-param collections, routing consistency and depth plots in evaluate.
Fine-tuning from a Hugging Face directory is in test_engine_hf.py."""

import json

import jax
import jax.numpy as jnp
import numpy as np

from configs.moe_mixtral import get_config as get_moe_config
from configs.mor_vanilla import mor_model
from configs.simplenet_digits import get_config as get_digits_config
from test_engine import tiny_config
from zoo.data import builders, make_iterator
from zoo.engine import trainer
from zoo.engine.checkpoint import Checkpointer
from zoo.models.dense_lm import DenseLM

SMALL_LM = dict(vocab_size=259, num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, head_dim=8, mlp_dim=32)


def save_init_checkpoint(config, workdir, edit=lambda state: state):
  """Save the (edited) initial state of `config` as checkpoint step 1 of `workdir`, without training."""
  exp = trainer.Experiment(config)
  state = edit(exp.init_state()[0])
  ckpt = Checkpointer(str(workdir / "checkpoints"), use_async=False)
  ckpt.save(1, state, {"unused": 0})
  ckpt.close()
  return exp, state


def test_eval_scores_every_test_example_exactly_once():
  c = get_digits_config()
  c.model.update(widths=(4,) * 13, num_pools=0, dropout_rate=0.0)
  c.train.batch_size = 32
  test_size = builders.prepare("digits", c.data.data_dir).info.splits["test"].num_examples
  assert test_size % 32  # the last batch is short
  labels = np.concatenate(
    [
      b["label"]
      for b in make_iterator(c.data, split="test", global_batch_size=32, seed=0, repeat=False, drop_remainder=False)
    ]
  )
  dropped = np.concatenate(
    [b["label"] for b in make_iterator(c.data, split="test", global_batch_size=32, seed=0, repeat=False)]
  )
  assert len(labels) == test_size and len(dropped) == test_size // 32 * 32
  np.testing.assert_array_equal(labels[: len(dropped)], dropped)

  exp = trainer.Experiment(c)
  state, shardings = exp.init_state()
  eval_step = exp.make_eval_step(shardings, exp.dummy)
  seen = []

  def counting(state, batch):
    stats, metrics = eval_step(state, batch)
    seen.append(float(stats["weight"]))
    return stats, metrics

  result = exp.run_eval(state, counting)
  assert sum(seen) == test_size and len(seen) == -(-test_size // 32)
  assert 0 <= result["accuracy"] <= 1


def test_frozen_params_are_not_updated_not_even_by_weight_decay(tmp_path, monkeypatch):
  def trainable_params(self, params):  # everything but the first layer
    return jax.tree_util.tree_map_with_path(lambda path, _: "layers_0" not in jax.tree_util.keystr(path), params)

  monkeypatch.setattr(DenseLM, "trainable_params", trainable_params, raising=False)
  c = tiny_config(steps=1)
  c.model.num_layers = 2
  c.optimizer.update(weight_decay=0.5, warmup_steps=0)
  c.train.eval_batches = 1
  exp = trainer.Experiment(c)
  before, _ = exp.init_state()
  before = jax.device_get(before.variables()["params"])
  after = jax.device_get(trainer.train(c, str(tmp_path), progress=False).variables()["params"])
  assert "layers_0" in before and "layers_1" in before
  for name in before:
    for x, y in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
      if name == "layers_0":
        np.testing.assert_array_equal(x, y)
      else:
        assert not np.array_equal(x, y), name


def test_init_from_restores_the_non_param_collections(tmp_path):
  c = get_digits_config()
  c.model.update(widths=(4,) * 13, num_pools=0, dropout_rate=0.0)
  exp, saved = save_init_checkpoint(
    c, tmp_path / "a", lambda s: s.replace(collections=jax.tree.map(lambda x: x + 1.5, s.collections))
  )
  assert jax.tree.leaves(saved.collections)  # batch_stats
  c.init_from = str(tmp_path / "a")
  exp = trainer.Experiment(c)
  fresh = saved.replace(
    params=jax.tree.map(jnp.zeros_like, saved.params), collections=jax.tree.map(jnp.zeros_like, saved.collections)
  )
  loaded = exp.with_init_from(fresh, exp.abstract_state()[1], exp.load_init_from())
  for x, y in zip(jax.tree.leaves(loaded.variables()), jax.tree.leaves(saved.variables())):
    np.testing.assert_array_equal(x, y)


def moe_config():
  c = tiny_config()
  moe = get_moe_config().model
  moe.update(SMALL_LM, num_experts=4, num_experts_per_tok=2, expert_mlp_dim=16)
  c.model = moe
  c.data.seq_len = 32
  c.sample.max_new_tokens = 0
  return c


def test_evaluate_reports_routing_consistency_and_expert_load(tmp_path):
  c = moe_config()
  save_init_checkpoint(c, tmp_path)
  step, results, _ = trainer.evaluate(c, str(tmp_path))
  assert step == 1
  assert sorted(k for k in results if k.startswith("srp_")) == ["srp_L16", "srp_L4"]  # L <= seq_len 32
  assert sorted(k for k in results if k.startswith("sch_")) == ["sch_L16_C2", "sch_L16_C4", "sch_L4_C2", "sch_L4_C4"]
  for key in ("srp_L4", "srp_L16", "sch_L4_C2", "sch_L16_C4"):
    assert 0 < results[key] <= 1, (key, results[key])
  assert results["sch_L4_C4"] == 1.0  # a cache of all 4 experts: every first use finds room (the authors' count)
  assert results["sch_L4_C4"] >= results["sch_L4_C2"]
  assert 0 < results["layer_mean_srp_L4"] <= 1 and 0 < results["layer_mean_sch_L16_C2"] <= 1
  assert "expert_ids" not in results
  for key in ("routing_consistency_plot", "expert_load_plot"):
    assert (tmp_path / f"{key[:-5]}_1.png").stat().st_size > 0
  assert json.load(open(tmp_path / "eval_1.json"))["srp_L4"] == results["srp_L4"]


def test_evaluate_plots_the_recursion_depth_of_mor(tmp_path):
  c = tiny_config()
  c.model = type(c.model)({**mor_model(2, "token"), **SMALL_LM, "num_layers": 4})
  c.sample.max_new_tokens = 0
  save_init_checkpoint(c, tmp_path)
  _, results, _ = trainer.evaluate(c, str(tmp_path))
  assert results["depth_per_token_plot"] == str(tmp_path / "depth_per_token_1.png")
  assert (tmp_path / "depth_per_token_1.png").stat().st_size > 0
  assert not any(k.startswith("srp_") for k in results)
