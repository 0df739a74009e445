"""Dense decoder LM: shapes, causality, cached decoding == full forward, param counts, FLOPs, training, sharding."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from zoo.engine.sharding import make_mesh
from zoo.layers import count_params
from zoo.layers.axes import LOGICAL_AXIS_RULES, logical_to_sharding
from zoo.models import ConfigError, build_model

TINY = dict(name="dense_lm", vocab_size=32, num_layers=2, embed_dim=16, num_heads=4, num_kv_heads=2, mlp_dim=24)
MLA = dict(
  attention="mla",
  num_kv_heads=None,
  q_lora_rank=8,
  kv_lora_rank=6,
  qk_nope_head_dim=4,
  qk_rope_head_dim=2,
  v_head_dim=6,
)
LLAMA3 = {
  "rope_type": "llama3",
  "factor": 4.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 4,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4, "mscale": 1.0, "mscale_all_dim": 1.0}
# The models whose parameters and FLOPs the tests count by hand: HAND (MLA adds its keys) and its GQA form HAND_GQA.
HAND = dict(name="dense_lm", vocab_size=11, num_layers=2, embed_dim=8, num_heads=2, mlp_dim=12)
HAND_GQA = dict(HAND, num_kv_heads=1, head_dim=4)


def _tokens(batch=2, length=10, seed=0):
  return jax.random.randint(jax.random.key(seed), (batch, length), 0, 32)


def _init(model, tokens):
  return jax.jit(model.init)(jax.random.key(1), tokens)


def test_registry_shapes_and_output():
  model = build_model(TINY)
  tokens = _tokens()
  logits, out = jax.jit(model.apply)(_init(model, tokens), tokens)
  assert logits.shape == (2, 10, 32) and logits.dtype == jnp.float32
  assert out.cache is None and float(out.aux_loss) == 0.0


def test_bfloat16_compute_returns_float32_logits():
  model = build_model({**TINY, "dtype": "bfloat16"})
  tokens = _tokens()
  variables = _init(model, tokens)
  assert jax.tree.leaves(nn.meta.unbox(variables))[0].dtype == jnp.float32
  logits, _ = jax.jit(model.apply)(variables, tokens)
  assert logits.dtype == jnp.float32 and bool(jnp.isfinite(logits).all())


def test_causal():
  model = build_model(TINY)
  tokens = _tokens()
  variables = _init(model, tokens)
  apply = jax.jit(model.apply)
  base, _ = apply(variables, tokens)
  changed, _ = apply(variables, tokens.at[:, 6].set((tokens[:, 6] + 1) % 32))
  np.testing.assert_allclose(changed[:, :6], base[:, :6], atol=1e-6)
  assert jnp.abs(changed[:, 6:] - base[:, 6:]).max() > 1e-4


@pytest.mark.parametrize(
  "overrides",
  [
    dict(sliding_window=3, qk_norm=True, qk_norm_scope="projection", rope_scaling=LLAMA3),  # OLMoE qk-norm
    dict(num_kv_heads=1, qk_norm=True, qkv_bias=True, tie_embeddings=False),
    dict(**MLA, rope_scaling=YARN),
  ],
)  # DeepSeek-V3 attention
def test_cached_decoding_equals_full_forward(overrides):
  model = build_model({**TINY, **overrides})
  tokens = _tokens(length=10)
  variables = _init(model, tokens)
  apply = jax.jit(lambda v, t, c: model.apply(v, t, cache=c))
  full, _ = jax.jit(model.apply)(variables, tokens)
  cache = model.apply(variables, 2, 12, method="init_cache")
  if model.attention == "mla":  # the compressed cache: latent and one shared RoPE key per position
    assert len(cache) == 2 and (cache[0].latent.shape, cache[0].k_rope.shape) == ((2, 12, 6), (2, 12, 2))
  else:
    assert len(cache) == 2 and cache[0].k.shape == (2, 12, model.resolved_kv_heads, 4)
  logits, out = apply(variables, tokens[:, :4], cache)  # prefill, positions continue from the cache (0)
  steps = [logits]
  for t in range(4, 10):
    logits, out = apply(variables, tokens[:, t : t + 1], out.cache)
    steps.append(logits)
  np.testing.assert_allclose(jnp.concatenate(steps, axis=1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(out.cache[-1].length, [10, 10])


def test_explicit_positions_match_default_positions():
  model = build_model(TINY)
  tokens = _tokens()
  variables = _init(model, tokens)
  default, _ = jax.jit(model.apply)(variables, tokens)
  apply = jax.jit(lambda v, t, p: model.apply(v, t, positions=p))
  explicit, _ = apply(variables, tokens, jnp.broadcast_to(jnp.arange(10), (2, 10)))
  np.testing.assert_allclose(explicit, default, rtol=1e-6)
  shifted, _ = apply(variables, tokens, jnp.broadcast_to(jnp.arange(10) + 3, (2, 10)))
  np.testing.assert_allclose(shifted, default, rtol=1e-4, atol=1e-5)  # RoPE: a global shift changes nothing


def test_param_count_by_hand():
  cfg = dict(HAND_GQA, tie_embeddings=False)
  # embed 11*8; per layer: q 8*2*4 + k 8*1*4 + v 8*1*4 + out 2*4*8 = 192, SwiGLU 3*8*12 = 288, 2 norms 16;
  # final norm 8; lm_head 8*11.
  expected = 88 + 2 * (192 + 288 + 16) + 8 + 88
  for tie, count in ((False, expected), (True, expected - 88)):
    model = build_model({**cfg, "tie_embeddings": tie})
    assert count_params(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))) == count
    assert model.num_params() == count
  qwen = build_model({**cfg, "qk_norm": True, "qkv_bias": True, "mlp_activation": "gelu"})
  params = jax.eval_shape(qwen.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  # + q/k/v biases (8 + 4 + 4) and qk-norm scales (4 + 4) per layer; plain MLP 2*8*12 instead of 3*8*12.
  assert count_params(params) == qwen.num_params() == expected + 2 * (16 + 8 - 96)


def test_param_count_by_hand_mla_and_projection_qk_norm():
  cfg = dict(HAND, tie_embeddings=True)
  mla = build_model({**cfg, **MLA})
  # per layer: q_a 8*8 + q_a_norm 8 + q_b 8*2*(4+2) + kv_a 8*(6+2) + kv_a_norm 6 + kv_b 6*2*(4+6) + out 2*6*8
  # = 64 + 8 + 96 + 64 + 6 + 120 + 96 = 454; SwiGLU 288; 2 norms 16. Embedding 88, final norm 8.
  expected = 88 + 2 * (454 + 288 + 16) + 8
  params = jax.eval_shape(mla.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  assert count_params(params) == mla.num_params() == expected
  full_rank = build_model({**cfg, **MLA, "q_lora_rank": None})  # q: 8*2*6 = 96 instead of 64 + 8 + 96
  params = jax.eval_shape(full_rank.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  assert count_params(params) == full_rank.num_params() == expected - 2 * 72
  olmoe = build_model({**cfg, "num_kv_heads": 1, "head_dim": 4, "qk_norm": True, "qk_norm_scope": "projection"})
  # q/k/v/out 64 + 32 + 32 + 64, query_norm 2*4 and key_norm 1*4 per layer
  params = jax.eval_shape(olmoe.init, jax.random.key(0), jnp.zeros((1, 3), jnp.int32))
  assert count_params(params) == olmoe.num_params() == 88 + 2 * (192 + 12 + 288 + 16) + 8


def test_train_flops_per_token():
  model = build_model(dict(HAND_GQA, tie_embeddings=True))
  matmul = 2 * (192 + 288) + 88  # blocks' projections + the tied output projection
  assert model.train_flops_per_token(6) == 6 * matmul + 12 * 2 * 8 * 3.5
  mla = build_model(dict(HAND, **MLA))
  # matmuls: the 454 MLA parameters less the two latent norms (14), plus SwiGLU. Per key, q.k^T runs over
  # heads * (nope + rope) = 12 features and probs.v over heads * v = 12: the cost of a GQA attention of width 12.
  matmul = 2 * (454 - 14 + 288) + 88
  assert mla.train_flops_per_token(6) == 6 * matmul + 12 * 2 * 12 * 3.5


def test_one_optimizer_step_lowers_loss():
  model = build_model({**TINY, "dropout_rate": 0.1})
  tokens = _tokens(batch=4, length=12)
  params = nn.meta.unbox(_init(model, tokens))["params"]

  def loss_fn(params):
    logits, out = model.apply(
      {"params": params}, tokens[:, :-1], deterministic=False, rngs={"dropout": jax.random.key(2)}
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + out.aux_loss

  # Same batch and dropout mask: one compiled function gives the loss before and after the step.
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  before, grads = value_and_grad(params)
  assert all(bool(jnp.isfinite(g).all()) for g in jax.tree.leaves(grads))
  opt = optax.adam(1e-2)
  updates, _ = opt.update(grads, opt.init(params), params)
  after, _ = value_and_grad(optax.apply_updates(params, updates))
  assert after < before - 1e-3


def test_remat_same_gradients():
  tokens = _tokens()
  plain, remat = build_model({**TINY, "num_layers": 1}), build_model({**TINY, "num_layers": 1, "remat": True})
  params = _init(plain, tokens)

  def grads(model):
    return jax.jit(jax.grad(lambda p: model.apply(p, tokens)[0].sum()))(params)

  for a, b in zip(jax.tree.leaves(grads(plain)), jax.tree.leaves(grads(remat))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)  # float32 reassociation only


def test_sharded_forward_matches_unsharded():
  model = build_model(TINY)
  tokens = _tokens(batch=4)
  variables = _init(model, tokens)
  mesh = make_mesh({"data": 2, "fsdp": 2, "expert": 1, "tensor": 2})
  shardings = logical_to_sharding(nn.get_partition_spec(variables), mesh)
  assert shardings["params"]["embed"]["embedding"].spec == P("tensor", "fsdp")
  sharded = jax.device_put(nn.meta.unbox(variables), shardings)
  with jax.set_mesh(mesh), nn.logical_axis_rules(LOGICAL_AXIS_RULES):
    logits, _ = jax.jit(model.apply)(sharded, tokens)
  np.testing.assert_allclose(logits, jax.jit(model.apply)(variables, tokens)[0], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(num_kv_heads=3), "num_kv_heads=3"),
    (dict(embed_dim=18), "not divisible"),
    (dict(mlp_activation="tanh"), "choose one of"),
    (dict(sliding_window=0), "sliding_window=0"),
    (dict(dtype="float33"), "not a dtype"),
    (dict(num_layers=0), "num_layers=0"),
    (dict(attention="mqa"), r"attention='mqa' is invalid; choose one of \('gqa', 'mla'\)"),
    (dict(qk_norm_scope="layer"), "qk_norm_scope='layer' is invalid"),
    (dict(kv_lora_rank=8), "kv_lora_rank=8 is an MLA width"),
    (dict(MLA, kv_lora_rank=None), "kv_lora_rank=None must be a positive integer with attention='mla'"),
    (dict(MLA, qk_rope_head_dim=3), "qk_rope_head_dim=3 must be even"),
    (dict(MLA, num_kv_heads=2), "num_kv_heads=2 is a GQA option"),
    (dict(MLA, qk_norm=True), "qk_norm=True is a GQA option"),
    (dict(rope_scaling={"rope_type": "ntk", "factor": 2.0}), "rope_scaling: rope_scaling type 'ntk'"),
    (dict(rope_scaling={"rope_type": "yarn", "factor": 2.0}), r"needs \['original_max_position_embeddings'\]"),
  ],
)
def test_bad_config_raises(bad, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**TINY, **bad})


def test_bad_inputs_raise():
  model = build_model(TINY)
  variables = _init(model, _tokens())
  with pytest.raises(ValueError, match=r"\[batch, length\]"):
    model.apply(variables, jnp.zeros((5,), jnp.int32))
  cache = build_model({**TINY, "num_layers": 1}).init_cache(2, 8)
  with pytest.raises(ValueError, match="num_layers=2"):
    model.apply(variables, _tokens(), cache=cache)
