"""Shared layers: norms, RoPE, masks, attention (GQA, window, cache, extra masks), MLPs, block, accounting."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers import (
  MLP,
  Attention,
  DecoderBlock,
  DenseGeneral,
  Embed,
  KVCache,
  RMSNorm,
  apply_rope,
  attention_mask,
  count_params,
  dot_product_attention,
  mean_attended_keys,
  rms_norm,
  rope_frequencies,
  scaled_rope_frequencies,
  segment_mask,
  train_flops_per_token,
)
from zoo.layers.axes import LOGICAL_AXIS_RULES, MESH_AXES, logical_to_sharding, mesh_axes

LLAMA3 = {
  "rope_type": "llama3",
  "factor": 4.0,
  "low_freq_factor": 1.0,
  "high_freq_factor": 4.0,
  "original_max_position_embeddings": 16,
}
YARN = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 16}


def _positions(batch, length, start=0):
  return jnp.broadcast_to(jnp.arange(start, start + length), (batch, length))


def test_rms_norm_float32_math_and_scale():
  x = jax.random.normal(jax.random.key(0), (3, 8)).astype(jnp.bfloat16)
  norm = RMSNorm(dtype=jnp.bfloat16)
  params = nn.meta.unbox(norm.init(jax.random.key(1), x))
  assert params["params"]["scale"].shape == (8,)
  y = norm.apply(params, x)
  assert y.dtype == jnp.bfloat16
  xf = np.asarray(x, np.float64)
  expected = xf / np.sqrt((xf**2).mean(-1, keepdims=True) + 1e-6)
  np.testing.assert_allclose(np.asarray(y, np.float64), expected, rtol=1e-2)
  scale = jnp.arange(8.0)
  np.testing.assert_allclose(rms_norm(x, scale), rms_norm(x) * scale, rtol=1e-6)


def test_rope_relative_position_invariance():
  q = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  k = jax.random.normal(jax.random.key(1), (1, 1, 1, 16))

  def score(m, n):
    pm, pn = jnp.full((1, 1), m), jnp.full((1, 1), n)
    return float(jnp.sum(apply_rope(q, pm) * apply_rope(k, pn)))

  np.testing.assert_allclose(score(3, 1), score(10, 8), rtol=1e-4)
  np.testing.assert_allclose(score(0, 5), score(100, 105), rtol=1e-4)
  assert abs(score(3, 1) - score(3, 2)) > 1e-3  # the score does depend on the offset
  np.testing.assert_allclose(apply_rope(q, jnp.zeros((1, 1), jnp.int32)), q)  # position 0 is the identity
  rotated = apply_rope(q, jnp.full((1, 1), 7))
  np.testing.assert_allclose(jnp.linalg.norm(rotated), jnp.linalg.norm(q), rtol=1e-5)


def test_rope_pairs_halves_of_head_dim():
  # Feature i rotates with feature i + D/2 by angle position * theta^(-2i/D).
  x = jnp.zeros((1, 1, 1, 4)).at[..., 0].set(1.0)
  y = apply_rope(x, jnp.full((1, 1), 2), theta=100.0)
  np.testing.assert_allclose(y[0, 0, 0], [np.cos(2.0), 0.0, np.sin(2.0), 0.0], atol=1e-6)
  with pytest.raises(ValueError, match="even head_dim"):
    apply_rope(jnp.zeros((1, 1, 1, 3)), jnp.zeros((1, 1), jnp.int32))


def test_linear_rope_scaling_interpolates_positions():
  x = jax.random.normal(jax.random.key(0), (1, 3, 2, 8))
  pos = jnp.array([[0, 3, 7]])
  np.testing.assert_allclose(
    apply_rope(x, 2 * pos, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    apply_rope(x, pos),
    rtol=1e-5,
    atol=1e-6,
  )
  np.testing.assert_allclose(apply_rope(x, pos, rope_scaling={"rope_type": "default"}), apply_rope(x, pos))


def test_llama3_rope_scaling_by_wavelength():
  base = np.asarray(rope_frequencies(8, 5000.0), np.float64)
  scaled, factor = scaled_rope_frequencies(8, 5000.0, LLAMA3)
  wavelen = 2 * np.pi / base  # 6.3, 53, 447, 3761 against the band [16 / 4, 16 / 1]
  smooth = (16 / wavelen - 1.0) / (4.0 - 1.0)
  expected = np.where(wavelen < 4, base, np.where(wavelen > 16, base / 4, (1 - smooth) * base / 4 + smooth * base))
  assert factor == 1.0 and (wavelen[0] > 4) and (wavelen[0] < 16) and (wavelen[1:] > 16).all()
  np.testing.assert_allclose(scaled, expected, rtol=1e-6)


def test_yarn_rope_scaling_ramp_and_temperature():
  base = np.asarray(rope_frequencies(16, 10000.0))
  scaled, factor = scaled_rope_frequencies(16, 10000.0, YARN)
  # With 16 original positions only the fastest pair turns more than once per context (beta_slow=1): it keeps its
  # frequency, the others are interpolated by the factor (YaRN section 3.2).
  np.testing.assert_allclose(scaled, np.concatenate([base[:1], base[1:] / 4]), rtol=1e-6)
  assert factor == pytest.approx(0.1 * np.log(4.0) + 1)  # YaRN eq. 22
  x = jax.random.normal(jax.random.key(0), (1, 1, 1, 16))
  np.testing.assert_allclose(
    jnp.linalg.norm(apply_rope(x, jnp.full((1, 1), 5), rope_scaling=YARN)), factor * jnp.linalg.norm(x), rtol=1e-5
  )
  equal_mscales = scaled_rope_frequencies(16, 10000.0, {**YARN, "mscale": 1.0, "mscale_all_dim": 1.0})[1]
  assert equal_mscales == 1.0  # DeepSeek: the temperature moves to the softmax scale


@pytest.mark.parametrize(
  "scaling,match",
  [
    ({"rope_type": "dynamic", "factor": 2.0}, "not supported; choose one of"),
    ({"rope_type": "llama3", "factor": 8.0}, r"needs \['low_freq_factor', 'high_freq_factor'"),
    ({"rope_type": "linear", "factor": 0.0}, "must be positive"),
    ("yarn", "must be None or a dict"),
  ],
)
def test_rope_scaling_errors(scaling, match):
  with pytest.raises(ValueError, match=match):
    apply_rope(jnp.zeros((1, 1, 1, 4)), jnp.zeros((1, 1), jnp.int32), rope_scaling=scaling)


def test_attention_mask_causal_and_window():
  pos = _positions(1, 4)
  causal = attention_mask(pos, pos)[0, 0]
  np.testing.assert_array_equal(causal, np.tril(np.ones((4, 4), bool)))
  window = attention_mask(pos, pos, sliding_window=2)[0, 0]
  np.testing.assert_array_equal(window, np.tril(np.ones((4, 4), bool)) & ~np.tril(np.ones((4, 4), bool), -2))
  valid = attention_mask(pos, pos, k_valid=jnp.array([[True, True, False, True]]))[0, 0]
  assert not valid[:, 2].any() and valid[3, 3]


def test_gqa_equals_mha_with_repeated_kv_heads():
  kq, kk, kv = jax.random.split(jax.random.key(0), 3)
  q = jax.random.normal(kq, (2, 5, 6, 4))
  k = jax.random.normal(kk, (2, 7, 2, 4))
  v = jax.random.normal(kv, (2, 7, 2, 4))
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 5, 7)).at[..., 0].set(True)
  out = dot_product_attention(q, k, v, mask)
  # float64 numpy reference: query head h reads kv head h // 3.
  kr, vr = np.repeat(np.asarray(k, np.float64), 3, axis=2), np.repeat(np.asarray(v, np.float64), 3, axis=2)
  logits = np.einsum("bthd,bshd->bhts", np.asarray(q, np.float64), kr) / 2.0
  logits = np.where(np.asarray(mask), logits, -np.inf)
  probs = np.exp(logits - logits.max(-1, keepdims=True))
  probs /= probs.sum(-1, keepdims=True)
  np.testing.assert_allclose(out, np.einsum("bhts,bshd->bthd", probs, vr), rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    dot_product_attention(q, k[:, :, :1].repeat(4, axis=2), v[:, :, :1].repeat(4, axis=2))


def _attention_setup(**kwargs):
  attn = Attention(num_heads=4, head_dim=8, **kwargs)
  x = jax.random.normal(jax.random.key(0), (2, 9, 16))
  params = attn.init(jax.random.key(1), x, _positions(2, 9))
  return attn, params, x


@pytest.mark.parametrize(
  "kwargs",
  [
    dict(),
    dict(num_kv_heads=2, sliding_window=3, rope_scaling=YARN),
    dict(num_kv_heads=1, qk_norm=True, qkv_bias=True),
    dict(num_kv_heads=2, qk_norm=True, qk_norm_scope="projection", rope_scaling=LLAMA3),
    dict(use_rope=False, num_kv_heads=2),
  ],
)
def test_attention_cache_prefill_then_steps_equals_full(kwargs):
  attn, params, x = _attention_setup(**kwargs)
  apply = jax.jit(attn.apply)
  full, _ = apply(params, x, _positions(2, 9))
  cache = KVCache.create(2, 12, kwargs.get("num_kv_heads") or 4, 8)
  prefill, cache = apply(params, x[:, :4], _positions(2, 4), cache=cache)
  outs = [prefill]
  for t in range(4, 9):
    y, cache = apply(params, x[:, t : t + 1], _positions(2, 1, t), cache=cache)
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, rtol=1e-5, atol=1e-5)
  np.testing.assert_array_equal(cache.length, [9, 9])


def test_attention_is_causal_and_windowed():
  attn, params, x = _attention_setup(num_kv_heads=2, sliding_window=3)
  pos = _positions(2, 9)
  base, _ = attn.apply(params, x, pos)
  changed, _ = attn.apply(params, x.at[:, 5].add(1.0), pos)
  np.testing.assert_allclose(changed[:, :5], base[:, :5], atol=1e-6)
  assert jnp.abs(changed[:, 5:8] - base[:, 5:8]).min() > 1e-4  # positions 5..7 see position 5
  np.testing.assert_allclose(changed[:, 8:], base[:, 8:], atol=1e-6)  # position 8 sees 6..8 only


def test_attention_segment_mask_equals_separate_sequences():
  attn, params, x = _attention_setup(num_kv_heads=2)
  a, b = x[:, :4], x[:, 4:9]
  packed_pos = jnp.concatenate([_positions(2, 4), _positions(2, 5)], axis=1)
  seg = jnp.concatenate([jnp.zeros((2, 4), jnp.int32), jnp.ones((2, 5), jnp.int32)], axis=1)
  packed, _ = attn.apply(params, x, packed_pos, mask=segment_mask(seg, seg))
  ya, _ = attn.apply(params, a, _positions(2, 4))
  yb, _ = attn.apply(params, b, _positions(2, 5))
  np.testing.assert_allclose(packed, jnp.concatenate([ya, yb], axis=1), rtol=1e-5, atol=1e-5)
  unmasked, _ = attn.apply(params, x, packed_pos)
  assert jnp.abs(unmasked[:, 4:] - yb).max() > 1e-3


@pytest.mark.parametrize("scope", ["head", "projection"])
def test_qk_norm_scopes(scope):
  attn, params, x = _attention_setup(num_kv_heads=2, qk_norm=True, qk_norm_scope=scope)
  shapes = {"head": ((8,), (8,)), "projection": ((32,), (16,))}[scope]
  p = nn.meta.unbox(params)["params"]
  assert (p["query_norm"]["scale"].shape, p["key_norm"]["scale"].shape) == shapes
  p["query_norm"]["scale"] = jax.random.uniform(jax.random.key(2), shapes[0], minval=0.5, maxval=1.5)
  _, state = attn.apply({"params": p}, x, _positions(2, 9), capture_intermediates=True)
  q = np.asarray(state["intermediates"]["query"]["__call__"][0], np.float64)  # [B, T, H, D]
  normed = np.asarray(state["intermediates"]["query_norm"]["__call__"][0], np.float64)
  if scope == "projection":  # OLMoE: one RMS over all heads of the token
    q = q.reshape(2, 9, 32)
  expected = q / np.sqrt((q**2).mean(-1, keepdims=True) + 1e-6) * np.asarray(p["query_norm"]["scale"])
  np.testing.assert_allclose(normed, expected, rtol=1e-5, atol=1e-6)


def test_attention_rejects_bad_heads_and_positions():
  with pytest.raises(ValueError, match="multiple of num_kv_heads"):
    _attention_setup(num_kv_heads=3)
  with pytest.raises(ValueError, match=r"qk_norm_scope='layer' is invalid; choose one of \('head', 'projection'\)"):
    _attention_setup(qk_norm=True, qk_norm_scope="layer")
  attn, params, x = _attention_setup()
  with pytest.raises(ValueError, match="positions shape"):
    attn.apply(params, x, _positions(2, 8))


def test_kv_cache_update_and_read():
  cache = KVCache.create(2, 6, 1, 2)
  k = jnp.ones((2, 2, 1, 2))
  cache = cache.update(k, 2 * k, jnp.array([[0, 1], [3, 4]]))
  ks, vs, slots, valid = cache.read()
  np.testing.assert_array_equal(cache.length, [2, 5])
  np.testing.assert_array_equal(ks[0, :, 0, 0], [1, 1, 0, 0, 0, 0])
  np.testing.assert_array_equal(vs[1, :, 0, 0], [0, 0, 0, 2, 2, 0])
  np.testing.assert_array_equal(valid[1], [True] * 5 + [False])
  np.testing.assert_array_equal(slots[0], np.arange(6))
  with pytest.raises(ValueError, match="do not fit"):
    cache.update(jnp.ones((2, 2, 2, 2)), jnp.ones((2, 2, 2, 2)), jnp.zeros((2, 2), jnp.int32))
  with pytest.raises(ValueError, match="max_length=0"):
    KVCache.create(1, 0, 1, 2)


@pytest.mark.parametrize(
  "activation,gated,fn",
  [
    ("swiglu", True, jax.nn.silu),
    ("reglu", True, jax.nn.relu),
    ("gelu", False, jax.nn.gelu),
    ("relu", False, jax.nn.relu),
  ],
)
def test_mlp_variants(activation, gated, fn):
  mlp = MLP(hidden_dim=6, activation=activation)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  params = nn.meta.unbox(mlp.init(jax.random.key(1), x))["params"]
  assert ("gate" in params) == gated
  h = x @ params["up"]["kernel"]
  h = fn(x @ params["gate"]["kernel"]) * h if gated else fn(h)
  np.testing.assert_allclose(mlp.apply({"params": params}, x), h @ params["down"]["kernel"], rtol=1e-5, atol=1e-6)
  assert count_params(params) == (3 if gated else 2) * 4 * 6


def test_mlp_rejects_unknown_activation():
  with pytest.raises(ValueError, match="choose one of"):
    MLP(hidden_dim=4, activation="tanh").init(jax.random.key(0), jnp.ones((1, 1, 2)))


def test_embed_lookup_and_tied_attend():
  emb = Embed(num_embeddings=5, features=3)
  params = nn.meta.unbox(emb.init(jax.random.key(0), jnp.zeros((1,), jnp.int32)))
  table = params["params"]["embedding"]
  np.testing.assert_allclose(emb.apply(params, jnp.array([[4, 0]])), table[jnp.array([[4, 0]])])
  x = jnp.ones((2, 3))
  np.testing.assert_allclose(emb.apply(params, x, method="attend"), x @ table.T, rtol=1e-6)
  with pytest.raises(ValueError, match="integer ids"):
    emb.apply(params, jnp.zeros((2,)))


def test_dense_general_multi_axis_and_errors():
  dense = DenseGeneral(5, axis=(-2, -1), kernel_axes=("heads", "head_dim", "embed"), use_bias=True)
  x = jax.random.normal(jax.random.key(0), (2, 3, 4))
  params = nn.meta.unbox(dense.init(jax.random.key(1), x))["params"]
  assert params["kernel"].shape == (3, 4, 5) and params["bias"].shape == (5,)
  np.testing.assert_allclose(
    dense.apply({"params": params}, x), x.reshape(2, 12) @ params["kernel"].reshape(12, 5) + params["bias"], rtol=1e-5
  )
  with pytest.raises(ValueError, match="kernel_axes"):
    DenseGeneral(5, kernel_axes=("embed",)).init(jax.random.key(0), x)
  with pytest.raises(ValueError, match="trailing axes"):
    DenseGeneral(5, axis=0, kernel_axes=("embed", "mlp")).init(jax.random.key(0), x)


def test_all_logical_names_are_in_the_sharding_table():
  block = DecoderBlock(
    functools.partial(Attention, num_heads=2, head_dim=4, qk_norm=True, qkv_bias=True),
    functools.partial(MLP, hidden_dim=8),
  )
  x = jnp.ones((1, 3, 8))
  variables = jax.eval_shape(block.init, jax.random.key(0), x, _positions(1, 3))
  names = {n for box in jax.tree.leaves(variables, is_leaf=lambda b: isinstance(b, nn.Partitioned)) for n in box.names}
  assert names <= {name for name, _ in LOGICAL_AXIS_RULES}
  assert {"embed", "heads", "kv_heads", "head_dim", "mlp", "norm"} <= names


def test_axis_table_maps_onto_mesh_axes_and_the_engine_reexports_it():
  for name, _ in LOGICAL_AXIS_RULES:
    assert set(mesh_axes(name)) <= set(MESH_AXES), name
  assert mesh_axes("batch") == ("data", "fsdp", "expert") and mesh_axes("length") == ()
  with pytest.raises(ValueError, match="'rows' is not in the logical-axis rules"):
    mesh_axes("rows")
  mesh = jax.make_mesh((2, 1, 4, 1), MESH_AXES, axis_types=(jax.sharding.AxisType.Auto,) * 4)
  sharding = logical_to_sharding({"w": jax.sharding.PartitionSpec("expert", "embed", "expert_mlp")}, mesh)["w"]
  assert sharding.spec == jax.sharding.PartitionSpec("expert", "fsdp", "tensor")
  from zoo.engine import sharding as engine_sharding

  assert engine_sharding.LOGICAL_AXIS_RULES is LOGICAL_AXIS_RULES
  assert engine_sharding.logical_to_sharding is logical_to_sharding


def test_packages_below_the_engine_do_not_import_it():
  import pathlib
  import re

  root = pathlib.Path(__file__).resolve().parents[1] / "zoo"
  offenders = [
    f"{path.relative_to(root.parent)}:{i}"
    for package in ("layers", "routing", "models", "checkpoints")
    for path in sorted((root / package).glob("*.py"))
    for i, line in enumerate(path.read_text().splitlines(), 1)
    if re.match(r"\s*(from|import)\s+zoo\.engine\b", line)
  ]
  assert not offenders, f"these lines import zoo.engine: {offenders}"


class _AuxFFN(nn.Module):
  """An FFN that returns an aux pytree and takes an extra keyword, like a routed FFN."""

  @nn.compact
  def __call__(self, x, *, deterministic, scale):
    y = nn.Dense(x.shape[-1], use_bias=False)(x) * scale
    return y, {"load": jnp.sum(y**2), "deterministic": jnp.asarray(deterministic)}


def test_decoder_block_pluggable_ffn_with_aux_and_remat():
  attn = functools.partial(Attention, num_heads=2, head_dim=4)
  x = jax.random.normal(jax.random.key(0), (2, 3, 8))
  pos = _positions(2, 3)
  block = DecoderBlock(attn, _AuxFFN)
  params = block.init(jax.random.key(1), x, pos, ffn_kwargs={"scale": 2.0})
  apply = jax.jit(lambda p, scale: block.apply(p, x, pos, ffn_kwargs={"scale": scale}))
  y, cache, aux = apply(params, 2.0)
  assert y.shape == x.shape and cache is None and set(aux) == {"load", "deterministic"}
  _, _, aux0 = apply(params, 0.0)
  assert float(aux0["load"]) == 0.0 and float(aux["load"]) > 0.0
  remat_block = nn.remat(DecoderBlock, static_argnums=(5,))(attn, _AuxFFN)
  y2, _, _ = jax.jit(lambda p: remat_block.apply(p, x, pos, None, None, True, {"scale": 2.0}))(params)
  np.testing.assert_allclose(y2, y, rtol=1e-6)
  # The plain MLP returns no aux.
  plain = DecoderBlock(attn, functools.partial(MLP, hidden_dim=8))
  assert plain.apply(plain.init(jax.random.key(1), x, pos), x, pos)[2] is None


def test_flops_accounting():
  assert mean_attended_keys(4) == 2.5
  assert mean_attended_keys(4, causal=False) == 4.0
  assert mean_attended_keys(4, sliding_window=2) == (1 + 2 + 2 + 2) / 4
  # PaLM appendix B: 6N + 12 L H Q T for full attention.
  assert train_flops_per_token(1000, num_layers=2, attention_dim=16, seq_len=8, causal=False) == 6000 + 12 * 2 * 16 * 8
  assert train_flops_per_token(1000, num_layers=2, attention_dim=16, seq_len=8) == 6000 + 12 * 2 * 16 * 4.5
