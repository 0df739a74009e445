"""Tiny random Hugging Face models of every supported family, built offline, for the parity tests (needs the `hf`
extra: torch and transformers).

The dense cases carry RoPE scaling: Llama with Llama 3.1's `llama3` rule, Qwen3 with YaRN (DeepSeek-V3 has YaRN
too); Qwen2 and the other MoE families keep plain RoPE. The vocabulary (96) splits evenly over 2, 4 and 8 devices.
"""

import numpy as np
import torch
import transformers

COMMON = dict(
  vocab_size=96,
  hidden_size=32,
  intermediate_size=48,
  num_hidden_layers=2,
  num_attention_heads=4,
  num_key_value_heads=2,
  max_position_embeddings=64,
)
FAMILIES = {
  "llama": (
    "LlamaConfig",
    "LlamaForCausalLM",
    dict(
      rms_norm_eps=1e-5,
      rope_parameters={
        "rope_theta": 5000.0,
        "rope_type": "llama3",
        "factor": 4.0,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
  ),
  "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(tie_word_embeddings=True)),
  "qwen3": (
    "Qwen3Config",
    "Qwen3ForCausalLM",
    dict(
      head_dim=8,
      rope_parameters={
        "rope_theta": 10000.0,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
      },
    ),
  ),
  "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
  "olmoe": (
    "OlmoeConfig",
    "OlmoeForCausalLM",
    dict(num_experts=4, num_experts_per_tok=2, eos_token_id=2, pad_token_id=1),
  ),
  "qwen2_moe": (
    "Qwen2MoeConfig",
    "Qwen2MoeForCausalLM",
    dict(
      num_experts=4,
      num_experts_per_tok=2,
      moe_intermediate_size=16,
      shared_expert_intermediate_size=24,
      norm_topk_prob=False,
    ),
  ),
  "qwen3_moe": (
    "Qwen3MoeConfig",
    "Qwen3MoeForCausalLM",
    dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=16, head_dim=8, norm_topk_prob=True),
  ),
  "deepseek_v3": (
    "DeepseekV3Config",
    "DeepseekV3ForCausalLM",
    dict(
      n_routed_experts=8,
      num_experts_per_tok=2,
      moe_intermediate_size=16,
      n_shared_experts=1,
      first_k_dense_replace=1,
      n_group=2,
      topk_group=1,
      q_lora_rank=16,
      kv_lora_rank=16,
      qk_rope_head_dim=4,
      qk_nope_head_dim=8,
      v_head_dim=8,
      num_key_value_heads=4,
      routed_scaling_factor=2.5,
      rope_parameters={
        "rope_theta": 10000.0,
        "rope_type": "yarn",
        "factor": 4.0,
        "original_max_position_embeddings": 16,
        "mscale": 1.0,
        "mscale_all_dim": 1.0,
      },
    ),
  ),
}


def config(family, **overrides):
  """The transformers config of the tiny `family` model: `COMMON`, the family's fields, then `overrides`."""
  config_cls, _, extra = FAMILIES[family]
  return getattr(transformers, config_cls)(**{**COMMON, **extra, **overrides})


def build(family, directory, seed=0, **overrides):
  """Save a tiny random `family` model (float32; config fields `overrides`) to `directory`; returns the torch
  model in eval mode."""
  torch.manual_seed(seed)
  model = getattr(transformers, FAMILIES[family][1])(config(family, **overrides))
  with torch.no_grad():  # random routers and score-correction biases, so that routing is not trivial
    for name, param in model.named_parameters():
      if "gate.weight" in name or "norm" in name:
        param.normal_(mean=1.0 if "norm" in name else 0.0, std=0.3)
    for name, buffer in model.named_buffers():
      if name.endswith("e_score_correction_bias"):
        buffer.normal_(std=0.1)
  model.save_pretrained(directory)
  return model.eval()


def tokens(batch=2, length=9, seed=0):
  return np.random.RandomState(seed).randint(0, COMMON["vocab_size"], (batch, length)).astype(np.int32)


def hf_logits_and_routes(hf, toks):
  """Logits [batch, length, vocab] and each MoE layer's top-k expert ids [tokens, k] (sorted), from forward hooks on
  the Hugging Face routers (modules returning `(router_logits, weights, indices)`)."""
  chosen, hooks = [], []
  for layer in hf.model.layers:
    gate = getattr(getattr(layer, "mlp", None), "gate", None) or getattr(
      getattr(layer, "block_sparse_moe", None), "gate", None
    )
    if gate is not None and not isinstance(gate, torch.nn.Linear):
      hooks.append(gate.register_forward_hook(lambda m, i, out: chosen.append(np.sort(out[2].numpy(), -1))))
  with torch.no_grad():
    logits = hf(torch.tensor(toks, dtype=torch.long)).logits.numpy()
  for h in hooks:
    h.remove()
  return logits, chosen


def zoo_logits_and_routes(model, variables, toks):
  """Logits and each MoE layer's expert ids [tokens, k] (sorted), captured from the zoo Router modules' outputs."""
  import jax
  import jax.numpy as jnp

  from zoo.routing import Router

  @jax.jit  # one compilation per model costs less than compiling each eager op of a new model
  def forward(variables, toks):
    return model.apply(variables, toks, capture_intermediates=lambda m, _: isinstance(m, Router))

  (logits, _), state = forward(variables, jnp.asarray(toks))
  captured = state.get("intermediates", {})
  layers = sorted((n for n in captured if n.startswith("layers_")), key=lambda n: int(n.rsplit("_", 1)[1]))
  routes = [np.sort(np.asarray(captured[name]["ffn"]["router"]["__call__"][0].expert_ids), -1) for name in layers]
  return np.asarray(logits), routes


def hf_greedy(hf, prompt, steps):
  """`steps` greedy tokens after `prompt` [1, length] with transformers' generate."""
  with torch.no_grad():
    out = hf.generate(
      torch.tensor(prompt, dtype=torch.long),
      max_new_tokens=steps,
      min_new_tokens=steps,
      do_sample=False,
      pad_token_id=0,
    )
  return out.numpy()[0, prompt.shape[1] :]


def zoo_greedy(model, variables, prompt, steps):
  """`steps` greedy tokens after `prompt` [1, length], every token (prompt included) fed through one compiled
  single-token cached call (cached prefill in one call equals this: tests/test_dense_lm.py, test_moe_lm.py)."""
  import jax
  import jax.numpy as jnp

  step = jax.jit(lambda variables, tok, cache: model.apply(variables, tok, cache=cache))
  cache = model.init_cache(1, prompt.shape[1] + steps)
  for t in range(prompt.shape[1]):
    logits, out = step(variables, jnp.asarray(prompt[:, t : t + 1]), cache)
    cache = out.cache
  generated = []
  for _ in range(steps):
    nxt = jnp.argmax(logits[:, -1], -1).astype(jnp.int32)
    generated.append(int(nxt[0]))
    logits, out = step(variables, nxt[:, None], out.cache)
  return np.asarray(generated)
