"""Mixture-of-Recursions: depth-routing primitives (`zoo/routing/depth.py`) and the `mor` model."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.layers import MLP, Attention, DecoderBlock, count_params, train_flops_per_token as dense_train_flops
from zoo.models import ConfigError, build_model, mor
from zoo.routing import depth as D

# ----------------------------------------------------------------------------------------------- routing primitives


def test_default_capacities_and_k():
  assert D.default_capacities(3) == pytest.approx((1.0, 2 / 3, 1 / 3))
  assert [D.capacity_to_k(c, 12) for c in D.default_capacities(3)] == [12, 8, 4]
  assert [D.capacity_to_k(c, 10) for c in D.default_capacities(2)] == [10, 5]
  assert D.capacity_to_k(0.01, 10) == 1
  with pytest.raises(ValueError, match="non-increasing"):
    D.validate_capacities((0.5, 1.0), 2)
  with pytest.raises(ValueError, match="num_recursions"):
    D.validate_capacities((1.0,), 2)


def test_capacity_warmup_goes_from_one_to_target():
  caps = (1.0, 0.5)
  np.testing.assert_allclose(D.capacity_at_step(caps, 0, warmup_steps=10), [1.0, 1.0])
  np.testing.assert_allclose(D.capacity_at_step(caps, 5, warmup_steps=10), [1.0, 0.75], atol=1e-6)
  np.testing.assert_allclose(D.capacity_at_step(caps, 50, warmup_steps=10), [1.0, 0.5])
  np.testing.assert_allclose(D.capacity_at_step(caps, None, warmup_steps=10), [1.0, 0.5])


def test_hierarchical_topk_by_hand():
  scores = jnp.array([[0.9, 0.1, 0.8, 0.7, 0.2, 0.95]])
  all_on = jnp.ones_like(scores, bool)
  step1 = D.hierarchical_topk(scores, all_on, 4)
  np.testing.assert_array_equal(step1, [[1, 0, 1, 1, 0, 1]])
  # Step 2 rescored: token 1 now has the best score but was dropped at step 1, so it cannot come back.
  scores2 = jnp.array([[0.3, 0.99, 0.1, 0.6, 0.98, 0.5]])
  step2 = D.hierarchical_topk(scores2, step1, 2)
  np.testing.assert_array_equal(step2, [[0, 0, 0, 1, 0, 1]])
  np.testing.assert_array_equal(D.chosen_indices(step2, 2), [[3, 5]])  # causal order
  # Traced k (capacity warm-up) gives the same selection.
  traced = jax.jit(D.hierarchical_topk)(scores2, step1, jnp.int32(2))
  np.testing.assert_array_equal(traced, step2)


def test_hierarchical_topk_random_properties():
  rng = np.random.default_rng(0)
  scores = jnp.asarray(rng.normal(size=(3, 17)), jnp.float32)
  prev = jnp.asarray(rng.random((3, 17)) < 0.7)
  k = 5
  chosen = np.asarray(D.hierarchical_topk(scores, prev, k))
  for b in range(3):
    active = np.flatnonzero(np.asarray(prev[b]))
    best = active[np.argsort(-np.asarray(scores[b])[active], kind="stable")[:k]]
    np.testing.assert_array_equal(np.flatnonzero(chosen[b]), np.sort(best))


def test_bce_aux_loss_matches_numpy():
  logits = jnp.array([[2.0, -1.0, 0.5, 3.0]])
  targets = jnp.array([[1, 0, 0, 1]], bool)
  valid = jnp.array([[1, 1, 1, 0]], bool)
  p = 1 / (1 + np.exp(-np.asarray(logits[0, :3], np.float64)))
  t = np.array([1, 0, 0])
  want = -np.mean(t * np.log(p) + (1 - t) * np.log(1 - p))
  np.testing.assert_allclose(D.bce_aux_loss(logits, targets, valid), want, rtol=1e-6)
  np.testing.assert_array_equal(D.causal_decision(logits, valid), [[1, 0, 1, 0]])


def test_token_choice_route_and_bias():
  logits = jnp.array([[[2.0, 0.0, 0.0], [0.0, 0.0, 1.0]]])
  depth_index, weight, probs = D.token_choice_route(logits)
  np.testing.assert_array_equal(depth_index, [[0, 2]])
  np.testing.assert_allclose(weight, [[probs[0, 0, 0], probs[0, 1, 2]]])
  biased, weight_b, _ = D.token_choice_route(logits, bias=jnp.array([0.0, 1.0, 0.0]))
  np.testing.assert_array_equal(biased, [[1, 1]])
  np.testing.assert_allclose(weight_b, [[probs[0, 0, 1], probs[0, 1, 1]]])  # the bias only picks, never weights
  sig_index, sig_weight, _ = D.token_choice_route(logits, "sigmoid")
  np.testing.assert_array_equal(sig_index, [[0, 2]])
  np.testing.assert_allclose(sig_weight, jax.nn.sigmoid(jnp.array([[2.0, 1.0]])))
  with pytest.raises(ValueError, match="softmax"):
    D.token_choice_route(logits, "relu")


def test_depth_histogram():
  depth = jnp.array([[1, 3, 2, 3], [0, 1, 1, 3]])
  mask = jnp.array([[1, 1, 1, 1], [1, 1, 1, 0]])
  hist, reached = D.depth_histogram(depth, 3, mask)
  np.testing.assert_allclose(hist, np.array([1, 3, 1, 2]) / 7)
  np.testing.assert_allclose(reached, np.array([6, 3, 2]) / 7)


# ---------------------------------------------------------------------------------------------------------- model

TINY = dict(vocab_size=37, embed_dim=32, num_heads=2, num_kv_heads=1, head_dim=16, mlp_dim=48)


def make(**kw):
  return mor.MoRLM(**{**TINY, "num_layers": 4, **kw})


def jitted(model):
  """model.apply and model.init under jit (keeps the file fast on 2 cores)."""
  return (jax.jit(model.apply, static_argnames=("deterministic", "method", "mutable")), jax.jit(model.init))


def tokens(b=2, t=12, seed=0):
  return jax.random.randint(jax.random.key(seed), (b, t), 0, TINY["vocab_size"])


def test_layer_schedules_by_hand():
  assert mor.layer_schedule("cycle", 6, 3) == (2, None, ((0, 1), (0, 1), (0, 1)), None)
  assert mor.layer_schedule("sequence", 6, 3) == (2, None, ((0, 0), (0, 1), (1, 1)), None)
  assert mor.layer_schedule("middle_cycle", 8, 3) == (4, 0, ((1, 2), (1, 2), (1, 2)), 3)
  assert mor.layer_schedule("middle_sequence", 6, 2) == (4, 0, ((1, 1), (2, 2)), 3)
  with pytest.raises(ConfigError, match="multiple of num_recursions"):
    mor.layer_schedule("middle_cycle", 6, 3)
  with pytest.raises(ConfigError, match="sharing"):
    mor.layer_schedule("ring", 6, 3)


@pytest.mark.parametrize(
  "sharing,num_layers,unique", [("cycle", 6, 2), ("sequence", 6, 2), ("middle_cycle", 8, 4), ("middle_sequence", 8, 4)]
)
@pytest.mark.parametrize("router", ["none", "expert", "token"])
def test_param_counts(sharing, num_layers, unique, router):
  model = make(sharing=sharing, num_layers=num_layers, num_recursions=3, router=router)
  params = jax.eval_shape(model.init, jax.random.key(0), tokens())["params"]
  block = DecoderBlock(
    functools.partial(Attention, num_heads=2, num_kv_heads=1, head_dim=16), functools.partial(MLP, hidden_dim=48)
  )
  per_layer = count_params(
    jax.eval_shape(block.init, jax.random.key(0), jnp.zeros((1, 4, 32)), jnp.zeros((1, 4), jnp.int32))["params"]
  )
  d = TINY["embed_dim"]
  routers = {"none": 0, "expert": 3 * d, "token": 3 * d}[router]
  want = TINY["vocab_size"] * d + d + unique * per_layer + routers
  assert count_params(params) == want == model.num_params()


@pytest.mark.parametrize(
  "kw",
  [
    dict(router="expert", causal_router="aux_router", router_arch="mlp"),
    dict(router="token", router_arch="mlp", tie_embeddings=False),
  ],
)
def test_num_params_matches_init(kw):
  model = make(num_recursions=2, **kw)
  assert count_params(jax.eval_shape(model.init, jax.random.key(0), tokens())["params"]) == model.num_params()


def test_training_capacity_and_hierarchy():
  model = make(num_recursions=3, num_layers=5, sharing="middle_cycle", router="expert")
  apply, init = jitted(model)
  x = tokens(t=12)
  _, out = apply(init(jax.random.key(1), x), x, deterministic=False)
  np.testing.assert_allclose(out.metrics["depth_reached"], [1.0, 8 / 12, 4 / 12], atol=1e-6)
  np.testing.assert_allclose(out.metrics["capacity_usage"], [1.0, 1.0, 1.0], atol=1e-6)
  # Every token runs 1..3 recursions: 1/3 each (hierarchical: reaching depth 3 implies depth 2).
  np.testing.assert_allclose(out.metrics["depth_hist"], [0.0, 1 / 3, 1 / 3, 1 / 3], atol=1e-6)


def test_gathered_topk_equals_masked_topk(monkeypatch):
  """The static-k path (block on gathered tokens) == the traced-k path (block on all tokens, masked)."""
  x = tokens(t=12)
  plain = make(num_recursions=3, num_layers=3, sharing="cycle")
  warm = make(num_recursions=3, num_layers=3, sharing="cycle", capacity_warmup_steps=5)
  v = jax.jit(plain.init)(jax.random.key(2), x)
  gathered, chosen_indices = [], D.chosen_indices
  monkeypatch.setattr(D, "chosen_indices", lambda chosen, k: gathered.append(k) or chosen_indices(chosen, k))
  want, _ = jitted(plain)[0](v, x, deterministic=False)
  assert gathered == [8, 4]  # recursions 1 and 2 run the block on their 8 and 4 chosen tokens only
  warm_apply = jitted(warm)[0]
  (got, _), state = warm_apply(
    {**v, "routing_state": {"step": jnp.int32(5)}}, x, deterministic=False, mutable=("routing_state",)
  )
  np.testing.assert_allclose(got, want, atol=1e-5)
  assert int(state["routing_state"]["step"]) == 6
  (early, _), _ = warm_apply(
    {**v, "routing_state": {"step": jnp.int32(0)}}, x, deterministic=False, mutable=("routing_state",)
  )
  assert not np.allclose(early, want, atol=1e-3)  # capacity 1 at step 0: every token runs every recursion


VARIANTS = [
  dict(router="expert", kv_mode="recursion"),
  dict(router="expert", kv_mode="share", causal_router="aux_router", router_arch="mlp"),
  dict(router="token", kv_mode="recursion"),
  dict(router="token", kv_mode="share"),
  dict(router="none", kv_mode="recursion"),
]


def _random_variables(model, x, seed):
  """Init with large router weights so that depths differ between tokens."""
  v = jax.jit(model.init)(jax.random.key(seed), x)
  return jax.tree_util.tree_map_with_path(lambda p, a: a * 30 if "router" in jax.tree_util.keystr(p) else a, v)


@pytest.mark.parametrize("kw", VARIANTS, ids=lambda kw: "-".join(str(v) for v in kw.values()))
def test_cached_decoding_equals_full_forward(kw):
  """Decoding with a cache uses the causal rule whatever eval_routing says (the model decodes with the default,
  'topk'), so it equals the full forward under eval_routing='causal'."""
  model = make(num_recursions=3, num_layers=5, sharing="middle_cycle", **kw)
  assert model.eval_routing == "topk"
  x = tokens(b=2, t=9, seed=3)
  v = _random_variables(model, x, 4)
  apply = jitted(model.clone(eval_routing="causal"))[0]
  full, out = apply(v, x)
  hist = np.asarray(out.metrics["depth_hist"])
  if kw["router"] != "none":
    assert np.count_nonzero(hist) > 1, "test needs tokens of different depths"
  cache = model.apply(v, 2, 16, method="init_cache")
  step = jax.jit(lambda v, x, c: model.apply(v, x, cache=c))
  logits, o = step(v, x[:, :4], cache)  # prefill, then one token at a time
  pieces = [logits]
  cache = o.cache
  for i in range(4, 9):
    logits, o = step(v, x[:, i : i + 1], cache)
    pieces.append(logits)
    cache = o.cache
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=2e-5)
  np.testing.assert_array_equal(cache["length"], [9, 9])
  # One sequence alone: a token that leaves early skips the remaining recursions (nothing else in the batch runs
  # them), and the logits stay those of the full forward.
  one = model.apply(v, 1, 16, method="init_cache")
  pieces = []
  for i in range(9):
    logits, o = step(v, x[:1, i : i + 1], one)
    pieces.append(logits)
    one = o.cache
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full[:1], atol=2e-5)
  if kw["router"] != "none":
    assert np.asarray(apply(v, x[:1], method="depth_per_token")).min() < 3, "test needs an early exit in row 0"
  if kw["kv_mode"] == "recursion":  # recursion r caches the tokens that ran it: nested sets, the same depths
    active = np.asarray(cache["active"][:, :, :9])
    assert np.all(active[1:] <= active[:-1]) and not cache["active"][:, :, 9:].any()
    np.testing.assert_allclose(np.bincount(active.sum(0).ravel(), minlength=4) / 18, hist, atol=1e-6)


@pytest.mark.parametrize("kw", VARIANTS[:3], ids=["expert", "expert-share-aux_router", "token"])
def test_causal_inference_future_does_not_change_past(kw):
  model = make(num_recursions=3, num_layers=3, sharing="cycle", eval_routing="causal", **kw)
  x = tokens(b=1, t=10, seed=5)
  y = x.at[:, 6:].set((x[:, 6:] + 7) % TINY["vocab_size"])
  v = _random_variables(model, x, 6)
  apply = jitted(model)[0]
  (a, out), sown_x = apply(v, x, mutable=("intermediates",))
  (b, _), sown_y = apply(v, y, mutable=("intermediates",))
  np.testing.assert_allclose(a[:, :6], b[:, :6], atol=1e-5)
  assert not np.allclose(a[:, 6:], b[:, 6:], atol=1e-3)
  assert set(sown_x["intermediates"]) == set(model.exposes) == {"depth"}
  depth_x, depth_y = np.asarray(sown_x["intermediates"]["depth"]), np.asarray(sown_y["intermediates"]["depth"])
  assert depth_x.dtype == np.int32 and depth_x.shape == x.shape
  np.testing.assert_array_equal(depth_x, apply(v, x, method="depth_per_token"))  # what evaluation plots
  np.testing.assert_array_equal(depth_x[:, :6], depth_y[:, :6])
  np.testing.assert_allclose(np.bincount(depth_x.ravel(), minlength=4) / 10, out.metrics["depth_hist"], atol=1e-6)


# ---------------------------------------------- the authors' rules (raymin0223/mixture_of_recursions), worked by hand


class AffineBlocks(mor.MoRLM):
  """MoR whose recursion r runs the token-wise `Block_r(h) = (r + 2) h + 1` instead of the shared layers (a block
  output holds its own residual, as a decoder layer's does), and whose logits are the final hidden states, so that
  the routing and update rules can be worked by hand in numpy."""

  def _shared_layers(self, r, x, positions, mask, kv, skip_unless=None):
    return (r + 2.0) * x + 1.0, tuple(kv)

  def _coda(self, h, positions, cache, new_cache):
    return h


def _block(r, h):
  return (r + 2.0) * h + 1.0


def _set_params(model, x, embedding, routers):
  """Initialised parameters with the embedding table and the router kernels ({name: [d, out]}) replaced."""
  params = nn.meta.unbox(jax.jit(model.init)(jax.random.key(0), x)["params"])
  params["embed"]["embedding"] = jnp.asarray(embedding, jnp.float32)
  for name, kernel in routers.items():
    params[name]["out"]["kernel"] = jnp.asarray(kernel, jnp.float32)
  return {"params": params}


def _unit(d, i, out=1, scale=1.0):
  kernel = np.zeros((d, out))
  kernel[i, :] = scale
  return kernel


def _softplus(z):
  return np.log1p(np.exp(-np.abs(z))) + np.maximum(z, 0)


def _bce(logits, targets):
  """Per-token binary cross-entropy with logits (float64)."""
  return _softplus(logits) - logits * targets


def _topk_rows(scores, active, k):
  """Per row, the k highest scores among the active positions (numpy)."""
  out = np.zeros(scores.shape, bool)
  for b in range(scores.shape[0]):
    idx = np.flatnonzero(active[b])
    out[b, idx[np.argsort(-scores[b, idx], kind="stable")[:k]]] = True
  return out


def _sigmoid(z):
  return 1 / (1 + np.exp(-z))


def _token_choice_case():
  """Token-choice, N_r = 3, one router logit per depth read off the embedding's first 3 features."""
  d = TINY["embed_dim"]
  model = AffineBlocks(**{**TINY, "num_layers": 3, "num_recursions": 3, "sharing": "cycle", "router": "token"})
  embedding = np.random.default_rng(0).normal(size=(TINY["vocab_size"], d)) * 0.3
  embedding[0, :3], embedding[1, :3], embedding[2, :3] = [2.0, 0.0, 0.0], [0.0, 2.0, 0.5], [0.0, 0.5, 2.0]
  x = jnp.array([[0, 1, 2, 1], [2, 2, 0, 1]], jnp.int32)
  router = np.zeros((d, 3))
  router[:3, :3] = np.eye(3)
  return model, x, embedding, _set_params(model, x, embedding, {"depth_router": router})


def test_token_choice_leaves_with_stack_input_plus_weighted_last_block():
  """Authors' `model/mor_model/token_choice_router.py` (MoRLlamaDecoderLayer.forward): `final_x` starts as a copy of
  the stack's input h_0 and receives `w * Block_j(h_j)` at the token's last recursion j (scatter_add); the recursions
  before run unweighted, `h_{r+1} = Block_r(h_r)` (`updates`). Not `h_j + w * Block_j(h_j)`."""
  model, x, embedding, v = _token_choice_case()
  (h, _), sown = jax.jit(functools.partial(model.apply, mutable=("intermediates",)))(v, x)
  h0 = embedding[np.asarray(x)]
  logits = h0[..., :3]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  depth = np.array([[0, 1, 2, 1], [2, 2, 0, 1]])  # the largest logit of tokens 0, 1, 2
  np.testing.assert_array_equal(sown["intermediates"]["depth"], depth + 1)
  want = np.empty_like(h0)
  for b, t in np.ndindex(*depth.shape):
    j, state = depth[b, t], h0[b, t]
    for r in range(j):
      state = _block(r, state)
    want[b, t] = h0[b, t] + probs[b, t, j] * _block(j, state)
  # e.g. a depth-1 token: h_0 + w (3 (2 h_0 + 1) + 1) = h_0 + w (6 h_0 + 4)
  np.testing.assert_allclose(want[0, 1], h0[0, 1] + probs[0, 1, 1] * (6 * h0[0, 1] + 4), rtol=1e-12)
  np.testing.assert_allclose(h, want, rtol=1e-5, atol=1e-5)


def test_token_choice_balance_loss_over_the_whole_batch():
  """Authors' `token_choice_router.py`: `P_i = sum(router_probs, dim=(0, 1)) / (bs * seq_len)`, `f_i = N_r *
  bincount(top_expert_indices) / (bs * seq_len)`, loss `sum_i P_i f_i`: one balance over every token of the batch,
  not per sequence."""
  model, x, embedding, v = _token_choice_case()
  _, out = jax.jit(functools.partial(model.apply, deterministic=False))(v, x)
  logits = embedding[np.asarray(x)][..., :3]
  probs = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
  depth = np.array([[0, 1, 2, 1], [2, 2, 0, 1]])
  p = probs.reshape(-1, 3).mean(0)
  f = 3 * np.bincount(depth.ravel(), minlength=3) / depth.size
  want = np.sum(p * f)
  per_sequence = np.mean([np.sum(probs[b].mean(0) * 3 * np.bincount(depth[b], minlength=3) / 4) for b in range(2)])
  assert abs(want - per_sequence) > 1e-3  # the two rules differ on this batch
  np.testing.assert_allclose(out.metrics["router_balance_loss"], want, rtol=1e-5)
  z = np.mean(np.log(np.exp(logits).sum(-1)) ** 2)
  np.testing.assert_allclose(out.aux_loss, 0.1 * want + 1e-5 * z, rtol=1e-5)


def _expert_choice_case(num_recursions, x):
  """Expert-choice with router r's logit read off feature (1, 0, 2)[r] of the hidden state."""
  d = TINY["embed_dim"]
  model = AffineBlocks(
    **{**TINY, "num_layers": num_recursions, "num_recursions": num_recursions, "sharing": "cycle", "router": "expert"}
  )
  embedding = np.random.default_rng(1).normal(size=(TINY["vocab_size"], d)) * 0.5
  embedding[:8, 0] = [3.0, -1.0, 2.0, -2.0, 1.0, -3.0, 0.5, 0.2]
  routers = {f"step_routers_{r}": _unit(d, (1, 0, 2)[r]) for r in range(num_recursions)}
  return model, embedding, _set_params(model, x, embedding, routers)


def test_expert_choice_evaluates_with_topk_by_default_and_causal_on_request():
  """Authors' `model/mor_model/expert_choice_router.py`: `top_k = max(1, int(capacity_factor * seq_len))` and
  `torch.topk(router_probs, top_k, dim=1)` run in eval mode too (at the target capacity); `sigmoid >= 0.5` only
  feeds the training metric `sampling_acc`. eval_routing='topk' (default) is that rule; 'causal' the per-token
  decision."""
  x = jnp.arange(8, dtype=jnp.int32)[None]
  model, embedding, v = _expert_choice_case(2, x)
  h0 = embedding[:8][None]
  g0 = 0.1 * _sigmoid(h0[..., 1])
  h1 = h0 + g0[..., None] * _block(0, h0)  # capacity 1: every token runs recursion 0
  l1 = h1[..., 0]
  g1 = 0.1 * _sigmoid(l1)
  topk = _topk_rows(g1, np.ones_like(g1, bool), 4)  # int(0.5 * 8)
  causal = l1 >= 0
  np.testing.assert_array_equal(topk, [[1, 0, 1, 0, 1, 0, 1, 0]])
  np.testing.assert_array_equal(causal, [[1, 0, 1, 0, 1, 0, 1, 1]])  # the last token differs

  def final(chosen):
    return np.where(chosen[..., None], h1 + g1[..., None] * _block(1, h1), h1)

  apply = jax.jit(model.apply, static_argnames=("deterministic", "mutable"))
  (h, _), sown = apply(v, x, mutable=("intermediates",))
  assert model.eval_routing == "topk"
  np.testing.assert_allclose(h, final(topk), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(sown["intermediates"]["depth"], 1 + topk)
  trained, _ = apply(v, x, deterministic=False)  # the training rule, the same selection
  np.testing.assert_allclose(trained, h, rtol=1e-6, atol=1e-6)
  causal_model = model.clone(eval_routing="causal")
  (h, _), sown = jax.jit(functools.partial(causal_model.apply, mutable=("intermediates",)))(v, x)
  np.testing.assert_allclose(h, final(causal), rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(sown["intermediates"]["depth"], 1 + causal)


def test_bce_in_every_expert_choice_recursion_including_the_first():
  """Authors' `expert_choice_router.py`: in training every expert-choice layer scatters its top-k indices into 0/1
  targets and adds `BCEWithLogitsLoss(reduction='sum')(logits, targets) / (bs * scored tokens)`, recursion 0
  included (capacity 1: every target is 1); `modeling_llama.py` sums the layers' losses."""
  x = jnp.array([[0, 1, 2, 3, 4, 5], [6, 7, 5, 3, 1, 0]], jnp.int32)
  model, embedding, v = _expert_choice_case(3, x)
  _, out = jax.jit(functools.partial(model.apply, deterministic=False))(v, x)
  h0 = embedding[np.asarray(x)]
  # Recursion 0, k = 6 of 6: every target 1.
  l0 = h0[..., 1]
  bce0, acc0 = _bce(l0, 1.0).mean(), np.mean(l0 >= 0)
  h1 = h0 + (0.1 * _sigmoid(l0))[..., None] * _block(0, h0)
  # Recursion 1, k = 4 of the 6 tokens.
  l1 = h1[..., 0]
  t1 = _topk_rows(l1, np.ones(l1.shape, bool), 4)
  bce1, acc1 = _bce(l1, t1).mean(), np.mean((l1 >= 0) == t1)
  h2 = np.where(t1[..., None], h1 + (0.1 * _sigmoid(l1))[..., None] * _block(1, h1), h1)
  # Recursion 2, k = 2 of the 4 tokens recursion 1 kept; the mean is over those 4 per row.
  l2 = h2[..., 2]
  t2 = _topk_rows(l2, t1, 2)
  bce2, acc2 = _bce(l2, t2)[t1].mean(), np.mean(((l2 >= 0) == t2)[t1])
  assert bce0 > 0.1  # recursion 0 counts
  np.testing.assert_allclose(out.metrics["router_bce_loss"], bce0 + bce1 + bce2, rtol=1e-5)
  np.testing.assert_allclose(out.aux_loss, 1e-3 * (bce0 + bce1 + bce2), rtol=1e-5)
  np.testing.assert_allclose(out.metrics["router_decision_accuracy"], (acc0 + acc1 + acc2) / 3, rtol=1e-6)


def _lm_loss(model, params, x):
  logits, out = model.apply({"params": params}, x, deterministic=False)
  return optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], x[:, 1:]).mean() + out.aux_loss


def test_train_steps_lower_loss_and_reach_expert_routers():
  model = make(num_recursions=2, num_layers=4, router="expert", causal_router="aux_router")
  x = tokens(b=4, t=16)
  params = jax.jit(model.init)(jax.random.key(8), x)["params"]
  opt = optax.adam(3e-3)
  state = opt.init(params)

  @jax.jit
  def step(params, state):
    value, g = jax.value_and_grad(functools.partial(_lm_loss, model))(params, x)
    updates, state = opt.update(g, state)
    return optax.apply_updates(params, updates), state, value, g

  losses_seen = []
  for i in range(12):
    params, state, value, grads = step(params, state)
    losses_seen.append(float(value))
    if i == 0:  # the gate carries the LM gradient into the step router; the BCE trains the auxiliary router
      for name in ("step_routers_0", "step_routers_1", "aux_routers_1"):
        assert float(optax.tree.norm(nn.meta.unbox(grads[name]))) > 0, name
  assert losses_seen[-1] < losses_seen[0] - 0.5


def test_gradients_reach_token_router():
  model = make(num_recursions=2, num_layers=4, sharing="middle_cycle", router="token")
  x = tokens()
  v = jax.jit(model.init)(jax.random.key(7), x)
  grads = nn.meta.unbox(jax.jit(jax.grad(functools.partial(_lm_loss, model)))(v["params"], x))
  assert float(optax.tree.norm(grads["depth_router"])) > 0


def test_loss_free_bias_updates_in_training_only():
  model = make(num_recursions=2, router="token", balance_bias_rate=0.01)
  x = tokens()
  apply, init = jitted(model)
  v = init(jax.random.key(9), x)
  np.testing.assert_array_equal(v["routing_state"]["depth_bias"], [0.0, 0.0])
  _, state = apply(v, x, deterministic=False, mutable=("routing_state",))
  bias = np.asarray(state["routing_state"]["depth_bias"])
  assert np.all(np.abs(bias) == pytest.approx(0.01)) and bias.sum() == pytest.approx(0.0)
  _, state = apply(v, x, deterministic=True, mutable=("routing_state",))
  np.testing.assert_array_equal(state["routing_state"]["depth_bias"], [0.0, 0.0])


@pytest.mark.parametrize(
  "kw,match",
  [
    (dict(router="mixed"), "router"),
    (dict(kv_mode="share", capacities=(0.5, 0.5)), "share"),
    (dict(capacities=(1.0, 1.5)), "capacities"),
    (dict(num_layers=5, sharing="cycle"), "num_layers"),
    (dict(head_dim=15), "even"),
    (dict(num_kv_heads=3), "divide"),
    (dict(gate_scale=-1.0), "gate_scale"),
    (dict(dtype="float33"), "dtype"),
    (dict(kv_mode="both"), "kv_mode"),
    (dict(eval_routing="future"), "eval_routing"),
  ],
)
def test_bad_config_raises(kw, match):
  with pytest.raises(ConfigError, match=match):
    make(num_recursions=2, **kw)


def test_registry_builds_mor():
  model = build_model({"name": "mor", **TINY, "num_layers": 4, "num_recursions": 2, "router": "none"})
  assert isinstance(model, mor.MoRLM)


def test_old_key_names_build_the_same_model_with_a_warning(caplog):
  base = {"name": "mor", **TINY, "num_layers": 4, "num_recursions": 2, "router": "token"}
  renamed = {
    "balance_coef": ("load_balance_coef", 0.2),
    "z_coef": ("z_loss_coef", 1e-4),
    "alpha": ("gate_scale", 0.3),
    "inference_selection": ("eval_routing", "causal"),
  }
  with caplog.at_level("WARNING"):
    old = build_model({**base, **{key: value for key, (_, value) in renamed.items()}})
  new = build_model({**base, **{key: value for key, value in renamed.values()}})
  assert old == new
  assert (new.load_balance_coef, new.z_loss_coef, new.gate_scale, new.eval_routing) == (0.2, 1e-4, 0.3, "causal")
  for key, (new_key, _) in renamed.items():
    assert f"config.model.{key} is now called config.model.{new_key}" in caplog.text


def test_flops_account_for_early_exit():
  kw = dict(TINY, num_layers=6, num_recursions=3, sharing="cycle")
  recursive = make(**kw, router="none")
  # The recursive baseline costs what a vanilla model of the same effective depth costs.
  d, attn, kv = 32, 32, 16
  layer = 3 * d * 48 + 2 * d * attn + 2 * d * kv
  vanilla = dense_train_flops(6 * layer + 37 * d, num_layers=6, attention_dim=attn, seq_len=64)
  dense = build_model(
    {"name": "dense_lm", **{k: v for k, v in TINY.items() if k != "head_dim"}, "num_layers": 6, "head_dim": 16}
  )
  assert dense.train_flops_per_token(64) == pytest.approx(vanilla)
  assert recursive.train_flops_per_token(64) == pytest.approx(vanilla)
  expert = make(**kw, router="expert").train_flops_per_token(64)
  share = make(**kw, router="expert", kv_mode="share").train_flops_per_token(64)
  assert expert < vanilla and share < vanilla
  # Sharing: recursions r > 0 (fractions 2/3, 1/3; 2 layers each) skip the key/value projections but see all keys.
  keys = 65 / 2
  want = sum(2 * f * (-6 * 2 * d * kv + 12 * attn * keys * (1 - f)) for f in (2 / 3, 1 / 3))
  assert share - expert == pytest.approx(want)
  saved = sum(2 * (1 - f) * (6 * layer + 12 * attn * keys * (1 + f)) for f in (2 / 3, 1 / 3))
  assert vanilla - expert == pytest.approx(saved - 6 * 3 * d)  # MoR pays for 3 step routers of d parameters
