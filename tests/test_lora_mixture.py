"""Mixtures of LoRA experts in a model (`config.lora.experts`, `zoo.layers.lora`): sparse dispatch computes what the
masked dense one does (outputs and gradients) for every router; the routers' losses reach the model's aux_loss with
their coefficients; zero-initialised experts leave the base output unchanged; a run trains only the experts and the
routers; bad keys, a merge and a PEFT import of a mixture fail with one clear message."""

import dataclasses

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_engine import read_metrics, tiny_config
from test_lora import TOKENS, lora_config
from test_models_contract import TINY
from zoo.checkpoints import peft_adapters, save_orbax
from zoo.data import make_iterator
from zoo.engine import trainer
from zoo.engine.checkpoint import CheckpointError
from zoo.layers import lora
from zoo.models import ConfigError, build_model

TARGETS = (r"attention/(query|value)$", r"ffn/down$")


def _setup(router, dispatch="sparse", experts=4):
  model = build_model({"name": "dense_lm", **TINY["dense_lm"]})
  spec = lora.LoRASpec(
    r=2, alpha=4.0, experts=experts, router=router, top_k=2, dispatch=dispatch, target_modules=TARGETS
  )
  adapted = lora.with_lora(model, spec)
  params = nn.unbox(adapted.init(jax.random.key(0), TOKENS))["params"]
  return model, adapted, params


def _trained(params, seed=1):
  """`params` with random expert B's and a sharper router (trained-looking experts)."""
  keys = iter(jax.random.split(jax.random.key(seed), 256))

  def draw(path, x):
    name = path[-1].key
    if name == "lora_b":
      return 0.2 * jax.random.normal(next(keys), x.shape)
    if name == "lora_router":
      return 2.0 * jax.random.normal(next(keys), x.shape)
    return x

  return jax.tree_util.tree_map_with_path(draw, params)


@pytest.mark.parametrize("router", lora.ROUTERS)
def test_sparse_dispatch_equals_dense_masked_in_a_model(router):
  model, sparse, params = _setup(router, "sparse")
  _, dense, _ = _setup(router, "dense")
  base, _ = lora.split_adapters(params)
  # Zero-initialised B: the mixture starts as the base model.
  np.testing.assert_array_equal(sparse.apply({"params": params}, TOKENS)[0], model.apply({"params": base}, TOKENS)[0])
  params = _trained(params)
  out_s, info_s = sparse.apply({"params": params}, TOKENS)
  out_d, info_d = dense.apply({"params": params}, TOKENS)
  np.testing.assert_allclose(out_s, out_d, atol=2e-5)
  assert float(jnp.abs(out_s - model.apply({"params": base}, TOKENS)[0]).max()) > 1e-2  # the experts act
  np.testing.assert_allclose(info_s.aux_loss, info_d.aux_loss, rtol=1e-6)

  def loss(p, m):
    logits, info = m.apply({"params": p}, TOKENS)
    return jnp.mean(logits**2) + info.aux_loss

  _, adapters = lora.split_adapters(params)
  grad = lambda m: jax.grad(lambda a: loss({**params, **_merge_tree(params, a)}, m))(adapters)
  g_s, g_d = grad(sparse), grad(dense)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(g_s), jax.tree.leaves(g_d)):
    np.testing.assert_allclose(a, b, atol=3e-5, err_msg=jax.tree_util.keystr(path))
  assert any(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(g_s))


def _merge_tree(params, adapters):
  flat = traverse_util.flatten_dict(params)
  flat.update(traverse_util.flatten_dict(adapters))
  return traverse_util.unflatten_dict(flat)


def test_router_losses_reach_the_model_with_their_coefficients():
  # Same parameters, same routing: LoRA-Mixer's loss is plain top-k's plus 0.01 x the mean routing entropy.
  _, topk, params = _setup("topk")
  _, mixer, _ = _setup("lora_mixer")
  params = _trained(params)
  _, info_topk = topk.apply({"params": params}, TOKENS)
  _, info_mixer = mixer.apply({"params": params}, TOKENS)
  m = info_mixer.metrics
  np.testing.assert_allclose(info_topk.aux_loss, 0.01 * m["lora_load_balance"], rtol=1e-5)
  np.testing.assert_allclose(info_mixer.aux_loss, 0.01 * m["lora_load_balance"] + 0.01 * m["lora_entropy"], rtol=1e-5)
  assert float(m["lora_active_experts"]) == 2.0  # top-2
  # DynMoLE: 0.01 x Tsallis entropy + 0.001 x its load balance; between keep_top_k (2) and all 4 experts per token.
  _, dyn, _ = _setup("dynmole")
  _, info_dyn = dyn.apply({"params": params}, TOKENS)
  d = info_dyn.metrics
  np.testing.assert_allclose(info_dyn.aux_loss, 0.01 * d["lora_entropy"] + 0.001 * d["lora_load_balance"], rtol=1e-5)
  assert 2.0 <= float(d["lora_active_experts"]) <= 4.0


def test_a_mixture_run_trains_only_the_experts_and_routers(tmp_path):
  c = tiny_config(steps=20)
  c.lora.update(r=2, alpha=4.0, experts=4, router="dynmole", target_modules=(r"attention/(query|value)$",))
  c.optimizer.update(lr=1e-2, warmup_steps=0)
  c.train.update(log_every_steps=10, eval_every_steps=20, eval_batches=2)
  c.checkpoint.update(every_steps=0)
  c.sample.max_new_tokens = 0
  state = trainer.train(c, str(tmp_path), progress=False)
  trainable = traverse_util.flatten_dict(state.params)
  assert {p[-1] for p in trainable} == {"lora_a", "lora_b", "lora_router"}
  assert trainable[("layers_0", "attention", "query", "lora_a")].shape[0] == 4  # [experts, *in, r]
  records = [r for r in read_metrics(tmp_path) if "loss" in r]
  assert records[-1]["loss"] < records[0]["loss"]
  assert all(np.isfinite(r["lora_entropy"]) and 2 <= r["lora_active_experts"] <= 4 for r in records)


@pytest.mark.parametrize(
  "edit, message",
  [
    (dict(experts=1), "config.lora.experts=1"),
    (dict(experts=4, router="switch"), "config.lora.router='switch'"),
    (dict(experts=4, top_k=5), "config.lora.top_k=5"),
    (dict(experts=4, dispatch="all"), "config.lora.dispatch='all'"),
  ],
)
def test_bad_mixture_configs_fail_with_a_clear_message(edit, message):
  c = tiny_config()
  c.lora.update(r=2, **edit)
  with pytest.raises(ConfigError, match=message):
    trainer.Experiment(c)


def test_a_mixture_is_not_merged_or_read_from_one_peft_adapter(tmp_path):
  _, adapted, params = _setup("topk")
  with pytest.raises(ConfigError, match="cannot be merged"):
    lora.merge(params, adapted.lora)
  with pytest.raises(ConfigError, match="is a single PEFT adapter"):
    peft_adapters.load_for_model(str(tmp_path / "in"), adapted.lora, params, "hf:x")


def test_a_mixture_routes_over_frozen_separately_trained_adapters(tmp_path):
  # LoRA-Mixer's second regime: two single-adapter runs on one base become the experts; only the routers train.
  base = tmp_path / "base"
  c = lora_config(base, steps=3)
  c.lora.update(dropout=0.0)
  base_vars = nn.unbox(jax.jit(build_model(c.model).init)(jax.random.key(5), TOKENS))
  save_orbax(str(base), c.model, base_vars)
  experts = []
  for seed in (1, 2):
    c.seed = seed
    experts.append(trainer.train(c, str(tmp_path / f"expert_{seed}"), progress=False))
  m = lora_config(base, steps=3)
  m.lora.update(
    dropout=0.0,
    experts=2,
    router="topk",
    top_k=1,
    expert_adapters=tuple(str(tmp_path / f"expert_{s}") for s in (1, 2)),
    freeze_experts=True,
  )
  state = trainer.train(m, str(tmp_path / "mixture"), progress=False)
  assert {p[-1] for p in traverse_util.flatten_dict(state.params)} == {"lora_router"}
  frozen = traverse_util.flatten_dict(state.frozen)
  for e, expert in enumerate(experts):
    for path, value in traverse_util.flatten_dict(expert.params).items():
      np.testing.assert_array_equal(frozen[path][e], value)  # each expert is its run's adapter, unchanged
  # A run whose adapters sit on other layers, or a count that is not `experts`, is refused in one line.
  m.lora.update(expert_adapters=(str(tmp_path / "expert_1"),))
  with pytest.raises(ConfigError, match="names 1 runs but config.lora.experts=2"):
    trainer.Experiment(m)
  m.lora.update(expert_adapters=tuple(str(tmp_path / f"expert_{s}") for s in (1, 2)))
  m.lora.update(target_modules=(r"attention/(query|key|value)$",))
  with pytest.raises(CheckpointError, match="config.lora.expert_adapters=.*ffn.down.lora_a"):
    trainer.train(m, str(tmp_path / "mixture2"), progress=False)


def test_glider_global_bias_selects_the_experts_of_the_task():
  # Experts 0 and 1 have zero B (they add nothing), experts 2 and 3 random B. Task embeddings: experts 0 and 1 along
  # the query embeddings of TOKENS, 2 and 3 against them. With s=100 the bias puts every token on {0, 1} (the base
  # output); with s=0 the random local gates route some tokens to 2 and 3.
  model, adapted, params = _setup("glider", "dense")
  base, _ = lora.split_adapters(params)
  assert params[lora.TASK_EMBEDDINGS].shape == (4, TINY["dense_lm"]["embed_dim"])
  assert not adapted.trainable_params(params)[lora.TASK_EMBEDDINGS]
  params = _trained(params)
  query = lora.glider_query_embeddings(params["embed"]["embedding"], TOKENS).reshape(-1, TINY["dense_lm"]["embed_dim"])
  direction = jnp.mean(query / jnp.linalg.norm(query, axis=-1, keepdims=True), axis=0)
  params[lora.TASK_EMBEDDINGS] = jnp.stack([direction, direction, -direction, -direction])
  bias = lora.glider_bias(params, TOKENS)
  assert bool(jnp.all(bias[:, :2] > 0)) and bool(jnp.all(bias[:, 2:] < 0))

  def zero_first_two(path, x):
    return x.at[:2].set(0.0) if path[-1].key == "lora_b" else x

  params = jax.tree_util.tree_map_with_path(zero_first_two, params)
  expected = model.apply({"params": base}, TOKENS)[0]
  held_in = lora.with_lora(model, dataclasses.replace(adapted.lora, glider_scale=100.0))
  np.testing.assert_allclose(held_in.apply({"params": params}, TOKENS)[0], expected, atol=1e-6)
  local_only = lora.with_lora(model, dataclasses.replace(adapted.lora, glider_scale=0.0))
  assert float(jnp.max(jnp.abs(local_only.apply({"params": params}, TOKENS)[0] - expected))) > 1e-3


def test_glider_task_embeddings_come_from_each_expert_runs_data(tmp_path):
  base = tmp_path / "base"
  c = lora_config(base, steps=2)
  c.lora.update(dropout=0.0)
  save_orbax(str(base), c.model, nn.unbox(jax.jit(build_model(c.model).init)(jax.random.key(5), TOKENS)))
  runs = {}
  for domain in ("idlelib", "docs"):
    c.data.domains = (domain,)
    runs[domain] = str(tmp_path / domain)
    trainer.train(c, runs[domain], progress=False)
  m = lora_config(base, steps=2)
  m.lora.update(dropout=0.0, experts=2, router="glider", expert_adapters=tuple(runs.values()), freeze_experts=True)
  state = trainer.train(m, str(tmp_path / "glider"), progress=False)
  assert {p[-1] for p in traverse_util.flatten_dict(state.params)} == {"lora_router"}
  tasks = state.frozen[lora.TASK_EMBEDDINGS]
  table = state.frozen["embed"]["embedding"]
  for e, run in enumerate(runs.values()):
    data = trainer.read_config(run).data
    it = make_iterator(data, split="train", global_batch_size=m.train.batch_size, seed=0)
    expected = lora.glider_task_embeddings(table, [next(it)["inputs"] for _ in range(8)])
    np.testing.assert_allclose(tasks[e], expected, rtol=1e-5, atol=1e-6)
  assert float(jnp.max(jnp.abs(tasks[0] - tasks[1]))) > 1e-3  # code and English give different task embeddings
  # Without the expert runs the global bias has no task embeddings: refused in one line.
  m.lora.update(expert_adapters=())
  with pytest.raises(ConfigError, match="glider_scale > 0 needs config.lora.expert_adapters"):
    trainer.Experiment(m)
