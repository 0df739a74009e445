"""Logit and greedy-generation parity of converted dense Hugging Face checkpoints, float32, tiny random models built
offline: Llama with Llama 3.1 (`llama3`) RoPE scaling and untied embeddings, Qwen2 with q/k/v bias and tied
embeddings, Qwen3 with per-head qk-norm and YaRN RoPE scaling.

Needs torch and transformers (the `hf` extra); the import fails loudly when they are missing.
"""
import numpy as np
import pytest

from zoo.checkpoints import hf_testing, load_hf_checkpoint
from zoo.models.registry import build_model

ROPE_TYPES = {"llama": "llama3", "qwen2": None, "qwen3": "yarn"}


@pytest.fixture(scope="module", params=sorted(ROPE_TYPES))
def converted(request, tmp_path_factory):
  directory = str(tmp_path_factory.mktemp(request.param))
  hf = hf_testing.build(request.param, directory)
  model_config, variables = load_hf_checkpoint(directory)
  return request.param, hf, build_model(model_config), variables


def test_logits_match(converted):
  family, hf, model, variables = converted
  toks = hf_testing.tokens()
  ref, _ = hf_testing.hf_logits_and_routes(hf, toks)
  ours, _ = hf_testing.zoo_logits_and_routes(model, variables, toks)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() < 1e-4, f"{family}: max |logit diff| {np.abs(ours - ref).max()}"


def test_greedy_generation_matches(converted):
  family, hf, model, variables = converted
  prompt = hf_testing.tokens(batch=1, length=5, seed=1)
  np.testing.assert_array_equal(hf_testing.zoo_greedy(model, variables, prompt, 6),
                                hf_testing.hf_greedy(hf, prompt, 6), err_msg=f"{family}: greedy tokens differ")


def test_config_fields(converted):
  family, hf, model, _ = converted
  c = hf.config
  assert (model.norm_epsilon, model.tie_embeddings) == (c.rms_norm_eps, bool(c.tie_word_embeddings))
  assert model.rope_theta == c.rope_parameters["rope_theta"]
  assert (model.qkv_bias, model.qk_norm) == (family == "qwen2", family == "qwen3")
  if ROPE_TYPES[family] is None:
    assert model.rope_scaling is None
  else:
    expected = {k: v for k, v in c.rope_parameters.items() if k != "rope_theta"}
    assert model.rope_scaling["rope_type"] == ROPE_TYPES[family] and dict(model.rope_scaling) == expected
