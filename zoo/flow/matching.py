"""Flow matching: interpolation, velocity target, loss, samplers, guidance and the exact Gaussian-mixture velocity.

Convention (used by every function here and by `zoo.tasks.flow_matching`): data x0 at t = 0, noise
eps ~ N(0, I) at t = 1, the straight path

  x_t = (1 - t) x0 + t eps,        velocity  dx_t/dt = eps - x0,

and a model `v(x_t, t)` regresses `eps - x0` (its optimum is `E[eps - x0 | x_t]`). Sampling integrates
`dx/dt = v(x, t)` from t = 1 (noise) down to t = 0 (data). This is the rectified-flow path of Liu et al. 2023 ("Flow
Straight and Fast", Section 2, Eq. (1) [guess on the equation number]) and the optimal-transport conditional path of
Lipman et al. 2023 ("Flow Matching for Generative Modeling", Section 4.1, Example II, with sigma_min = 0) with time
reversed: both put noise at t = 0 and data at t = 1, so their t is our 1 - t and their velocity is minus ours. Data
at t = 0 is the convention of Decentralized Diffusion Models (McAllister et al. 2025, papers.md D1) [guess on their
exact parameterisation, as papers.md notes] and of Stable Diffusion 3's rectified flow.

Shapes: `x` [B, ...] (any trailing axes), `t` [B] float32 (a scalar is broadcast); a velocity function
`velocity_fn(x, t) -> [B, ...]`.

The Gaussian-mixture reference (`gaussian_mixture_velocity`) is exact: with isotropic components
x0 ~ sum_k w_k N(mu_k, s_k^2 I), x_t given component k is N((1 - t) mu_k, ((1 - t)^2 s_k^2 + t^2) I), the posterior
over components is Bayes' rule on those densities, and within a component (x0, eps, x_t) are jointly Gaussian, so

  E[eps - x0 | x_t = x, k] = (t - (1 - t) s_k^2) / var_k(t) * (x - (1 - t) mu_k) - mu_k,
  var_k(t) = (1 - t)^2 s_k^2 + t^2.

The global optimum is the posterior-weighted sum of the component optima (the law of total expectation; the
identity behind DDM's ensemble). This form has no 1/t or 1/(1 - t): var_k(t) >= s_k^2 / (1 + s_k^2) > 0 for every t
in [0, 1] when s_k > 0, so t = 0 and t = 1 are evaluated exactly (no clipping). Only a point mass (s_k = 0) has a
vanishing variance (t^2 at t = 0); the variance is floored at `MIN_VARIANCE` for it.
"""

import jax
import jax.numpy as jnp
import numpy as np

MIN_VARIANCE = 1e-12  # floor of var_k(t); reached only by a point mass (std 0) at t = 0


def _times(t, x):
  """`t` (scalar or [B]) as float32 [B] for a batch `x` [B, ...]."""
  t = jnp.asarray(t, jnp.float32)
  batch = x.shape[0]
  if t.ndim == 0:
    return jnp.broadcast_to(t, (batch,))
  if t.shape != (batch,):
    raise ValueError(f"t has shape {t.shape}; allowed: a scalar or [batch] = ({batch},) for x of shape {x.shape}")
  return t


def _per_example(t, x):
  """float32 [B] -> [B, 1, ..., 1], broadcastable against `x` [B, ...]."""
  return t.reshape(t.shape + (1,) * (x.ndim - 1))


def interpolate(x0, eps, t):
  """The point of the straight path at time t: `(1 - t) x0 + t eps`.

  Args:
    x0: data [B, ...].
    eps: noise [B, ...] (same shape).
    t: times [B] (or a scalar) in [0, 1]; t = 0 gives x0, t = 1 gives eps.

  Returns:
    x_t [B, ...] (x0's dtype promoted with float32).
  """
  t = _per_example(_times(t, x0), x0)
  return (1.0 - t) * x0 + t * eps


def velocity_target(x0, eps):
  """The regression target `eps - x0` [B, ...], the time derivative of `interpolate(x0, eps, t)`."""
  return eps - x0


def flow_matching_loss(v_pred, v_target, weight=None):
  """Per-example mean squared error of a predicted velocity, in float32.

  Args:
    v_pred: predicted velocity [B, ...].
    v_target: target velocity [B, ...] (`velocity_target`).
    weight: optional per-example weight [B] (e.g. a time-dependent loss weight), multiplied in.

  Returns:
    float32 [B]: mean over the non-batch axes of `(v_pred - v_target)^2`, times `weight`.
  """
  error = jnp.square(v_pred.astype(jnp.float32) - v_target.astype(jnp.float32))
  loss = jnp.mean(error, axis=tuple(range(1, error.ndim)))
  if weight is not None:
    loss = loss * jnp.asarray(weight, jnp.float32)
  return loss


def time_grid(steps):
  """The uniform grid of an integration from t = 1 to t = 0: float32 [steps + 1], `1 - i / steps`.

  Computed in float64 and rounded once, so every sampler (and `zoo.flow.ensemble`'s reference) uses the same times.
  """
  if not isinstance(steps, (int, np.integer)) or isinstance(steps, bool) or steps < 1:
    raise ValueError(f"steps={steps!r} is invalid; allowed: a Python integer >= 1 (static under jit)")
  return jnp.asarray(1.0 - np.arange(steps + 1, dtype=np.float64) / steps, jnp.float32)


def euler_sample(velocity_fn, x1, steps):
  """Integrates `dx/dt = velocity_fn(x, t)` from t = 1 to t = 0 with `steps` Euler steps on a uniform grid.

  Args:
    velocity_fn: `(x [B, ...], t [B] float32) -> [B, ...]`.
    x1: the starting noise [B, ...] at t = 1.
    steps: number of steps (a Python int; static under jit).

  Returns:
    x at t = 0 [B, ...] (x1's dtype); `steps` velocity evaluations.
  """
  ts = time_grid(steps)
  batch = x1.shape[0]

  def step(i, x):
    t, t_next = ts[i], ts[i + 1]
    v = velocity_fn(x, jnp.full((batch,), t))
    return (x + (t_next - t) * v).astype(x1.dtype)

  return jax.lax.fori_loop(0, steps, step, x1)


def heun_sample(velocity_fn, x1, steps):
  """Like `euler_sample` with Heun's second-order method (an Euler predictor, a trapezoidal corrector; Karras et al.
  2022, EDM, Algorithm 1, here with the correction on every step since v is defined at t = 0).

  Returns:
    x at t = 0 [B, ...] (x1's dtype); 2 * `steps` velocity evaluations.
  """
  ts = time_grid(steps)
  batch = x1.shape[0]

  def step(i, x):
    t, t_next = ts[i], ts[i + 1]
    h = t_next - t
    v = velocity_fn(x, jnp.full((batch,), t))
    x_pred = (x + h * v).astype(x1.dtype)
    v_next = velocity_fn(x_pred, jnp.full((batch,), t_next))
    return (x + 0.5 * h * (v + v_next)).astype(x1.dtype)

  return jax.lax.fori_loop(0, steps, step, x1)


SAMPLERS = {"euler": euler_sample, "heun": heun_sample}


def get_sampler(name):
  """The sampler `name` ('euler' | 'heun') of `SAMPLERS`."""
  if name not in SAMPLERS:
    raise ValueError(f"sampler={name!r} is invalid; allowed: {tuple(SAMPLERS)}")
  return SAMPLERS[name]


def cfg_velocity(v_cond, v_uncond, scale):
  """Classifier-free guidance (Ho & Salimans 2022, Eq. (6) with scale = 1 + w [guess on the equation number]).

  Returns `v_uncond + scale * (v_cond - v_uncond)` [B, ...]: scale 1 is the conditional velocity alone, 0 the
  unconditional one, > 1 extrapolates away from the unconditional one.
  """
  return v_uncond + scale * (v_cond - v_uncond)


def guided_velocity_fn(model_fn, labels, null_label, scale):
  """The guided velocity function of a class-conditional model.

  Args:
    model_fn: `(x [N, ...], t [N], labels [N] int32) -> velocity [N, ...]`.
    labels: the conditioning classes [B] int32 of the batch to sample.
    null_label: the label of "no class" (the one dropped labels were replaced with in training).
    scale: guidance scale (`cfg_velocity`).

  Returns:
    `velocity_fn(x [B, ...], t [B]) -> [B, ...]`, which evaluates the conditional and the unconditional velocity in
    one call of `model_fn` on the batch concatenated with itself ([2B, ...]) and combines them.
  """
  labels = jnp.asarray(labels, jnp.int32)
  both_labels = jnp.concatenate([labels, jnp.full_like(labels, null_label)])

  def velocity_fn(x, t):
    t = _times(t, x)
    v = model_fn(jnp.concatenate([x, x]), jnp.concatenate([t, t]), both_labels)
    v_cond, v_uncond = jnp.split(v, 2)
    return cfg_velocity(v_cond, v_uncond, scale)

  return velocity_fn


def _component_moments(t, mean, std):
  """The mean [B, D] and variance [B] of x_t given a component N(mean [D], std^2 I), float32."""
  s2 = jnp.square(jnp.asarray(std, jnp.float32))
  a = 1.0 - t
  variance = jnp.maximum(jnp.square(a) * s2 + jnp.square(t), MIN_VARIANCE)
  return a[:, None] * jnp.asarray(mean, jnp.float32)[None, :], variance


def component_velocity(x, t, mean, std):
  """The optimal velocity `E[eps - x0 | x_t = x]` when x0 ~ N(mean, std^2 I) (one mixture component).

  Closed form (module docstring): `(t - (1 - t) std^2) / var(t) * (x - (1 - t) mean) - mean`,
  `var(t) = (1 - t)^2 std^2 + t^2`. At t = 0 it is -x, at t = 1 it is x - mean.

  Args:
    x: points [B, D].
    t: times [B] (or a scalar) in [0, 1].
    mean: the component mean [D].
    std: the component standard deviation (a scalar > 0; 0, a point mass, is floored, see `MIN_VARIANCE`).

  Returns:
    float32 [B, D].
  """
  x = jnp.asarray(x, jnp.float32)
  t = _times(t, x)
  center, variance = _component_moments(t, mean, std)
  s2 = jnp.square(jnp.asarray(std, jnp.float32))
  gain = (t - (1.0 - t) * s2) / variance
  return gain[:, None] * (x - center) - jnp.asarray(mean, jnp.float32)[None, :]


def _check_mixture(x, weights, means, stds):
  if x.ndim != 2:
    raise ValueError(f"x has shape {x.shape}; allowed: [batch, D]")
  k, d = means.shape
  if weights.shape != (k,) or stds.shape != (k,) or d != x.shape[1]:
    raise ValueError(
      f"mixture shapes weights {weights.shape}, means {means.shape}, stds {stds.shape} for x {x.shape}; allowed: "
      f"weights [K], means [K, D], stds [K] with D = x.shape[1] = {x.shape[1]}"
    )


def gaussian_mixture_log_posterior(x, t, weights, means, stds):
  """log p(component k | x_t = x) of an isotropic Gaussian mixture: float32 [B, K] (usable as router logits).

  Args:
    x: points [B, D].
    t: times [B] (or a scalar) in [0, 1].
    weights: mixture weights [K] (normalised here).
    means: component means [K, D].
    stds: component standard deviations [K] (> 0).
  """
  x = jnp.asarray(x, jnp.float32)
  weights, means, stds = (jnp.asarray(a, jnp.float32) for a in (weights, means, stds))
  _check_mixture(x, weights, means, stds)
  t = _times(t, x)
  centers, variances = jax.vmap(lambda m, s: _component_moments(t, m, s), out_axes=(1, 1))(means, stds)
  squared = jnp.sum(jnp.square(x[:, None, :] - centers), axis=-1)  # [B, K]
  logits = jnp.log(weights)[None, :] - 0.5 * squared / variances - 0.5 * x.shape[1] * jnp.log(variances)
  return jax.nn.log_softmax(logits, axis=-1)


def gaussian_mixture_posterior(x, t, weights, means, stds):
  """p(component k | x_t = x) [B, K] float32 (`gaussian_mixture_log_posterior`, exponentiated)."""
  return jnp.exp(gaussian_mixture_log_posterior(x, t, weights, means, stds))


def gaussian_mixture_velocity(x, t, weights, means, stds):
  """The exact optimal velocity `E[eps - x0 | x_t = x]` for x0 ~ sum_k weights_k N(means_k, stds_k^2 I).

  `sum_k posterior_k(x, t) * component_velocity(x, t, means_k, stds_k)`; exact and finite on all of t in [0, 1] (module
  docstring).

  Args:
    x: points [B, D].
    t: times [B] (or a scalar) in [0, 1].
    weights: [K]; means: [K, D]; stds: [K] (> 0).

  Returns:
    float32 [B, D].
  """
  x = jnp.asarray(x, jnp.float32)
  means, stds = jnp.asarray(means, jnp.float32), jnp.asarray(stds, jnp.float32)
  posterior = gaussian_mixture_posterior(x, t, weights, means, stds)  # [B, K]
  velocities = jax.vmap(lambda m, s: component_velocity(x, t, m, s))(means, stds)  # [K, B, D]
  return jnp.einsum("bk,kbd->bd", posterior, velocities, precision=jax.lax.Precision.HIGHEST)
