"""Decentralized Diffusion Models (McAllister et al. 2025, papers.md D1): the ensemble velocity and sampling (the
k-means partition of the data is `zoo.data.partition`).

DDM splits the data into K clusters (k-means on features), trains one flow-matching expert per cluster with no
communication, and a router r(x_t, t) that predicts the cluster of x0 from the noised x_t. Because the optimal
velocity of all the data is `E[eps - x0 | x_t] = sum_k p(k | x_t) E[eps - x0 | x_t, k]` (the law of total
expectation; the paper's argument that the ensemble optimises the same objective as one model, Section 3 [guess on
the section]), the ensemble velocity is the router-weighted sum of the experts' velocities ('mixture'); the paper
samples with the single most likely expert per step ('top1'). Conventions of `zoo.flow.matching` (data at t = 0).
"""

import jax
import jax.numpy as jnp
import numpy as np

from zoo.flow import matching

MODES = ("top1", "mixture")


def _check_mode(mode):
  if mode not in MODES:
    raise ValueError(f"mode={mode!r} is invalid; allowed: {MODES}")


def ensemble_velocity(expert_velocities, router_logits, mode):
  """The DDM ensemble velocity of a batch.

  Args:
    expert_velocities: every expert's velocity on the whole batch [K, B, ...].
    router_logits: [B, K].
    mode: 'top1' (each sample takes the velocity of its argmax expert; ties go to the lower index) or 'mixture'
      (`sum_k softmax(router_logits)_k v_k`, weights in float32).

  Returns:
    [B, ...] in the experts' dtype.
  """
  _check_mode(mode)
  num_experts, batch = expert_velocities.shape[:2]
  if router_logits.shape != (batch, num_experts):
    raise ValueError(
      f"router_logits has shape {router_logits.shape}; allowed: [batch, experts] = ({batch}, {num_experts}) for "
      f"expert_velocities of shape {expert_velocities.shape}"
    )
  if mode == "top1":
    expert = jnp.argmax(router_logits, axis=-1)
    return expert_velocities[expert, jnp.arange(batch)]
  weights = jax.nn.softmax(router_logits.astype(jnp.float32), axis=-1)
  mixed = jnp.einsum(
    "bk,kb...->b...", weights, expert_velocities.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
  )
  return mixed.astype(expert_velocities.dtype)


def _stacked(experts_fn):
  """`experts_fn(x, t) -> [K, B, ...]`, or a sequence of per-expert `v_k(x, t) -> [B, ...]` stacked into one."""
  if callable(experts_fn):
    return experts_fn
  fns = tuple(experts_fn)
  if not fns or not all(callable(f) for f in fns):
    raise ValueError(
      f"experts_fn={experts_fn!r} is invalid; allowed: a function (x, t) -> [K, B, ...] or a non-empty sequence of "
      "functions (x, t) -> [B, ...]"
    )
  return lambda x, t: jnp.stack([f(x, t) for f in fns])


def ensemble_sample(experts_fn, router_fn, x1, steps, mode, sampler="euler"):
  """Samples the DDM ensemble: integrates `ensemble_velocity` from t = 1 (noise `x1`) to t = 0.

  At every velocity evaluation every expert runs on the whole batch and the router picks or weighs them per sample;
  there is no per-sample loop (jit-friendly; `steps`, `mode` and `sampler` are static).

  Args:
    experts_fn: `(x [B, ...], t [B]) -> [K, B, ...]` (e.g. a vmap over stacked expert parameters), or a sequence of
      K functions `(x, t) -> [B, ...]`.
    router_fn: `(x [B, ...], t [B]) -> router logits [B, K]`.
    x1: noise [B, ...].
    steps: integration steps (uniform grid, `zoo.flow.matching.time_grid`).
    mode: 'top1' | 'mixture' (`ensemble_velocity`).
    sampler: 'euler' | 'heun' (`zoo.flow.matching.SAMPLERS`).

  Returns:
    samples at t = 0 [B, ...].
  """
  _check_mode(mode)
  integrate = matching.get_sampler(sampler)
  experts_fn = _stacked(experts_fn)

  def velocity_fn(x, t):
    return ensemble_velocity(experts_fn(x, t), router_fn(x, t), mode)

  return integrate(velocity_fn, x1, steps)


def ensemble_sample_reference(experts_fn, router_fn, x1, steps, mode, sampler="euler"):
  """A deliberately simple `ensemble_sample` for tests: Python loops over samples, steps and experts (slow).

  Each sample is integrated alone (a batch of one) with its own Euler or Heun loop on `time_grid(steps)`; at each
  evaluation the expert is picked (top1: Python argmax) or the experts are summed one by one (mixture).
  """
  _check_mode(mode)
  matching.get_sampler(sampler)
  experts_fn = _stacked(experts_fn)
  ts = np.asarray(matching.time_grid(steps))

  def velocity(x, t):
    t = jnp.full((1,), t, jnp.float32)
    outputs = experts_fn(x, t)  # [K, 1, ...]
    logits = np.asarray(router_fn(x, t), np.float32)[0]  # [K]
    if mode == "top1":
      return outputs[int(np.argmax(logits))]
    weights = jax.nn.softmax(jnp.asarray(logits))
    total = jnp.zeros(outputs.shape[1:], jnp.float32)
    for k in range(outputs.shape[0]):
      total = total + weights[k] * outputs[k].astype(jnp.float32)
    return total.astype(outputs.dtype)

  samples = []
  for b in range(x1.shape[0]):
    x = x1[b : b + 1]
    for i in range(steps):
      h = jnp.float32(ts[i + 1]) - jnp.float32(ts[i])
      v = velocity(x, ts[i])
      if sampler == "euler":
        x = (x + h * v).astype(x1.dtype)
      else:
        x_pred = (x + h * v).astype(x1.dtype)
        x = (x + 0.5 * h * (v + velocity(x_pred, ts[i + 1]))).astype(x1.dtype)
    samples.append(x[0])
  return jnp.stack(samples)
