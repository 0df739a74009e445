"""One contract over every registered model (CONTRIBUTING.md, "Models"): it builds from a config, `init` and `apply`
give `(output, ModelOutput)` with a finite scalar `aux_loss` and flat metrics, `num_params()` counts its parameters,
it sows exactly the per-token outputs it `exposes`, and a language model decodes with its KV cache exactly as its full
forward pass computes. A new model gets its tiny config here, or this test fails."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.models import ModelOutput, build_model, model_names

LM = dict(vocab_size=32, num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=24)
TINY = {
  "dense_lm": dict(LM),
  "moe_lm": dict(LM, num_experts=4, num_experts_per_tok=2, expert_mlp_dim=8, capacity_factor=0.0),
  "rmoe": dict(LM, num_experts=4, num_experts_per_tok=2, expert_mlp_dim=8, router_hidden_dim=8, dispatch="dense"),
  "smallthinker": dict(LM, num_experts=4, num_experts_per_tok=2, expert_mlp_dim=8, sliding_window=4, dispatch="dense"),
  "blockffn": dict(LM, num_experts=4, expert_mlp_dim=8, chunk_length=4, dispatch="dense"),
  "smoe_dropout": dict(
    LM, num_experts=4, num_experts_per_tok=4, expert_mlp_dim=8, k_min=1, k_schedule_steps=3, dispatch="dense"
  ),
  "readme_moe": dict(LM, num_experts=2, router_mlp_dim=16, dispatch="dense"),
  "duo_llm": dict(LM, mlp_dim=16),
  # Expert-choice MoR evaluates with top-k over the sequence by default (the authors' rule); decoding with a cache is
  # always causal, so the full forward it is compared with uses the causal rule too.
  "mor": dict(LM, num_layers=4, head_dim=8, num_recursions=2, router="expert", eval_routing="causal"),
  "text_encoder": dict(LM, embed_dim=16, pooling="mean", num_classes=3),
  "simplenet": dict(num_classes=10, widths=(4,) * 13, num_pools=0, dropout_rate=0.0),
  "dit": dict(patch_size=4, num_classes=3, embed_dim=8, num_layers=1, num_heads=2, frequency_dim=8),
  "flow_router": dict(patch_size=4, num_experts=3, embed_dim=8, num_layers=1, num_heads=2, frequency_dim=8),
  "aptp": dict(patch_size=4, num_classes=3, embed_dim=8, num_layers=1, num_heads=2, frequency_dim=8, num_codes=2),
  "emov2": dict(
    variant="custom",
    num_classes=10,
    image_size=8,
    in_channels=1,
    depths=(1, 1, 2, 2),
    widths=(4, 4, 8, 8),
    head_dims=(4, 4, 4, 4),
    stem_stride=1,
    stage_strides=(1, 2, 1, 2),
    window_size=2,
  ),
  "mofme": dict(
    num_classes=3, channels=1, patch_size=4, embed_dim=8, depth=1, num_heads=2, hidden_dim=8, num_experts=3, top_k=2
  ),
  "adaptdhm": dict(cardinalities=(5, 6), numeric_features=2, num_domains=3, embed_dim=4, tower_dims=(8, 4)),
  "netmamba": dict(num_classes=3, packets=2, header_bytes=8, payload_bytes=8, embed_dim=8, depth=1, decoder_dim=8),
  "bilstm": dict(vocab_size=32, embed_dim=8, hidden_dim=8, num_classes=3),
  "distillation": dict(
    teacher=dict(name="text_encoder", **LM, pooling="mean", num_classes=3),
    student=dict(name="bilstm", vocab_size=32, embed_dim=8, hidden_dim=8, num_classes=3),
  ),
  "clr": dict(head_classes=(3, 2), stage_sizes=(1,), width=4),  # its output: one logits array per task's head
  "slimmable": dict(
    num_classes=3, width_mults=(0.5, 1.0), encoder_widths=(4,), encoder_strides=(2,), bottleneck=4, decoder_widths=(4,)
  ),
  "r2r": dict(input_dim=8, hidden_dim=8, num_blocks=2, top_k=5),
  "lowformer": dict(
    variant="custom",
    num_classes=10,
    in_channels=1,
    widths=(4, 4, 8, 8, 8),
    depths=(0, 1, 1, 1, 1),
    head_widths=(8, 8),
    stem_stride=1,
    stage_strides=(1, 2, 1, 2),
  ),
}
IMAGES = ("simplenet", "emov2", "mofme", "clr", "slimmable", "lowformer")
# Flow-matching image models (`zoo.tasks.flow_matching`, `zoo.tasks.flow_router`): images plus the time t [B], and
# the class labels [B] for the velocity model.
FLOW_IMAGES = {"dit": ("t", "labels"), "flow_router": ("t",), "aptp": ("t", "labels", "prompts")}


def test_every_registered_model_has_a_tiny_config():
  assert sorted(TINY) == model_names()


def _inputs(name):
  if name in FLOW_IMAGES:
    inputs = {"images": jax.random.normal(jax.random.key(0), (2, 8, 8, 1)), "t": jnp.array([0.25, 0.75])}
    if "labels" in FLOW_IMAGES[name]:
      inputs["labels"] = jnp.array([0, TINY[name]["num_classes"]], jnp.int32)  # a class and the null class
    if "prompts" in FLOW_IMAGES[name]:
      inputs["prompts"] = jax.nn.one_hot(jnp.array([0, 3]), 15)  # APTP's prompt embeddings
    return inputs
  if name == "adaptdhm":  # a CTR example: categorical fields, numeric features, its domain
    return {
      "categorical": jnp.array([[0, 3], [4, 5]], jnp.int32),
      "numeric": jax.random.normal(jax.random.key(0), (2, 2)),
      "domain": jnp.array([0, 2], jnp.int32),
    }
  if name == "netmamba":  # NetMamba's flows: 5 packets of 80 header + 240 payload bytes
    return {"packets": jax.random.randint(jax.random.key(0), (2, 5, 320), 0, 256)}
  if name == "r2r":  # R2R's router: the small LM's hidden state, sampled-token embedding and top-k logits
    k = jax.random.split(jax.random.key(0), 3)
    return {
      "hidden_states": jax.random.normal(k[0], (2, 8)),
      "token_embeddings": jax.random.normal(k[1], (2, 8)),
      "top_logits": jax.random.normal(k[2], (2, 5)),
    }
  if name in IMAGES:
    return {"images": jax.random.uniform(jax.random.key(0), (2, 8, 8, 1))}
  return {"tokens": jax.random.randint(jax.random.key(0), (2, 8), 0, LM["vocab_size"])}


@pytest.mark.parametrize("name", sorted(TINY))
def test_model_contract(name):
  model = build_model({"name": name, **TINY[name]})
  inputs = _inputs(name)
  variables = jax.jit(lambda r: model.init(r, **inputs))(jax.random.key(1))
  (output, out), state = jax.jit(lambda v: model.apply(v, **inputs, mutable=["intermediates"]))(variables)
  assert isinstance(out, ModelOutput) and out.aux_loss.shape == () and bool(jnp.isfinite(out.aux_loss))
  assert all(isinstance(k, str) and hasattr(v, "shape") for k, v in out.metrics.items())  # flat: name -> array
  assert all(bool(jnp.all(jnp.isfinite(x))) for x in jax.tree.leaves(output))
  top_level = {k for k, v in state.get("intermediates", {}).items() if not hasattr(v, "items")}  # not sub-modules
  assert top_level == set(type(model).exposes)
  if hasattr(model, "num_params"):
    assert model.num_params() == sum(x.size for x in jax.tree.leaves(variables["params"]))
  if hasattr(model, "init_cache"):
    tokens = inputs["tokens"]
    cache = model.init_cache(2, tokens.shape[1])
    decode = jax.jit(lambda token, cache: model.apply(variables, token, cache=cache))
    steps = []
    for t in range(tokens.shape[1]):
      logits, step_out = decode(tokens[:, t : t + 1], cache)
      steps.append(logits)
      cache = step_out.cache
    np.testing.assert_allclose(jnp.concatenate(steps, axis=1), output, atol=2e-5)
