"""Flow matching (`zoo.flow.matching`) and Decentralized Diffusion Models (`zoo.flow.ensemble`, papers.md D1) on
small Gaussian and Gaussian-mixture problems whose optimal velocities are known in closed form."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.data import partition
from zoo.flow import ensemble, matching

# A 2-D mixture of three well-separated isotropic Gaussians.
WEIGHTS = np.array([0.5, 0.3, 0.2], np.float32)
MEANS = np.array([[-4.0, 0.0], [4.0, 0.0], [0.0, 5.0]], np.float32)
STDS = np.array([0.5, 0.7, 0.4], np.float32)


def _mixture_batch(key, n):
  """(x0 [n, 2], eps [n, 2], t [n], component [n]) with x0 from the mixture and t ~ U(0, 1)."""
  k_comp, k_x0, k_eps, k_t = jax.random.split(key, 4)
  component = jax.random.choice(k_comp, 3, (n,), p=jnp.asarray(WEIGHTS))
  x0 = jnp.asarray(MEANS)[component] + jnp.asarray(STDS)[component][:, None] * jax.random.normal(k_x0, (n, 2))
  return x0, jax.random.normal(k_eps, (n, 2)), jax.random.uniform(k_t, (n,)), component


def _experts_fn(x, t):
  """The optimal velocity of an expert trained only on component k, for every k: [3, B, 2]."""
  return jax.vmap(lambda m, s: matching.component_velocity(x, t, m, s))(jnp.asarray(MEANS), jnp.asarray(STDS))


def _posterior_router(x, t):
  """The exact router: log p(k | x_t) [B, 3]."""
  return matching.gaussian_mixture_log_posterior(x, t, WEIGHTS, MEANS, STDS)


def test_convention_data_at_zero_noise_at_one():
  x0 = jax.random.normal(jax.random.key(0), (4, 3, 2))
  eps = jax.random.normal(jax.random.key(1), (4, 3, 2))
  np.testing.assert_array_equal(matching.interpolate(x0, eps, jnp.zeros(4)), x0)
  np.testing.assert_array_equal(matching.interpolate(x0, eps, jnp.ones(4)), eps)
  # velocity_target is d/dt of the path at every t.
  t = jnp.array([0.0, 0.3, 0.7, 1.0])
  _, dx_dt = jax.jvp(lambda s: matching.interpolate(x0, eps, s), (t,), (jnp.ones(4),))
  np.testing.assert_allclose(dx_dt, matching.velocity_target(x0, eps), rtol=1e-6, atol=1e-6)
  # Per-example loss [B], times an optional per-example weight.
  loss = matching.flow_matching_loss(x0, eps, weight=jnp.array([1.0, 2.0, 0.0, 1.0]))
  expected = np.mean((np.asarray(x0) - np.asarray(eps)) ** 2, axis=(1, 2)) * [1.0, 2.0, 0.0, 1.0]
  np.testing.assert_allclose(loss, expected, rtol=1e-6)
  # The exact mixture velocity is finite at both ends: -x at t = 0 (x = x0, E[eps] = 0), x - E[x0] at t = 1.
  x = jax.random.normal(jax.random.key(2), (5, 2)) * 3
  v0 = matching.gaussian_mixture_velocity(x, 0.0, WEIGHTS, MEANS, STDS)
  v1 = matching.gaussian_mixture_velocity(x, 1.0, WEIGHTS, MEANS, STDS)
  np.testing.assert_allclose(v0, -x, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(v1, x - WEIGHTS @ MEANS, rtol=1e-5, atol=1e-5)


def test_guidance_one_batched_call():
  calls = []

  def model_fn(x, t, labels):
    calls.append(x.shape)
    return x * (1.0 + labels[:, None]) + t[:, None]

  labels = jnp.array([1, 2, 0])
  x, t = jnp.ones((3, 2)), jnp.full((3,), 0.5)
  v = matching.guided_velocity_fn(model_fn, labels, 5, 3.0)(x, t)
  assert calls == [(6, 2)]
  v_cond, v_uncond = model_fn(x, t, labels), model_fn(x, t, jnp.full((3,), 5))
  np.testing.assert_allclose(v, v_uncond + 3.0 * (v_cond - v_uncond), rtol=1e-6)
  np.testing.assert_allclose(matching.cfg_velocity(v_cond, v_uncond, 1.0), v_cond)


def test_samplers_transport_noise_to_a_gaussian():
  """For N(m, s^2 I) the flow of the optimal velocity maps noise x1 to exactly m + s x1."""
  mean, std = np.array([2.0, -1.0], np.float32), 0.5
  velocity = lambda x, t: matching.gaussian_mixture_velocity(x, t, [1.0], mean[None], [std])
  x1 = jax.random.normal(jax.random.key(0), (4096, 2))
  exact = mean + std * x1
  errors = {}
  for name, sampler in matching.SAMPLERS.items():
    for steps in (4, 100):
      x0 = jax.jit(lambda x, sampler=sampler, steps=steps: sampler(velocity, x, steps))(x1)
      errors[name, steps] = float(jnp.mean(jnp.abs(x0 - exact)))
      if steps == 100:
        # A wrong sign or time direction lands far from (2, -1) with std 0.5 (or diverges).
        np.testing.assert_allclose(jnp.mean(x0, axis=0), mean, atol=0.03)
        np.testing.assert_allclose(jnp.std(x0, axis=0), [std, std], atol=0.02)
  assert errors["euler", 100] < 0.02 and errors["heun", 100] < 1e-4, errors  # first and second order
  assert errors["heun", 4] < 0.1 * errors["euler", 4], errors


def test_ddm_identity_and_ensemble_sampling():
  x0, eps, t, _ = _mixture_batch(jax.random.key(0), 512)
  t = t.at[:4].set(jnp.array([0.0, 1.0, 0.0, 1.0]))
  x = matching.interpolate(x0, eps, t)
  v_global = matching.gaussian_mixture_velocity(x, t, WEIGHTS, MEANS, STDS)
  # sum_k p(k | x_t) v_k*(x_t, t), with v_k* the optimum of an expert trained on cluster k alone, is the global optimum.
  posterior = matching.gaussian_mixture_posterior(x, t, WEIGHTS, MEANS, STDS)
  np.testing.assert_allclose(jnp.sum(posterior, axis=1), 1.0, rtol=1e-6)
  v_ensemble = jnp.einsum("bk,kbd->bd", posterior, _experts_fn(x, t))
  scale = float(jnp.max(jnp.abs(v_global)))
  np.testing.assert_allclose(v_ensemble, v_global, rtol=1e-5, atol=1e-5 * scale)
  v_mixture = ensemble.ensemble_velocity(_experts_fn(x, t), jnp.log(posterior), "mixture")
  np.testing.assert_allclose(v_mixture, v_global, rtol=1e-5, atol=1e-5 * scale)
  # Independently, in float64 from the mixture's score (Tweedie): E[eps | x_t] = -t grad log p_t(x_t) and
  # E[x0 | x_t] = (x_t - t E[eps | x_t]) / (1 - t), so v = -(x_t + t grad log p_t) / (1 - t) for t < 1.
  xs, ts = np.asarray(x, np.float64), np.asarray(t, np.float64)
  keep = ts < 0.99
  xs, ts = xs[keep], ts[keep]
  centers = (1 - ts)[:, None, None] * MEANS[None].astype(np.float64)  # [B, K, 2]
  variances = (1 - ts)[:, None] ** 2 * STDS[None].astype(np.float64) ** 2 + ts[:, None] ** 2  # [B, K]
  diff = xs[:, None, :] - centers
  log_p = np.log(WEIGHTS)[None] - 0.5 * np.sum(diff**2, -1) / variances - np.log(variances)  # 2-D: -D/2 log var
  resp = np.exp(log_p - log_p.max(1, keepdims=True))
  resp /= resp.sum(1, keepdims=True)
  score = np.sum(resp[:, :, None] * (-diff / variances[:, :, None]), axis=1)
  v_score = -(xs + ts[:, None] * score) / (1 - ts)[:, None]
  np.testing.assert_allclose(np.asarray(v_global)[keep], v_score, rtol=1e-5, atol=1e-5 * scale)

  # Sampling the ensemble with the exact posterior router: the mixture of experts is the global optimal flow, so its
  # samples land in the clusters in the mixture's proportions with the clusters' spreads.
  x1 = jax.random.normal(jax.random.key(1), (2048, 2))
  clusters, spreads = {}, {}
  for mode in ensemble.MODES:
    samples = jax.jit(lambda x, mode=mode: ensemble.ensemble_sample(_experts_fn, _posterior_router, x, 50, mode))(x1)
    distances = np.sqrt(np.sum((np.asarray(samples)[:, None] - MEANS[None]) ** 2, -1))
    nearest = np.argmin(distances, axis=1)
    clusters[mode] = np.bincount(nearest, minlength=3) / len(nearest)
    spreads[mode] = np.array([np.std(np.asarray(samples)[nearest == k], axis=0) for k in range(3)])  # [K, 2]
    assert np.mean(distances.min(1) < 4 * STDS[nearest]) > 0.99, mode  # on a cluster, not between them
  np.testing.assert_allclose(clusters["mixture"], WEIGHTS, atol=0.03)
  np.testing.assert_allclose(spreads["mixture"], np.repeat(STDS[:, None], 2, axis=1), rtol=0.1)
  # Top-1 is not the global flow: in 2-D the posterior stays near the prior for most of the path, every sample
  # follows the a-priori most likely expert early on, and that cluster is over-represented (~0.8 instead of 0.5).
  assert clusters["top1"][0] > WEIGHTS[0] + 0.2, clusters


def _router_init(key, hidden=64):
  k1, k2, k3 = jax.random.split(key, 3)
  dense = lambda k, i, o: {"w": jax.random.normal(k, (i, o)) / np.sqrt(i), "b": jnp.zeros(o)}
  return [dense(k1, 3, hidden), dense(k2, hidden, hidden), dense(k3, hidden, 3)]


def _router_apply(params, x, t):
  h = jnp.concatenate([x / 4.0, t[:, None]], axis=1)
  for layer in params[:-1]:
    h = jax.nn.gelu(h @ layer["w"] + layer["b"])
  return h @ params[-1]["w"] + params[-1]["b"]


def test_trained_router_approaches_the_posterior():
  """A router trained with cross entropy to predict the cluster of x0 from (x_t, t) estimates p(k | x_t)."""
  optimizer = optax.adam(3e-3)

  def step(carry, key):
    params, opt_state = carry
    x0, eps, t, component = _mixture_batch(key, 256)
    x_t = matching.interpolate(x0, eps, t)
    loss_fn = lambda p: jnp.mean(optax.softmax_cross_entropy_with_integer_labels(_router_apply(p, x_t, t), component))
    loss, grads = jax.value_and_grad(loss_fn)(params)
    updates, opt_state = optimizer.update(grads, opt_state)
    return (optax.apply_updates(params, updates), opt_state), loss

  @jax.jit
  def train(params):
    (params, _), losses = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(jax.random.key(1), 400))
    return params, losses

  untrained = _router_init(jax.random.key(0))
  trained, losses = train(untrained)
  assert float(jnp.mean(losses[-50:])) < float(jnp.mean(losses[:50]))

  x0, eps, t, _ = _mixture_batch(jax.random.key(2), 2048)
  x_t = matching.interpolate(x0, eps, t)
  exact = matching.gaussian_mixture_posterior(x_t, t, WEIGHTS, MEANS, STDS)
  gap = lambda params: float(jnp.mean(jnp.abs(jax.nn.softmax(_router_apply(params, x_t, t)) - exact)))
  assert gap(trained) < 0.04 < gap(untrained), (gap(trained), gap(untrained))


@pytest.mark.parametrize("sampler", ["euler", "heun"])
def test_batched_ensemble_sampler_equals_per_sample_reference(sampler):
  k_w1, k_w2, k_r, k_x = jax.random.split(jax.random.key(0), 4)
  w1 = jax.random.normal(k_w1, (3, 3, 16))  # 3 nonlinear experts, stacked parameters
  w2 = jax.random.normal(k_w2, (3, 16, 2)) / 4
  r = jax.random.normal(k_r, (3, 3)) * 2

  def expert(w_in, w_out, x, t):
    return jnp.tanh(jnp.concatenate([x, t[:, None]], axis=1) @ w_in) @ w_out

  experts_fn = lambda x, t: jax.vmap(expert, in_axes=(0, 0, None, None))(w1, w2, x, t)
  router_fn = lambda x, t: jnp.concatenate([x, t[:, None]], axis=1) @ r
  x1 = jax.random.normal(k_x, (5, 2))
  for mode in ensemble.MODES:
    batched = jax.jit(lambda x, mode=mode: ensemble.ensemble_sample(experts_fn, router_fn, x, 4, mode, sampler))(x1)
    reference = ensemble.ensemble_sample_reference(experts_fn, router_fn, x1, 4, mode, sampler)
    np.testing.assert_allclose(batched, reference, rtol=1e-5, atol=1e-5, err_msg=mode)
  # A sequence of per-expert functions is the same ensemble.
  listed = [lambda x, t, k=k: expert(w1[k], w2[k], x, t) for k in range(3)]
  from_list = ensemble.ensemble_sample(listed, router_fn, x1, 4, "top1", sampler)
  stacked = ensemble.ensemble_sample(experts_fn, router_fn, x1, 4, "top1", sampler)
  np.testing.assert_allclose(from_list, stacked, rtol=1e-6)
  with pytest.raises(ValueError, match="mode='top2'"):
    ensemble.ensemble_sample(experts_fn, router_fn, x1, 4, "top2", sampler)


def test_partition_recovers_separated_blobs():
  rng = np.random.default_rng(0)
  labels = rng.permutation(np.repeat(np.arange(3), 40))
  features = MEANS[labels] + 0.5 * rng.standard_normal((120, 2)).astype(np.float32)
  centroids = partition.fit(features, 3)
  assignment = partition.assign(features, centroids)
  # The same partition up to a permutation of the cluster ids.
  mapping = {int(k): int(assignment[labels == k][0]) for k in range(3)}
  assert sorted(mapping.values()) == [0, 1, 2]
  np.testing.assert_array_equal(assignment, [mapping[int(k)] for k in labels])
  np.testing.assert_allclose(centroids[[mapping[k] for k in range(3)]], MEANS, atol=0.3)
  np.testing.assert_array_equal(partition.fit(features, 3), centroids)  # deterministic
  with pytest.raises(ValueError, match="clusters=200"):
    partition.fit(features, 200)
