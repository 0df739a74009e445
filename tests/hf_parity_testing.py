"""Helpers of the Hugging Face parity tests (test_hf_parity*.py): convert a tiny random checkpoint, compare logits and
greedy generation. Needs torch and transformers (the `hf` extra)."""

import numpy as np

from zoo.checkpoints import hf_testing, load_hf_checkpoint
from zoo.models.registry import build_model


def convert(family, tmp_path_factory):
  """(family, HF model, zoo model, zoo variables) of a tiny random `family` checkpoint built offline and converted."""
  directory = str(tmp_path_factory.mktemp(family))
  hf = hf_testing.build(family, directory)
  model_config, variables = load_hf_checkpoint(directory)
  return family, hf, build_model(model_config), variables


def assert_logits_match(family, hf, model, variables):
  """Asserts equal logits [2, 9, vocab] (max abs diff < 1e-4); returns (zoo routes, HF routes), one array per MoE
  layer (empty for dense models)."""
  toks = hf_testing.tokens()
  ref, hf_routes = hf_testing.hf_logits_and_routes(hf, toks)
  ours, zoo_routes = hf_testing.zoo_logits_and_routes(model, variables, toks)
  assert ours.shape == ref.shape
  assert np.abs(ours - ref).max() < 1e-4, f"{family}: max |logit diff| {np.abs(ours - ref).max()}"
  return zoo_routes, hf_routes


def assert_shared_config_fields(hf_config, model):
  """Asserts the fields every converted family sets alike: norm epsilon, embedding tying and RoPE theta."""
  assert (model.norm_epsilon, model.tie_embeddings) == (hf_config.rms_norm_eps, bool(hf_config.tie_word_embeddings))
  assert model.rope_theta == hf_config.rope_parameters["rope_theta"]


def assert_greedy_matches(family, hf, model, variables):
  """Asserts the same 6 greedy tokens after a 5-token prompt."""
  prompt = hf_testing.tokens(batch=1, length=5, seed=1)
  np.testing.assert_array_equal(
    hf_testing.zoo_greedy(model, variables, prompt, 6),
    hf_testing.hf_greedy(hf, prompt, 6),
    err_msg=f"{family}: greedy tokens differ",
  )
