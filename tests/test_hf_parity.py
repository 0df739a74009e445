"""Logit, routing and greedy-generation parity of converted Hugging Face MoE checkpoints (float32, tiny random
models built offline): Mixtral, OLMoE (qk-norm over the whole q/k projections), Qwen2-MoE (sigmoid-gated shared
expert), Qwen3-MoE, DeepSeek-V3 (MLA with YaRN RoPE, sigmoid routing with a fixed score-correction bias,
group-limited top-k, shared experts, a dense first layer).

Routing parity: the experts each token is sent to in every MoE layer (HF router hooks vs the zoo Router outputs).
Needs torch and transformers (the `hf` extra); the import fails loudly when they are missing.
"""

import numpy as np
import pytest

import hf_parity_testing

FAMILIES = ("mixtral", "olmoe", "qwen2_moe", "qwen3_moe", "deepseek_v3")


@pytest.fixture(scope="module", params=FAMILIES)
def converted(request, tmp_path_factory):
  return hf_parity_testing.convert(request.param, tmp_path_factory)


def test_logits_and_routing_match(converted):
  zoo_routes, hf_routes = hf_parity_testing.assert_logits_match(*converted)
  assert len(zoo_routes) == len(hf_routes) > 0
  for layer, (a, b) in enumerate(zip(zoo_routes, hf_routes)):
    np.testing.assert_array_equal(a, b, err_msg=f"{converted[0]}: experts chosen in MoE layer {layer} differ")


def test_greedy_generation_matches(converted):
  hf_parity_testing.assert_greedy_matches(*converted)


def test_config_fields(converted):
  family, hf, model, _ = converted
  c = hf.config
  hf_parity_testing.assert_shared_config_fields(c, model)
  assert model.renormalize == (family == "mixtral" or bool(getattr(c, "norm_topk_prob", False)))
  assert model.qkv_bias == (family == "qwen2_moe")
  if family == "qwen2_moe":
    assert (model.num_shared_experts, model.shared_expert_mlp_dim, model.shared_expert_gate) == (1, 24, True)
  assert model.qk_norm_scope == ("projection" if family == "olmoe" else "head")
  assert model.router_bias == (family == "deepseek_v3")
  if family == "deepseek_v3":
    assert (model.first_dense_layers, model.routed_scaling_factor) == (1, 2.5)
    assert (model.n_group, model.topk_group, model.router) == (2, 1, "sigmoid_topk")
    assert (model.attention, model.q_lora_rank, model.kv_lora_rank) == ("mla", 16, 16)
    assert (model.qk_nope_head_dim, model.qk_rope_head_dim, model.v_head_dim) == (8, 4, 8)
    assert model.rope_scaling["rope_type"] == "yarn" and model.bias_update_rate == 0.0
