"""LoRA adapters (`zoo.layers.lora`): they attach to every decoder LM, a zero-initialised B leaves the output
unchanged, the merged model computes what the adapted one does (and unmerging restores the base), a run with
`config.lora` from a base checkpoint trains only the adapters (the base is frozen: no gradients, no optimizer state,
its checkpoint untouched), and bad targets fail with one clear message. PEFT interop is in test_lora_peft.py."""

import hashlib
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_engine import tiny_config
from test_models_contract import TINY
from zoo.checkpoints import save_orbax
from zoo.engine import trainer
from zoo.layers import lora
from zoo.models import ConfigError, build_model, get_model_class

TOKENS = jax.random.randint(jax.random.key(0), (2, 8), 0, 32)
# Every decoder LM of the contract test: the models that decode with a KV cache.
DECODERS = sorted(n for n in TINY if hasattr(get_model_class(n), "init_cache"))


def _random_b(params, seed=1):
  """`params` with every lora_b drawn at random (a trained adapter)."""
  keys = iter(jax.random.split(jax.random.key(seed), 64))
  return jax.tree_util.tree_map_with_path(
    lambda path, x: 0.1 * jax.random.normal(next(keys), x.shape) if path[-1].key == "lora_b" else x, params
  )


def test_adapters_attach_to_the_attention_of_every_decoder_lm():
  for name in DECODERS:
    model = build_model({"name": name, **TINY[name]})
    adapted = lora.with_lora(model, lora.LoRASpec(r=2))
    assert type(adapted).exposes == type(model).exposes
    variables = jax.eval_shape(adapted.init, jax.random.key(0), TOKENS)
    modules = lora.check_targets(adapted.lora, variables["params"])
    assert modules and all(m.split("/")[-1] in ("query", "key", "value", "out") for m in modules), (name, modules)
    kernels = {m + "/kernel" for m in modules}  # the adapted layers keep their parameter paths
    assert kernels <= {"/".join(p) for p in traverse_util.flatten_dict(nn.unbox(variables["params"]))}


def test_merged_forward_equals_adapted_forward_and_unmerge_restores_the_base():
  model = build_model({"name": "dense_lm", **TINY["dense_lm"]})
  spec = lora.LoRASpec(r=4, alpha=8.0, target_modules=(r"attention/(query|value|out)$", r"ffn/(up|down)$"))
  adapted = lora.with_lora(model, spec)
  initial = nn.unbox(adapted.init(jax.random.key(0), TOKENS))["params"]
  base, _ = lora.split_adapters(initial)
  np.testing.assert_array_equal(adapted.apply({"params": initial}, TOKENS)[0], model.apply({"params": base}, TOKENS)[0])
  params = _random_b(initial)  # B = 0 above: the adapted model starts as the base
  _, adapters = lora.split_adapters(params)
  out = adapted.apply({"params": params}, TOKENS)[0]
  merged = lora.merge(params, spec)
  assert "lora_a" not in merged["layers_0"]["attention"]["query"]
  np.testing.assert_allclose(model.apply({"params": merged}, TOKENS)[0], out, atol=2e-5)
  assert float(jnp.abs(out - model.apply({"params": base}, TOKENS)[0]).max()) > 1e-2  # the adapters do something
  restored = lora.unmerge(merged, adapters, spec)
  for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(params)):
    np.testing.assert_allclose(x, y, atol=1e-6)
  # Dropout on the adapters' input is drawn only while training.
  noisy = lora.with_lora(model, lora.LoRASpec(r=4, alpha=8.0, dropout=0.5, target_modules=spec.target_modules))
  np.testing.assert_array_equal(noisy.apply({"params": params}, TOKENS)[0], out)
  trained = noisy.apply({"params": params}, TOKENS, deterministic=False, rngs={"dropout": jax.random.key(3)})[0]
  assert float(jnp.abs(trained - out).max()) > 1e-3


def test_lora_on_the_stacked_expert_weights_of_a_moe():
  # One adapter per expert on MoEFFN's [E, in, out] weights, added to the weight: every dispatch path runs it, it
  # merges into the weight, and only the adapters train.
  model = build_model({"name": "moe_lm", **TINY["moe_lm"], "dispatch": "dropless"})
  spec = lora.LoRASpec(r=2, alpha=4.0, target_modules=(r"attention/query$", r"ffn/(gate|up|down)$"))
  adapted = lora.with_lora(model, spec)
  initial = nn.unbox(adapted.init(jax.random.key(0), TOKENS))["params"]
  modules = lora.check_targets(spec, initial)
  assert "layers_1/ffn/up_lora" in modules and "layers_1/attention/query" in modules
  assert initial["layers_1"]["ffn"]["up_lora"]["lora_a"].shape == (4, 16, 2)  # [E, in, r]
  assert initial["layers_1"]["ffn"]["down_lora"]["lora_b"].shape == (4, 2, 16)  # [E, r, out]
  base, _ = lora.split_adapters(initial)
  expected = model.apply({"params": base}, TOKENS)[0]
  np.testing.assert_array_equal(adapted.apply({"params": initial}, TOKENS)[0], expected)
  params = _random_b(initial)
  out = adapted.apply({"params": params}, TOKENS)[0]
  assert float(jnp.abs(out - expected).max()) > 1e-2
  dense = lora.with_lora(build_model({"name": "moe_lm", **TINY["moe_lm"], "dispatch": "dense"}), spec)
  np.testing.assert_allclose(dense.apply({"params": params}, TOKENS)[0], out, atol=2e-5)
  np.testing.assert_allclose(model.apply({"params": lora.merge(params, spec)}, TOKENS)[0], out, atol=2e-5)
  flags = traverse_util.flatten_dict(adapted.trainable_params(params))
  assert {p for p, t in flags.items() if t} == {p for p in flags if p[-1] in ("lora_a", "lora_b")}
  grads = jax.grad(lambda p: jnp.sum(adapted.apply({"params": p}, TOKENS)[0] ** 2))(params)
  assert float(jnp.abs(grads["layers_1"]["ffn"]["gate_lora"]["lora_a"]).max()) > 0


def _digest(directory):
  h = hashlib.sha256()
  for root, _, files in sorted(os.walk(directory)):
    for f in sorted(files):
      h.update(f.encode())
      with open(os.path.join(root, f), "rb") as fh:
        h.update(fh.read())
  return h.hexdigest()


def lora_config(base_dir, steps=1):
  c = tiny_config(steps=steps)
  c.init_from = str(base_dir)
  c.lora.update(r=4, alpha=8.0, dropout=0.1, target_modules=(r"attention/(query|value)$", r"ffn/down$"))
  c.optimizer.update(lr=1e-2, warmup_steps=0)
  c.checkpoint.update(every_steps=0)
  c.sample.max_new_tokens = 0
  return c


def test_a_lora_run_trains_only_the_adapters_of_a_base_checkpoint(tmp_path):
  c = lora_config(tmp_path / "base")
  model = build_model(c.model)
  base_vars = nn.unbox(jax.jit(model.init)(jax.random.key(5), TOKENS))
  save_orbax(str(tmp_path / "base"), c.model, base_vars)
  before = _digest(tmp_path / "base")

  state = trainer.train(c, str(tmp_path / "run"), progress=False)
  trainable = traverse_util.flatten_dict(state.params)
  assert trainable and all(path[-1] in ("lora_a", "lora_b") for path in trainable), sorted(trainable)
  assert {"/".join(p[:-1]) for p in trainable} == {
    "layers_0/attention/query",
    "layers_0/attention/value",
    "layers_0/ffn/down",
  }
  assert all(float(jnp.abs(v).max()) > 0 for p, v in trainable.items() if p[-1] == "lora_b")  # B left zero
  opt_leaves = sum(x.size for x in jax.tree.leaves(state.opt_state) if np.ndim(x) > 0)
  assert opt_leaves == 2 * sum(x.size for x in trainable.values())  # Adam's two moments of the adapters only
  frozen = traverse_util.flatten_dict(state.frozen)
  for path, value in traverse_util.flatten_dict(base_vars["params"]).items():
    np.testing.assert_array_equal(frozen[path], value)  # the base stays as loaded
  assert _digest(tmp_path / "base") == before  # and its checkpoint is not modified


@pytest.mark.parametrize(
  "edit, message",
  [
    (dict(target_modules=("attention/nothing$",)), "matches no DenseGeneral layer"),
    (dict(target_modules=("ffn/gate$",), experts=2), "adapts DenseGeneral layers only"),  # stacked expert weights
    (dict(target_modules=("embed",)), "neither DenseGeneral layers nor MoEFFN expert weights"),
    (dict(trainable_params=("no_such_param",)), "matches no base parameter"),
    (dict(r=-1), "config.lora.r=-1"),
    (dict(r=0, adapter="/tmp/x"), "config.lora.adapter"),
    (dict(alpha=0.0), "config.lora.alpha=0.0"),
    (dict(target_modules=("(",)), "not a regular expression"),
  ],
)
def test_bad_lora_configs_fail_with_a_clear_message(edit, message):
  c = tiny_config()
  c.model = type(c.model)({"name": "moe_lm", **TINY["moe_lm"], "vocab_size": 259, "dispatch": "dense"})
  c.lora.update(r=2)
  c.lora.update(**edit)
  with pytest.raises(ConfigError, match=message):
    trainer.Experiment(c)
