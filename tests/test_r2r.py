"""R2R (papers.md C1): the router network, its loss and threshold rule, the labelling pipeline against a naive
recomputation, and routed decoding with both KV caches against small-only / large-only / naive routed decoding."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.engine.generate import generate
from zoo.models import ConfigError, build_model
from zoo.routing import r2r

V = 32
SMALL = dict(name="dense_lm", vocab_size=V, num_layers=1, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=24)
LARGE = dict(name="dense_lm", vocab_size=V, num_layers=1, embed_dim=32, num_heads=4, num_kv_heads=2, mlp_dim=48)
ROUTER = dict(name="r2r", input_dim=16, hidden_dim=8, num_blocks=2, top_k=V)


@pytest.fixture(scope="module")
def pool():
  tokens = jnp.zeros((1, 4), jnp.int32)
  models = []
  for i, cfg in enumerate((SMALL, LARGE)):
    model = build_model(cfg)
    models += [model, jax.jit(model.init)(jax.random.key(i), tokens)]
  return tuple(models)


def _greedy_logits(model, variables, seqs, length=24):
  """Last-position logits [batch, vocab] of each sequence in `seqs` (lists of ids) by a full forward pass, right-padded
  to one length so that one compilation serves every call (causal: the padding does not reach them)."""
  padded = np.zeros((len(seqs), length), np.int32)
  for i, s in enumerate(seqs):
    padded[i, : len(s)] = s
  logits = _full_forward(model, variables, jnp.asarray(padded))
  return logits[np.arange(len(seqs)), [len(s) - 1 for s in seqs]]


@functools.partial(jax.jit, static_argnums=0)
def _full_forward(model, variables, tokens):
  return model.apply(variables, tokens)[0]


def _prompts():
  return jax.random.randint(jax.random.key(7), (2, 4), 0, V)


def _by_embedding_sign(params, features):
  """A route that flags tokens whose (exactly looked-up) embedding has a positive first entry."""
  del params
  return features["token_embeddings"][:, 0] > 0


def test_router_network_shapes_params_errors_and_saving(tmp_path):
  router = build_model(ROUTER)
  feats = {
    "hidden_states": jnp.ones((3, 16)),
    "token_embeddings": jnp.ones((3, 16)),
    "top_logits": jnp.ones((3, V)),
  }
  variables = jax.jit(lambda r: router.init(r, **feats))(jax.random.key(0))
  train = jax.jit(lambda r: router.apply(variables, **feats, deterministic=False, rngs={"dropout": r})[0])
  logits = jax.jit(lambda v: router.apply(v, **feats)[0])(variables)
  assert logits.shape == (3,) and bool(jnp.all(jnp.isfinite(logits)))
  assert router.num_params() == sum(x.size for x in jax.tree.leaves(variables["params"]))
  assert len([k for k in variables["params"] if k.startswith("blocks_")]) == 2
  assert not np.allclose(train(jax.random.key(1)), train(jax.random.key(2)))  # dropout is active in training
  r2r.save_router(tmp_path, router, variables, {"threshold": 0.25})
  loaded, loaded_vars, record = r2r.load_router(tmp_path)
  assert loaded == router and record["threshold"] == 0.25
  np.testing.assert_array_equal(jax.jit(lambda v: loaded.apply(v, **feats)[0])(loaded_vars), logits)
  with pytest.raises(ValueError, match="top_logits has shape"):
    router.apply(variables, **{**feats, "top_logits": jnp.ones((3, V - 1))})
  with pytest.raises(ConfigError, match="hidden_dim"):
    build_model({**ROUTER, "hidden_dim": 0})


def test_loss_weights_positives_by_the_class_ratio():
  labels = np.array([0, 0, 0, 1])
  assert r2r.positive_weight(labels) == 3.0
  loss = r2r.router_loss(jnp.zeros(4), labels, 3.0)
  np.testing.assert_allclose(loss, (3 * np.log(2) + 3 * np.log(2)) / 4, rtol=1e-6)
  # A confident right answer costs less than a confident wrong one, and the positive's error is weighted.
  assert r2r.router_loss(jnp.array([5.0]), [1], 3.0) < r2r.router_loss(jnp.array([-5.0]), [1], 3.0)
  np.testing.assert_allclose(
    r2r.router_loss(jnp.array([-2.0]), [1], 3.0), 3 * r2r.router_loss(jnp.array([-2.0]), [1], 1.0), rtol=1e-6
  )
  with pytest.raises(ValueError, match="no positive"):
    r2r.positive_weight([0, 0])


def test_threshold_meets_the_recall_with_the_fewest_routed_tokens():
  probs = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.05])
  labels = np.array([1, 0, 1, 0, 0, 1, 1, 0, 0, 1])
  tau = r2r.choose_threshold(probs, labels, recall=0.8)  # 4 of the 5 positives: the 4th largest positive, 0.3
  assert tau == 0.3
  recall, rate = r2r.recall_and_rate(probs, labels, tau)
  assert recall == 0.8 and rate == 0.7
  assert r2r.recall_and_rate(probs, labels, 0.31)[0] < 0.8  # any higher threshold misses the target
  assert r2r.choose_threshold(probs, labels, recall=1.0) == 0.05
  assert r2r.choose_threshold(probs, labels, recall=0.95) == 0.05  # 0.95 of 5 positives needs all 5
  with pytest.raises(ValueError, match="recall=0"):
    r2r.choose_threshold(probs, labels, recall=0.0)


def test_branch_mean_nll_stops_after_the_first_newline():
  tokens = np.array([[5, r2r.NEWLINE, 7, r2r.NEWLINE], [5, 6, 7, 8]])
  nll = np.array([[1.0, 2.0, 4.0, 8.0], [1.0, 2.0, 3.0, 6.0]])
  np.testing.assert_allclose(r2r.branch_mean_nll(tokens, nll), [1.5, 3.0])
  np.testing.assert_allclose(r2r.branch_mean_nll(tokens, nll, None), [3.75, 3.0])


def test_labels_agreement_is_zero_and_the_verifier_matches_a_naive_recomputation(pool):
  small, small_vars, large, large_vars = pool
  prompts = _prompts()
  # The large model judged against itself: every token agrees, every label is 0.
  same = r2r.label_tokens(
    large, large_vars, large, large_vars, prompts, response_len=6, horizon=3, top_k=V, group_size=4
  )
  assert same["agree"].all() and not same["label"].any() and same["hidden_states"].shape == (12, 32)
  out = r2r.label_tokens(
    small, small_vars, large, large_vars, prompts, response_len=6, horizon=3, margin=0.05, top_k=V, group_size=4
  )
  agree, label, score = out["agree"], out["label"], out["score"]
  assert not agree.all()
  np.testing.assert_array_equal(agree, out["small_token"] == out["large_token"])
  np.testing.assert_array_equal(label, (~agree) & (score > 0.05))
  assert not label[agree].any() and (score[agree] == 0).all()
  # Recompute each disagreement's verdict with full forward passes (no cache, no batching).
  responses = np.asarray(generate(large, large_vars, prompts, max_new_tokens=6))
  for i in np.flatnonzero(~agree)[:3]:
    row, j = divmod(int(i), 6)
    means = []
    for first in (out["small_token"][i], out["large_token"][i]):
      seq = list(responses[row, : 4 + j]) + [int(first)]
      nll = []
      for _ in range(4):  # the divergent token, then 3 greedy continuation tokens
        logp = jax.nn.log_softmax(_greedy_logits(large, large_vars, [seq[:-1], seq]), axis=-1)
        nll.append(-float(logp[0, seq[-1]]))
        seq.append(int(jnp.argmax(logp[1])))
      means.append(float(r2r.branch_mean_nll(np.array([seq[4 + j : 8 + j]]), np.array([nll]))[0]))
    np.testing.assert_allclose(score[i], means[0] - means[1], atol=1e-4)
  strict = r2r.label_tokens(
    small, small_vars, large, large_vars, prompts, response_len=6, horizon=3, margin=1e6, top_k=V, group_size=4
  )
  assert not strict["label"].any()


def test_always_small_and_always_large_equal_each_models_greedy_decoding(pool):
  small, small_vars, large, large_vars = pool
  prompts = np.asarray(_prompts())
  for route, model, variables in ((r2r.always_small, small, small_vars), (r2r.always_large, large, large_vars)):
    tokens, routed, stats = r2r.routed_generate(
      small, small_vars, large, large_vars, prompts, max_new_tokens=8, route=route, route_params={}, top_k=V
    )
    np.testing.assert_array_equal(tokens, generate(model, variables, prompts, max_new_tokens=8))
    assert routed.all() == (route is r2r.always_large) and routed.any() == (route is r2r.always_large)
    assert stats["large_tokens"] == (2 * 7 if route is r2r.always_large else 0)  # one token per step after the first


def test_mixed_routing_keeps_both_caches_on_the_accepted_sequence(pool):
  small, small_vars, large, large_vars = pool
  prompts = np.asarray(_prompts())
  tokens, routed, stats = r2r.routed_generate(
    small, small_vars, large, large_vars, prompts, max_new_tokens=10, route=_by_embedding_sign, route_params={}, top_k=V
  )
  assert routed.any() and not routed.all() and stats["large_calls"] < 10
  # Naive routed decoding: both models re-read the whole accepted sequence at every step.
  table = r2r.token_embedding_table(small_vars)
  seq = prompts.copy()
  for _ in range(10):
    s = jnp.argmax(_greedy_logits(small, small_vars, list(seq)), axis=-1)
    g = jnp.argmax(_greedy_logits(large, large_vars, list(seq)), axis=-1)
    seq = np.concatenate([seq, np.where(table[s, 0] > 0, g, s)[:, None]], axis=1)
  np.testing.assert_array_equal(tokens, seq)
  # Teacher forcing with routing: the routed prediction is the large model's exactly where the route flags.
  small_pred, large_pred, routed_pred, flags = r2r.teacher_forced_routing(
    small, small_vars, large, large_vars, tokens, route=_by_embedding_sign, route_params={}, top_k=V
  )
  np.testing.assert_array_equal(flags, np.asarray(table[small_pred, 0] > 0))
  np.testing.assert_array_equal(routed_pred, np.where(flags, large_pred, small_pred))
