"""Export to Hugging Face (Mixtral, Qwen3-MoE), orbax round trip, the CLI, sharded loading, the tokenizer wrapper,
MLA against transformers' DeepSeek-V3 attention, and the conversion errors.

Needs torch and transformers (the `hf` extra); the import fails loudly when they are missing.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
import torch
import transformers

from zoo.checkpoints import (
  ConversionError,
  HFTokenizer,
  export_hf,
  hf_spec,
  hf_testing,
  load_hf_checkpoint,
  safetensors_io,
  save_orbax,
)
from zoo.engine.checkpoint import restore_params
from zoo.engine.sharding import make_mesh
from zoo.layers.mla import MultiHeadLatentAttention
from zoo.models.registry import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _build_and_load(family, tmp_path_factory, **overrides):
  directory = str(tmp_path_factory.mktemp(family))
  hf_testing.build(family, directory, **overrides)
  model_config, variables = load_hf_checkpoint(directory)
  return directory, model_config, variables


# Built once per module; tests that alter the files work on a copy.
@pytest.fixture(scope="module")
def mixtral(tmp_path_factory):
  return _build_and_load("mixtral", tmp_path_factory)


@pytest.fixture(scope="module")
def qwen3_moe(tmp_path_factory):  # with Llama 3.1 RoPE scaling, which the export must carry
  return _build_and_load(
    "qwen3_moe",
    tmp_path_factory,
    rope_parameters={
      "rope_theta": 10000.0,
      "rope_type": "llama3",
      "factor": 4.0,
      "low_freq_factor": 1.0,
      "high_freq_factor": 4.0,
      "original_max_position_embeddings": 16,
    },
  )


@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe"])
def test_export_round_trip(family, request, tmp_path):
  src, model_config, variables = request.getfixturevalue(family)
  out = str(tmp_path / "out")
  export_hf(model_config, variables, out, family)
  # transformers loads the export and computes the zoo model's logits
  exported = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
  toks = hf_testing.tokens()
  with torch.no_grad():
    ref = exported(torch.tensor(toks, dtype=torch.long)).logits.numpy()
  ours = np.asarray(jax.jit(build_model(model_config).apply)(variables, jnp.asarray(toks))[0])
  assert np.abs(ours - ref).max() < 1e-4
  # re-converting the export gives identical arrays and config
  again_config, again = load_hf_checkpoint(out)
  assert again_config.to_dict() == model_config.to_dict()
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), again, variables)
  # and the exported tensors equal the original file's
  original, written = safetensors_io.load_dir(src), safetensors_io.load_dir(out)
  assert set(original) == set(written)
  for name in original:
    np.testing.assert_array_equal(original[name], written[name], err_msg=name)


def test_orbax_checkpoint_restores_into_engine_layout(qwen3_moe, tmp_path):
  _, model_config, variables = qwen3_moe
  out = str(tmp_path / "zoo")
  save_orbax(out, model_config, variables)
  assert json.load(open(os.path.join(out, "zoo_config.json")))["name"] == "moe_lm"
  restored = restore_params(out, jax.tree.map(np.zeros_like, variables["params"]))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), restored, variables["params"])


def test_cli_both_directions(mixtral, tmp_path):
  src = mixtral[0]
  zoo_dir, hf_dir = str(tmp_path / "zoo"), str(tmp_path / "hf")
  script = os.path.join(ROOT, "tools", "convert_hf.py")
  env = {**os.environ, "JAX_PLATFORMS": "cpu"}
  done = subprocess.run(
    [sys.executable, script, "to-zoo", src, zoo_dir], check=True, env=env, capture_output=True, text=True
  )
  assert json.loads(done.stdout.strip().splitlines()[-1]) == mixtral[1].to_dict()
  # The other direction in this process (one interpreter start is enough to show the script runs standalone).
  spec = importlib.util.spec_from_file_location("convert_hf", script)
  cli = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(cli)
  cli.main(["to-hf", zoo_dir, hf_dir, "--family", "mixtral"])
  original, written = safetensors_io.load_dir(src), safetensors_io.load_dir(hf_dir)
  assert set(original) == set(written)
  for name in original:
    np.testing.assert_array_equal(original[name], written[name], err_msg=name)


def test_sharded_load_places_every_leaf(mixtral):
  src, _, plain = mixtral
  mesh = make_mesh({"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
  _, sharded = load_hf_checkpoint(src, mesh=mesh)
  gate = sharded["params"]["layers_0"]["ffn"]["gate"]  # [experts, embed, expert_mlp]
  assert gate.sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
  assert len(gate.addressable_shards) == 8 and gate.addressable_shards[0].data.shape == (2, 16, 24)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), sharded, plain)
  # 2 key/value heads cannot be split over 8 tensor-parallel devices: a clear error naming the variable
  with pytest.raises(ConversionError, match=r"\['attention'\]\['key'\]\['kernel'\] of shape \(32, 2, 8\) cannot take"):
    load_hf_checkpoint(src, mesh=make_mesh({"data": 1, "fsdp": 1, "expert": 1, "tensor": 8}))


def test_tokenizer_wrapper(tmp_path):
  import tokenizers

  vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "hello": 3, "world": 4}
  tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
  tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
  tok.add_special_tokens(["<s>", "</s>"])
  tok.save(str(tmp_path / "tokenizer.json"))
  (tmp_path / "config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2, "vocab_size": 5}))
  wrapped = HFTokenizer("hf:" + str(tmp_path))
  ids = wrapped.encode("hello world")
  assert ids.dtype == np.int32 and ids.tolist() == [1, 3, 4, 2]
  assert wrapped.encode("hello", add_bos=False, add_eos=False).tolist() == [3]
  assert wrapped.decode(ids) == "hello world"
  assert wrapped.vocab_size == 5


@pytest.mark.parametrize("rope", ["default", "yarn"])
def test_mla_matches_deepseek_v3_attention(rope):
  from transformers.models.deepseek_v3 import modeling_deepseek_v3 as ds

  # The tiny DeepSeek-V3 of hf_testing (4 heads, q and kv latents of 16, RoPE 4 + NoPE 8 query/key dims, values of 8)
  # with its own YaRN rope or plain RoPE; the zoo MLA takes the same sizes.
  plain = {"rope_parameters": {"rope_theta": 10000.0, "rope_type": "default"}} if rope == "default" else {}
  config = hf_testing.config("deepseek_v3", **plain)
  config._attn_implementation = "eager"
  torch.manual_seed(0)
  attention, rotary = ds.DeepseekV3Attention(config, 0), ds.DeepseekV3RotaryEmbedding(config)
  for p in attention.parameters():
    torch.nn.init.normal_(p, std=0.3)
  x, positions = torch.randn(2, 7, 32), torch.arange(7)[None].repeat(2, 1)
  with torch.no_grad():
    ref = attention(x, rotary(x, positions), torch.full((7, 7), float("-inf")).triu(1)[None, None])[0].numpy()
  tensors = {f"model.layers.0.self_attn.{k}": v.numpy() for k, v in attention.state_dict().items()}
  arch = hf_spec.arch_from_config({**config.to_dict(), "num_hidden_layers": 1, "first_k_dense_replace": 1})
  attn = hf_spec.hf_to_canonical({**tensors, **_dummy_rest(arch)}, arch)["layers"][0]["attn"]
  params = {
    "q_a": {"kernel": attn["q_a"]},
    "q_a_norm": {"scale": attn["q_a_norm"]},
    "q_b": {"kernel": attn["q_b"]},
    "kv_a": {"kernel": attn["kv_a"]},
    "kv_a_norm": {"scale": attn["kv_a_norm"]},
    "kv_b": {"kernel": attn["kv_b"]},
    "out": {"kernel": attn["o"]},
  }
  sizes = ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")
  mla = MultiHeadLatentAttention(
    num_heads=config.num_attention_heads,
    **{name: getattr(config, name) for name in sizes},
    rope_scaling=hf_spec.rope_settings(config.to_dict())[1],
  )
  apply = jax.jit(lambda x, positions, cache: mla.apply({"params": params}, x, positions, cache=cache))
  y, _ = apply(jnp.asarray(x.numpy()), jnp.asarray(positions.numpy()), None)
  assert np.abs(np.asarray(y) - ref).max() < 1e-5
  cache, steps = mla.init_cache(2, 9), []
  for t in range(7):  # token-by-token decoding through the latent cache gives the same outputs
    y_t, cache = apply(jnp.asarray(x.numpy()[:, t : t + 1]), jnp.asarray(positions.numpy()[:, t : t + 1]), cache)
    steps.append(np.asarray(y_t))
  assert np.abs(np.concatenate(steps, 1) - ref).max() < 1e-5
  assert cache.latent.shape == (2, 9, 16) and cache.k_rope.shape == (2, 9, 4)


def _dummy_rest(arch):
  """Zero tensors for everything but the attention of layer 0 (hf_to_canonical reads the whole model)."""
  return {
    name: np.zeros(shape, np.float32)
    for name, shape in hf_spec.expected_tensors(arch).items()
    if ".self_attn." not in name
  }


def test_unsupported_architecture_is_named(tmp_path):
  (tmp_path / "config.json").write_text(json.dumps({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}))
  with pytest.raises(ConversionError, match=r"model_type='gpt2'.*GPT2LMHeadModel.*supported model types.*mixtral"):
    load_hf_checkpoint(str(tmp_path))
  dynamic = {
    "model_type": "llama",
    "hidden_size": 32,
    "num_attention_heads": 4,
    "num_hidden_layers": 1,
    "vocab_size": 8,
    "intermediate_size": 8,
    "rope_parameters": {"rope_theta": 1e4, "rope_type": "dynamic", "factor": 2.0},
  }
  with pytest.raises(ConversionError, match=r"rope_type='dynamic' is not supported; supported: \('default'"):
    hf_spec.arch_from_config(dynamic)


def _copy(directory, tmp_path):
  out = str(tmp_path / "copy")
  shutil.copytree(directory, out)
  return out, os.path.join(out, "model.safetensors")


def test_missing_unexpected_and_misshapen_tensors_are_named(qwen3_moe, tmp_path):
  directory, path = _copy(qwen3_moe[0], tmp_path)
  tensors = dict(safetensors_io.load_file(path))
  tensors.pop("model.layers.1.mlp.experts.3.up_proj.weight")
  tensors["model.layers.0.self_attn.extra.weight"] = np.zeros((2, 2), np.float32)
  tensors["model.layers.0.self_attn.q_norm.weight"] = np.zeros((9,), np.float32)
  safetensors_io.save_file({k: np.asarray(v) for k, v in tensors.items()}, path)
  with pytest.raises(ConversionError) as info:
    load_hf_checkpoint(directory)
  message = str(info.value)
  assert "missing tensors (1): model.layers.1.mlp.experts.3.up_proj.weight" in message
  assert "unexpected tensors (1): model.layers.0.self_attn.extra.weight" in message
  assert "model.layers.0.self_attn.q_norm.weight: expected (8,), found (9,)" in message


def test_fused_expert_layout_is_read(qwen3_moe, tmp_path):
  """transformers 5 keeps experts fused in memory (`experts.gate_up_proj` [E, 2F, D]); such files load too."""
  directory, path = _copy(qwen3_moe[0], tmp_path)
  tensors = {k: np.asarray(v) for k, v in safetensors_io.load_file(path).items()}
  for i in range(2):
    p = f"model.layers.{i}.mlp.experts."
    gate = np.stack([tensors.pop(f"{p}{e}.gate_proj.weight") for e in range(4)])
    up = np.stack([tensors.pop(f"{p}{e}.up_proj.weight") for e in range(4)])
    tensors[p + "gate_up_proj"] = np.concatenate([gate, up], axis=1)
    tensors[p + "down_proj"] = np.stack([tensors.pop(f"{p}{e}.down_proj.weight") for e in range(4)])
  safetensors_io.save_file(tensors, path)
  _, fused = load_hf_checkpoint(directory)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), fused, qwen3_moe[2])


def test_export_rejects_models_it_cannot_describe(qwen3_moe, tmp_path):
  _, model_config, variables = qwen3_moe
  shared = model_config.copy_and_resolve_references()
  shared.num_shared_experts = 1
  with pytest.raises(ConversionError, match="without shared experts"):
    export_hf(shared, variables, str(tmp_path / "out"), "qwen3_moe")
  dense = ml_collections.ConfigDict({**model_config.to_dict(), "name": "dense_lm"})
  with pytest.raises(ConversionError, match="needs a moe_lm"):
    export_hf(dense, variables, str(tmp_path / "out"), "mixtral")
  olmoe_norm = ml_collections.ConfigDict({**model_config.to_dict(), "qk_norm_scope": "projection"})
  with pytest.raises(ConversionError, match="needs attention='gqa' with per-head qk-norm"):
    export_hf(olmoe_norm, variables, str(tmp_path / "out"), "qwen3_moe")
  with pytest.raises(ConversionError, match="supports"):
    export_hf(model_config, variables, str(tmp_path / "out"), "llama")
