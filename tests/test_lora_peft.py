"""PEFT interop of the LoRA adapters (`zoo.checkpoints.peft_adapters`): a random LoRA adapter made with peft on a tiny
random Hugging Face model (built offline) gives the zoo the logits PEFT computes (within 1e-4, through the engine's
`config.lora.adapter` for Llama), the zoo's export loads back into PEFT with the same logits, and bad adapters
(DoRA, another kind, another rank or base) fail with one clear message; Qwen2, Qwen3, Mixtral and DeepSeek-V3's latent
attention both ways. Needs the `hf` extra (torch, transformers,
peft)."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import peft
import pytest
import torch
import transformers
from flax import traverse_util

from test_engine import tiny_config
from zoo.checkpoints import ConversionError, hf_testing, load_hf_checkpoint, peft_adapters as pa, safetensors_io
from zoo.engine import sharding, trainer
from zoo.layers import lora
from zoo.models import ConfigError, build_model

PROJECTIONS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
# The zoo's module paths of those projections.
ZOO_TARGETS = (r"attention/(query|key|value|out)$", r"ffn/(gate|up|down)$")


def _make(family, directory, projections=PROJECTIONS):
  """(HF base dir, PEFT adapter dir, the PEFT model) of a tiny random `family` model with a random r=4 adapter (B not
  zero) on every projection."""
  base, adapter = os.path.join(directory, family), os.path.join(directory, family + "_adapter")
  hf = hf_testing.build(family, base, vocab_size=264)  # covers the 259 byte ids of the engine's data
  config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=projections, init_lora_weights=False)
  model = peft.get_peft_model(hf, config).eval()
  model.save_pretrained(adapter)
  return base, adapter, model


def _torch_logits(model, toks):
  with torch.no_grad():
    return model(torch.tensor(toks, dtype=torch.long)).logits.numpy()


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  return _make("llama", str(tmp_path_factory.mktemp("peft")))


def test_engine_imports_a_peft_adapter_and_exports_it_back(llama, tmp_path):
  base, adapter, peft_model = llama
  toks = hf_testing.tokens()
  reference = _torch_logits(peft_model, toks)
  c = tiny_config()
  c.init_from = f"hf:{base}"
  c.lora.update(r=4, alpha=8.0, target_modules=ZOO_TARGETS, adapter=adapter)
  c.mesh.update(data=1)
  exp = trainer.Experiment(c, jax.devices()[:1])
  loaded = exp.load_init_from()
  with sharding.mesh_context(exp.mesh):
    state, shardings = exp.init_state()
    state = exp.with_init_from(state, shardings, loaded)
  params = jax.device_get(state.variables()["params"])
  logits = np.asarray(jax.jit(lambda p: exp.model.apply({"params": p}, jnp.asarray(toks))[0])(params))
  diff = float(np.abs(logits - reference).max())
  assert diff < 1e-4, f"max |logit diff| with the imported adapter: {diff}"

  out = str(tmp_path / "export")
  pa.export_adapter(params, exp.lora, pa.base_arch(base), out, base_model_name_or_path=base, sources=(base,))
  assert json.load(open(os.path.join(out, pa.CONFIG_FILE)))["target_modules"] == sorted(PROJECTIONS)
  reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out).eval()
  diff = float(np.abs(_torch_logits(reloaded, toks) - logits).max())
  assert diff < 1e-4, f"max |logit diff| after export -> PEFT load: {diff}"


# MLA's projections: DeepSeek's interleaved RoPE features of q_b / kv_a are half-split in the zoo, B's rows with them.
MLA_PROJECTIONS = ["q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"]


@pytest.mark.parametrize(
  "family, projections",
  [("qwen2", PROJECTIONS), ("qwen3", PROJECTIONS), ("mixtral", PROJECTIONS[:4]), ("deepseek_v3", MLA_PROJECTIONS)],
)
def test_adapters_of_other_families_match_peft_both_ways(family, projections, tmp_path):
  base, adapter, peft_model = _make(family, str(tmp_path), projections)
  toks = hf_testing.tokens()
  model_config, variables = load_hf_checkpoint(base)
  arch, read = pa.base_arch(base), pa.read_adapter(adapter)
  spec = pa.adapter_spec(read, variables["params"], arch)
  model = lora.with_lora(build_model(model_config), spec)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  flat = traverse_util.flatten_dict(variables["params"])
  flat.update(traverse_util.flatten_dict(pa.adapter_params(read, abstract["params"], arch)["params"]))
  params = traverse_util.unflatten_dict(flat)
  logits = np.asarray(jax.jit(lambda p: model.apply({**variables, "params": p}, jnp.asarray(toks))[0])(params))
  assert float(np.abs(logits - _torch_logits(peft_model, toks)).max()) < 1e-4
  out = str(tmp_path / "export")
  pa.export_adapter(params, spec, arch, out, base_model_name_or_path=base)
  reloaded = peft.PeftModel.from_pretrained(transformers.AutoModelForCausalLM.from_pretrained(base), out).eval()
  assert float(np.abs(_torch_logits(reloaded, toks) - logits).max()) < 1e-4


def _edited(adapter, tmp_path, config=None, tensors=None):
  """A copy of `adapter` with adapter_config.json keys and tensors replaced."""
  out = str(tmp_path / "edited")
  shutil.copytree(adapter, out)
  if config:
    path = os.path.join(out, pa.CONFIG_FILE)
    settings = json.load(open(path))
    settings.update(config)
    json.dump(settings, open(path, "w"))
  if tensors:
    path = os.path.join(out, pa.WEIGHTS_FILE)
    current = safetensors_io.load_file(path)
    arrays = {name: np.asarray(current[name]) for name in current}
    safetensors_io.save_file({**arrays, **tensors(arrays)}, path)
  return out


Q = "base_model.model.model.layers.0.self_attn.q_proj"


@pytest.mark.parametrize(
  "config, tensors, message",
  [
    ({"use_dora": True}, None, "use_dora=True: DoRA"),
    ({"peft_type": "IA3"}, None, "peft_type='IA3' is not supported"),
    ({"use_rslora": True}, None, "use_rslora"),
    (None, lambda t: {Q + ".lora_A.weight": t[Q + ".lora_A.weight"][:, :16]}, "belongs to another base model"),
    (None, lambda t: {Q.replace("layers.0", "layers.7") + ".lora_A.weight": t[Q + ".lora_A.weight"]}, "lora_A"),
    (None, lambda t: {Q + ".lora_B.weight": t[Q + ".lora_B.weight"][:, :2]}, "r=4"),
  ],
)
def test_bad_adapters_fail_with_a_clear_message(llama, tmp_path, config, tensors, message):
  base, adapter, _ = llama
  bad = _edited(adapter, tmp_path, config, tensors)
  model_config, variables = load_hf_checkpoint(base)
  model = lora.with_lora(build_model(model_config), lora.LoRASpec(r=4, alpha=8.0, target_modules=ZOO_TARGETS))
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 1), jnp.int32))
  with pytest.raises(ConversionError, match=message):
    pa.adapter_params(pa.read_adapter(bad), abstract["params"], pa.base_arch(base))


def test_adapter_rank_or_targets_that_differ_from_the_config_are_refused(llama, tmp_path):
  base, adapter, _ = llama
  c = tiny_config()
  c.init_from = f"hf:{base}"
  c.lora.update(r=8, alpha=8.0, target_modules=ZOO_TARGETS, adapter=adapter)
  with pytest.raises(ConfigError, match=r"config.lora.r=8 does not match the adapter .*\(r=4 in its"):
    trainer.Experiment(c).load_init_from()
  c.lora.update(r=4, target_modules=(r"attention/(query|value)$",))
  with pytest.raises(ConversionError, match=r"mlp.down_proj \(layers_0/ffn/down\) is not adapted by the model"):
    trainer.Experiment(c).load_init_from()
  with pytest.raises(ConversionError, match="is inside the source"):  # a base is never written to
    pa.export_adapter({}, lora.LoRASpec(r=4), pa.base_arch(base), os.path.join(base, "adapter"), sources=(base,))


def test_a_mixture_exports_each_expert_as_a_peft_adapter_plus_the_router(llama, tmp_path):
  base, _, _ = llama
  toks = hf_testing.tokens()
  c = tiny_config()
  c.init_from = f"hf:{base}"
  c.lora.update(r=4, alpha=8.0, target_modules=ZOO_TARGETS[:1], experts=3, router="topk", top_k=2)
  c.mesh.update(data=1)
  exp = trainer.Experiment(c, jax.devices()[:1])
  loaded = exp.load_init_from()
  with sharding.mesh_context(exp.mesh):
    state, shardings = exp.init_state()
    state = exp.with_init_from(state, shardings, loaded)
  keys = iter(jax.random.split(jax.random.key(7), 64))
  params = jax.tree_util.tree_map_with_path(  # trained-looking experts (B != 0)
    lambda path, x: 0.05 * jax.random.normal(next(keys), x.shape) if path[-1].key == "lora_b" else x,
    jax.device_get(state.variables()["params"]),
  )
  out = str(tmp_path / "mixture")
  pa.export_adapter(params, exp.lora, pa.base_arch(base), out, base_model_name_or_path=base, sources=(base,))
  mixture = json.load(open(os.path.join(out, pa.MIXTURE_FILE)))
  assert mixture == {
    "experts": 3,
    "router": "topk",
    "top_k": 2,
    "expert_dirs": ["expert_0", "expert_1", "expert_2"],
    "scaling": 2.0,
  }
  routers = safetensors_io.load_file(os.path.join(out, pa.ROUTER_FILE))
  flat = traverse_util.flatten_dict(params)
  for layer in range(c.model.num_layers):
    w = routers[f"base_model.model.model.layers.{layer}.self_attn.q_proj.lora_router.weight"]  # torch Linear [E, in]
    np.testing.assert_array_equal(
      w, np.asarray(flat[(f"layers_{layer}", "attention", "query", "lora_router")]).reshape(-1, 3).T
    )
  # Each expert alone in PEFT computes what the zoo computes with that expert as a plain LoRA adapter.
  single = lora.with_lora(build_model(c.model), lora.LoRASpec(r=4, alpha=8.0, target_modules=ZOO_TARGETS[:1]))
  for e in range(3):
    expert = jax.tree_util.tree_map_with_path(lambda p, x: x[e] if p[-1].key in ("lora_a", "lora_b") else x, params)
    expert = traverse_util.unflatten_dict(
      {k: v for k, v in traverse_util.flatten_dict(expert).items() if k[-1] != "lora_router"}
    )
    zoo = np.asarray(single.apply({"params": expert}, jnp.asarray(toks))[0])
    reloaded = peft.PeftModel.from_pretrained(
      transformers.AutoModelForCausalLM.from_pretrained(base), os.path.join(out, f"expert_{e}")
    ).eval()
    diff = float(np.abs(_torch_logits(reloaded, toks) - zoo).max())
    assert diff < 1e-4, f"expert {e}: max |logit diff| {diff}"
  # The export reads back into a mixture (config.lora.adapter): the experts, their routers, unchanged.
  c.lora.adapter = out
  exp = trainer.Experiment(c, jax.devices()[:1])
  (_, _, _), (_, source, imported) = exp.load_init_from()
  assert source == f"peft:{out}"
  imported = traverse_util.flatten_dict(imported["params"])
  assert {p[-1] for p in imported} == {"lora_a", "lora_b", "lora_router"}
  for path, value in imported.items():
    np.testing.assert_allclose(value, flat[path], atol=1e-7)
  c.lora.router = "dynmole"  # another router than the mixture's is refused, naming it
  with pytest.raises(ConfigError, match="config.lora.router='dynmole' does not match the mixture"):
    trainer.Experiment(c, jax.devices()[:1]).load_init_from()
