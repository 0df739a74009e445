"""APTP (`zoo.flow.aptp`, arXiv:2406.12042): Sinkhorn balancing, Gumbel-Sigmoid gates, the contrastive and resource
losses, and the prompt router."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.flow import aptp

B, P, G, N = 64, 32, 48, 8

# jitted once per shape: compiling a whole function is faster than compiling its ops one by one
_sinkhorn = jax.jit(aptp.sinkhorn, static_argnames=("epsilon", "iterations"))
_contrastive = jax.jit(aptp.contrastive_loss, static_argnames=("temperature", "prompt_temperature"))


def _biased_scores(seed, batch=B, codes=N, dim=16):
  """Cosine scores [batch, codes] of random embeddings pulled toward code 0, so plain argmax picks code 0 for all."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  c = jax.random.normal(k2, (codes, dim))
  a = jax.random.normal(k1, (batch, dim)) + 3.0 * c[0]
  return aptp.cosine_scores(a, c)


def _clustered_prompts(seed, clusters=4, batch=B):
  """Prompt embeddings [batch, P] in `clusters` tight clusters (member i in cluster i % clusters)."""
  k1, k2 = jax.random.split(jax.random.key(seed))
  centres = jax.random.normal(k1, (clusters, P))
  return centres[np.arange(batch) % clusters] + 0.1 * jax.random.normal(k2, (batch, P))


# Sinkhorn


def test_sinkhorn_balances_scores_that_argmax_puts_on_one_code():
  deviations, mass_errors = [], []
  for seed in range(10):
    scores = _biased_scores(seed)
    assert np.bincount(np.asarray(jnp.argmax(scores, -1)), minlength=N)[0] == B
    q = _sinkhorn(scores)
    assert q.shape == (B, N) and q.dtype == jnp.float32
    np.testing.assert_allclose(q.sum(axis=1), 1.0, atol=1e-5)  # each row a distribution
    assert np.all(np.asarray(q) >= 0)
    mass = np.asarray(q.sum(axis=0))
    assert np.abs(mass - B / N).max() <= 1.0, mass  # each code's mass near B / n after 3 iterations
    mass_errors.append(np.abs(mass - B / N).mean())
    counts = np.bincount(np.asarray(jnp.argmax(q, -1)), minlength=N)
    assert counts.min() >= 2 and counts.max() <= 13, counts
    deviations.append(np.abs(counts - B / N).mean())
  assert np.mean(deviations) <= 2.0, deviations
  assert np.mean(mass_errors) <= 0.15, mass_errors


def test_sinkhorn_more_iterations_balance_the_columns_exactly_and_pass_no_gradient():
  scores = _biased_scores(0)
  np.testing.assert_allclose(aptp.sinkhorn(scores, iterations=30).sum(axis=0), B / N, atol=1e-3)
  w = jax.random.normal(jax.random.key(3), (B, N))
  grad = jax.grad(lambda s: jnp.sum(w * aptp.sinkhorn(s)))(scores)
  np.testing.assert_array_equal(grad, 0.0)


def test_sinkhorn_larger_epsilon_gives_flatter_plans():
  scores = _biased_scores(1)
  sharp, flat = aptp.sinkhorn(scores, epsilon=0.05), aptp.sinkhorn(scores, epsilon=1.0)
  assert float(jnp.max(sharp, -1).mean()) > float(jnp.max(flat, -1).mean())


# Gumbel-Sigmoid


def test_gumbel_sigmoid_hard_is_binary_with_the_soft_gradient():
  logits = jax.random.normal(jax.random.key(0), (16, 40)) * 3.0 - 3.0  # offset 3: about half the gates open
  rng = jax.random.key(1)
  hard = aptp.gumbel_sigmoid(logits, rng)
  assert hard.dtype == jnp.float32
  assert set(np.unique(np.asarray(hard)).tolist()) == {0.0, 1.0}
  soft = aptp.gumbel_sigmoid(logits, rng, hard=False)
  np.testing.assert_array_equal(hard, (soft >= 0.5).astype(np.float32))
  w = jax.random.normal(jax.random.key(2), logits.shape)
  g_hard = jax.grad(lambda l: jnp.sum(w * aptp.gumbel_sigmoid(l, rng)))(logits)
  g_soft = jax.grad(lambda l: jnp.sum(w * aptp.gumbel_sigmoid(l, rng, hard=False)))(logits)
  assert float(jnp.abs(g_hard).max()) > 0
  np.testing.assert_allclose(g_hard, g_soft, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("offset", [3.0, 0.0, -1.5])
def test_gumbel_sigmoid_without_rng_is_the_noiseless_threshold(offset):
  logits = jnp.linspace(-6.0, 6.0, 97) + 0.01  # keeps every logit off the threshold -offset
  hard = aptp.gumbel_sigmoid(logits, None, offset=offset)
  np.testing.assert_array_equal(hard, (logits > -offset).astype(np.float32))
  soft = aptp.gumbel_sigmoid(logits, None, temperature=0.4, hard=False, offset=offset)
  np.testing.assert_allclose(soft, jax.nn.sigmoid((logits + offset) / 0.4), rtol=1e-6)


def test_gumbel_sigmoid_lower_temperature_is_more_extreme():
  logits = jax.random.normal(jax.random.key(0), (4096,))
  rng = jax.random.key(1)
  cold = aptp.gumbel_sigmoid(logits, rng, temperature=0.1, hard=False, offset=0.0)
  warm = aptp.gumbel_sigmoid(logits, rng, temperature=1.0, hard=False, offset=0.0)
  assert np.all(np.abs(cold - 0.5) >= np.abs(warm - 0.5))
  assert float(jnp.mean(jnp.abs(cold - 0.5))) > float(jnp.mean(jnp.abs(warm - 0.5))) + 0.1


def test_noise_moments():
  g = aptp.sample_noise(jax.random.key(0), (200_000,), "gumbel")
  assert abs(float(g.mean()) - np.euler_gamma) < 0.02 and abs(float(g.var()) - np.pi**2 / 6) < 0.05
  l = aptp.sample_noise(jax.random.key(0), (200_000,), "logistic")
  assert abs(float(l.mean())) < 0.02 and abs(float(l.var()) - np.pi**2 / 3) < 0.08
  with pytest.raises(ValueError, match="noise"):
    aptp.sample_noise(jax.random.key(0), (2,), "normal")


def test_offset_opens_gates_whose_logits_are_near_zero():
  logits = jax.random.uniform(jax.random.key(0), (64, 256), minval=-0.5, maxval=0.5)
  np.testing.assert_array_equal(aptp.gumbel_sigmoid(logits, jax.random.key(1)), 1.0)
  assert float(aptp.gumbel_sigmoid(logits, jax.random.key(1), offset=0.0).mean()) < 0.9


def test_importance_logits_are_ordered_with_the_first_depth_gate_always_on():
  x = aptp.importance_logits(jax.random.normal(jax.random.key(0), (5, 7)))
  assert np.all(np.diff(np.asarray(x), axis=-1) <= 0)
  assert np.all(np.asarray(x[:, 0]) > 10.0)  # logit of a mass of 1 (eps 1e-6): gate open at any offset >= 0


# Losses


def test_contrastive_loss_prefers_the_prompts_similarity_structure():
  prompts = _clustered_prompts(0, batch=16)
  cluster = np.arange(16) % 4
  centres = jax.random.normal(jax.random.key(7), (4, 12))
  arch = centres[cluster] + 0.05 * jax.random.normal(jax.random.key(8), (16, 12))  # same clusters, other space
  matched = _contrastive(arch, prompts)
  assert matched.shape == () and matched.dtype == jnp.float32
  for seed in range(5):
    perm = jax.random.permutation(jax.random.key(seed), 16)
    if np.all(cluster[np.asarray(perm)] == cluster):
      continue
    assert float(matched) < float(_contrastive(arch[perm], prompts))


def test_contrastive_loss_matches_the_bce_formula_and_has_finite_gradients():
  a = jax.random.normal(jax.random.key(0), (8, 5))
  p = jax.random.normal(jax.random.key(1), (8, 6))
  an = np.asarray(a) / np.linalg.norm(np.asarray(a), axis=1, keepdims=True)
  pn = np.asarray(p) / np.linalg.norm(np.asarray(p), axis=1, keepdims=True)

  def softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)

  x, t = softmax(an @ an.T / 0.5), softmax(pn @ pn.T / 0.25)
  expected = -np.mean(t * np.log(x) + (1 - t) * np.log(1 - x))
  got = _contrastive(a, p, temperature=0.5, prompt_temperature=0.25)
  np.testing.assert_allclose(got, expected, rtol=1e-5)
  # At T = 0.03, orthogonal rows put softmax mass 1 - 1e-14 on the diagonal: 1 - p rounds to 0 in float32.
  eye = jnp.eye(8, 16)
  loss, grad = jax.jit(jax.value_and_grad(aptp.contrastive_loss))(eye, p)
  assert np.isfinite(float(loss)) and np.all(np.isfinite(np.asarray(grad)))


def test_resource_loss_is_zero_at_the_target_and_symmetric_in_log():
  assert float(aptp.resource_loss(0.6, 0.6)) == pytest.approx(0.0, abs=1e-7)
  for k in (1.1, 1.5, 3.0):
    above, below = aptp.resource_loss(0.5 * k, 0.5), aptp.resource_loss(0.5 / k, 0.5)
    np.testing.assert_allclose(above, np.log(k), rtol=1e-5)
    np.testing.assert_allclose(below, above, rtol=1e-5)
  # the log of the batch mean, as the reference: mean([0.3, 0.9]) = 0.6 is on target
  assert float(aptp.resource_loss(jnp.array([0.3, 0.9]), 0.6)) == pytest.approx(0.0, abs=1e-6)
  assert np.isfinite(float(aptp.resource_loss(0.0, 0.6)))
  spread = aptp.resource_spread_losses(jnp.array([0.4, 0.6, 0.8]))
  np.testing.assert_allclose(spread["max"], 0.2, rtol=1e-5)
  np.testing.assert_allclose(spread["std"], -0.2, rtol=1e-5)
  # equal ratios (every gate open) and a single sample: no spread, and a finite gradient (sqrt'(0) is infinite)
  for ratios in (jnp.ones((4,)), jnp.array([0.7])):
    total = lambda r: sum(aptp.resource_spread_losses(r).values())
    assert float(aptp.resource_spread_losses(ratios)["std"]) == 0.0
    assert np.all(np.isfinite(np.asarray(jax.grad(total)(ratios))))


def test_assign_eval_is_argmax_cosine_and_feeds_the_prototype_without_gradient_to_the_embedding():
  a = jax.random.normal(jax.random.key(0), (B, 6))
  codes = jax.random.normal(jax.random.key(1), (N, 6))
  code, fed, loss = aptp.assign(a, codes, training=False)
  assert code.dtype == jnp.int32 and code.shape == (B,) and float(loss) == 0.0
  cos = (a / jnp.linalg.norm(a, axis=1, keepdims=True)) @ (codes / jnp.linalg.norm(codes, axis=1, keepdims=True)).T
  np.testing.assert_array_equal(code, jnp.argmax(cos, -1))
  np.testing.assert_array_equal(fed, codes[code])
  code_t, _, _ = aptp.assign(a, codes, training=True)
  np.testing.assert_array_equal(code_t, jnp.argmax(aptp.sinkhorn(aptp.cosine_scores(a, codes)), -1))
  w = jax.random.normal(jax.random.key(2), (B, 6))
  g_a, g_c = jax.grad(lambda a, c: jnp.sum(w * aptp.assign(a, c, training=True)[1]), argnums=(0, 1))(a, codes)
  np.testing.assert_array_equal(g_a, 0.0)
  assert float(jnp.abs(g_c).sum()) > 0


# PromptRouter


@functools.partial(jax.jit, static_argnums=0, static_argnames=("training", "pretrain"))
def _apply(module, params, x, training, rng=None, pretrain=False):
  return module.apply(params, x, training=training, rng=rng, pretrain=pretrain)


def _router(**kw):
  module = aptp.PromptRouter(num_gates=G, **kw)
  params = module.init(jax.random.key(1), jnp.zeros((2, P)), training=False)
  return module, params


def test_router_shapes_dtypes_and_gates_open_at_init():
  module, params = _router()
  assert params["params"]["codes"].shape == (N, G)
  x = _clustered_prompts(0)
  for training in (False, True):
    out = _apply(module, params, x, training=training, rng=jax.random.key(2))
    assert out["arch_embedding"].shape == (B, G)
    assert out["code"].shape == (B,) and out["code"].dtype == jnp.int32
    assert out["gate_logits"].shape == (B, G) and out["gates"].shape == (B, G)
    assert out["code_gates"].shape == (N, G) and out["scores"].shape == (B, N)
    assert out["assign_loss"].shape == () and float(out["assign_loss"]) == 0.0
    np.testing.assert_array_equal(out["gates"], 1.0)  # the pruned model starts as the unpruned one
    np.testing.assert_array_equal(out["gate_logits"], params["params"]["codes"][out["code"]])


def test_router_eval_code_is_argmax_cosine_with_the_codes_gates():
  module, params = _router(width_groups=(16, 8, 8), eval_seed=None)
  x = _clustered_prompts(1)
  out = _apply(module, params, x, training=False, rng=jax.random.key(5))  # rng is ignored in evaluation
  p = params["params"]
  scale = jnp.asarray([0.25] * 16 + [8**-0.5] * 16 + [1.0] * 16)
  arch = jax.nn.sigmoid((x @ p["predictor"]["kernel"] + p["predictor"]["bias"] + aptp.OFFSET) / 0.4) * scale
  codes = jax.nn.sigmoid((p["codes"] + aptp.OFFSET) / 0.4) * scale
  np.testing.assert_allclose(out["arch_embedding"], arch, rtol=1e-5)
  cos = (arch / jnp.linalg.norm(arch, axis=1, keepdims=True)) @ (codes / jnp.linalg.norm(codes, axis=1)[:, None]).T
  np.testing.assert_array_equal(out["code"], jnp.argmax(cos, -1))
  np.testing.assert_array_equal(out["gates"], (out["gate_logits"] + aptp.OFFSET >= 0).astype(np.float32))


def test_router_eval_draws_fixed_noise():
  """Evaluation draws its Gumbel noise from `eval_seed` (the reference's fixed seed): the same for any rng, the same
  as the noiseless evaluation plus that draw, and another seed gives other gates."""
  x = _clustered_prompts(1)
  module, params = _router()
  p = dict(params["params"], codes=params["params"]["codes"] - 3.0)  # gate logits at the threshold: noise decides
  first = _apply(module, {"params": p}, x, training=False, rng=jax.random.key(5))
  second = _apply(module, {"params": p}, x, training=False, rng=jax.random.key(6))
  np.testing.assert_array_equal(first["code_gates"], second["code_gates"])
  _, k_codes = jax.random.split(jax.random.key(0))
  expected = aptp.gumbel_sigmoid(p["codes"], k_codes, hard=True)
  np.testing.assert_array_equal(first["code_gates"], expected)
  other_module, _ = _router(eval_seed=1)
  other = _apply(other_module, {"params": p}, x, training=False)
  assert np.any(np.asarray(other["code_gates"]) != np.asarray(first["code_gates"]))


def test_router_training_balances_the_codes():
  """With spread-out codes (trained-like, gate logits N(-3, 4^2)) argmax cosine sends most prompts to the code with
  the most open gates; the Sinkhorn assignment of training spreads them over all codes."""
  module, params = _router(eval_seed=None)
  for seed in range(4):
    p = dict(params["params"], codes=4.0 * jax.random.normal(jax.random.key(10 + seed), (N, G)) - 3.0)
    p["predictor"] = dict(p["predictor"], kernel=2.0 * p["predictor"]["kernel"])
    x = _clustered_prompts(seed, clusters=16)
    evaluation = np.bincount(np.asarray(_apply(module, {"params": p}, x, training=False)["code"]), minlength=N)
    out = _apply(module, {"params": p}, x, training=True, rng=jax.random.key(2))
    np.testing.assert_array_equal(out["code"], jnp.argmax(aptp.sinkhorn(out["scores"]), -1))
    training = np.bincount(np.asarray(out["code"]), minlength=N)
    assert evaluation.max() >= 40, evaluation
    assert training.min() >= 2 and training.max() <= 14, training


def test_router_gradients_reach_codes_from_gates_and_predictor_from_contrastive_loss():
  module, params = _router()
  x = _clustered_prompts(2)
  rng = jax.random.key(3)
  w = jax.random.normal(jax.random.key(4), (B, G))

  def gate_loss(params):
    return jnp.sum(w * module.apply(params, x, training=True, rng=rng)["gates"])

  def c_loss(params):
    return aptp.contrastive_loss(module.apply(params, x, training=True, rng=rng)["arch_embedding"], x)

  g = jax.jit(jax.grad(gate_loss))(params)["params"]
  assert float(jnp.abs(g["codes"]).sum()) > 0
  np.testing.assert_array_equal(g["predictor"]["kernel"], 0.0)  # the prototype is fed onward, no straight-through
  g = jax.jit(jax.grad(c_loss))(params)["params"]
  assert float(jnp.abs(g["predictor"]["kernel"]).sum()) > 0
  np.testing.assert_array_equal(g["codes"], 0.0)


def test_router_pretrain_feeds_the_predictors_own_gates():
  module, params = _router(eval_seed=None)
  x = _clustered_prompts(3)
  out = _apply(module, params, x, training=False, pretrain=True)
  p = params["params"]["predictor"]
  np.testing.assert_allclose(out["gate_logits"], x @ p["kernel"] + p["bias"], rtol=1e-5, atol=1e-6)
  np.testing.assert_array_equal(out["gates"], (out["gate_logits"] + aptp.OFFSET >= 0).astype(np.float32))


def test_router_bottleneck_variant_and_depth_gates():
  module, params = _router(arch_dim=16, hidden_dim=32, num_depth_gates=6)
  assert params["params"]["codes"].shape == (N, 16)
  x = _clustered_prompts(4)
  out = _apply(module, params, x, training=True, rng=jax.random.key(2))
  assert out["arch_embedding"].shape == (B, 16) and out["gates"].shape == (B, G)
  np.testing.assert_array_equal(out["gates"], 1.0)
  counts = np.bincount(np.asarray(out["code"]), minlength=N)
  assert counts.min() >= 3 and counts.max() <= 16, counts
