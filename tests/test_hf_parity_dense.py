"""Logit and greedy-generation parity of converted dense Hugging Face checkpoints, float32, tiny random models built
offline: Llama with Llama 3.1 (`llama3`) RoPE scaling and untied embeddings, Qwen2 with q/k/v bias and tied
embeddings, Qwen3 with per-head qk-norm and YaRN RoPE scaling.

Needs torch and transformers (the `hf` extra); the import fails loudly when they are missing.
"""

import pytest

import hf_parity_testing

ROPE_TYPES = {"llama": "llama3", "qwen2": None, "qwen3": "yarn"}


@pytest.fixture(scope="module", params=sorted(ROPE_TYPES))
def converted(request, tmp_path_factory):
  return hf_parity_testing.convert(request.param, tmp_path_factory)


def test_logits_match(converted):
  hf_parity_testing.assert_logits_match(*converted)


def test_greedy_generation_matches(converted):
  hf_parity_testing.assert_greedy_matches(*converted)


def test_config_fields(converted):
  family, hf, model, _ = converted
  c = hf.config
  hf_parity_testing.assert_shared_config_fields(c, model)
  assert (model.qkv_bias, model.qk_norm) == (family == "qwen2", family == "qwen3")
  if ROPE_TYPES[family] is None:
    assert model.rope_scaling is None
  else:
    expected = {k: v for k, v in c.rope_parameters.items() if k != "rope_theta"}
    assert model.rope_scaling["rope_type"] == ROPE_TYPES[family] and dict(model.rope_scaling) == expected
