"""SimpleNet: the paper's parameter count, shapes, BatchNorm statistics, reduced configs, a training step."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.simplenet import CONVS

DIGITS = dict(name="simplenet", num_classes=10, width_multiplier=0.0625, num_pools=3)


def test_cifar10_param_count_matches_paper():
  model = build_model(dict(name="simplenet", num_classes=10))
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  widths = [w for w, _ in CONVS]
  ins = [3] + widths[:-1]
  conv = sum(k * k * i * w for (w, k), i in zip(CONVS, ins))
  assert conv == 5_482_176  # the paper's 5.48M is the convolution kernels
  bn = 2 * sum(widths)
  expected = conv + bn + 256 * 10 + 10
  assert count_params(variables["params"]) == expected == 5_493_834
  assert abs(expected - 5.48e6) / 5.48e6 < 0.003
  assert count_params(variables["batch_stats"]) == bn


def test_cifar_shape():
  model = build_model(dict(name="simplenet", num_classes=10))
  images = jax.ShapeDtypeStruct((2, 32, 32, 3), jnp.float32)
  variables = jax.eval_shape(model.init, jax.random.key(0), images)
  logits, out = jax.eval_shape(model.apply, variables, images)
  assert logits.shape == (2, 10) and logits.dtype == jnp.float32 and out.aux_loss.shape == ()


def _digits():
  model = build_model(DIGITS)
  images = jax.random.normal(jax.random.key(0), (8, 8, 8, 1))
  labels = jnp.arange(8) % 10
  variables = jax.jit(model.init)(jax.random.key(1), images)
  return model, variables, images, labels


def test_batch_stats_update_only_in_training():
  model, variables, images, _ = _digits()
  apply = jax.jit(model.apply, static_argnames=("deterministic", "mutable"))
  _, mutated = apply(variables, images, deterministic=True, mutable=("batch_stats",))
  for a, b in zip(jax.tree.leaves(mutated["batch_stats"]), jax.tree.leaves(variables["batch_stats"])):
    np.testing.assert_array_equal(a, b)
  _, mutated = apply(
    variables, images, deterministic=False, mutable=("batch_stats",), rngs={"dropout": jax.random.key(2)}
  )
  changed = [
    not np.allclose(a, b)
    for a, b in zip(jax.tree.leaves(mutated["batch_stats"]), jax.tree.leaves(variables["batch_stats"]))
  ]
  assert all(changed)
  mean0 = mutated["batch_stats"]["bn_0"]["mean"]
  conv0 = jax.lax.conv_general_dilated(
    images, variables["params"]["conv_0"]["kernel"].value, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  np.testing.assert_allclose(mean0, 0.05 * conv0.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)  # momentum 0.95


def test_one_optimizer_step_lowers_loss():
  model, variables, images, labels = _digits()
  params, stats = nn.meta.unbox(variables["params"]), variables["batch_stats"]

  def loss_fn(params):
    (logits, _), _ = model.apply(
      {"params": params, "batch_stats": stats},
      images,
      deterministic=False,
      mutable=["batch_stats"],
      rngs={"dropout": jax.random.key(3)},
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()

  # Same batch, same dropout mask, batch statistics: one compiled function gives the loss before and after the step.
  value_and_grad = jax.jit(jax.value_and_grad(loss_fn))
  before, grads = value_and_grad(params)
  opt = optax.adam(1e-2)
  updates, _ = opt.update(grads, opt.init(params), params)
  after, _ = value_and_grad(optax.apply_updates(params, updates))
  assert after < before - 1e-3


def test_reduced_configs():
  model = build_model({**DIGITS, "widths": (4,) * 13, "num_pools": 0, "dropout_rate": 0.0})
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  # 3x3 convs except two 1x1 ones (indices 10, 11); BN 2*4 per conv; classifier 4*10+10.
  assert count_params(variables["params"]) == 9 * 1 * 4 + 10 * 9 * 16 + 2 * 16 + 13 * 8 + 50
  assert build_model(DIGITS).resolved_widths == (4, 8, 8, 8, 8, 8, 16, 16, 16, 32, 128, 16, 16)
  with pytest.raises(ValueError, match="lower num_pools"):
    too_deep = build_model({**DIGITS, "num_pools": 4})
    jax.eval_shape(too_deep.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))


@pytest.mark.parametrize(
  "bad,match",
  [
    (dict(num_pools=5), "num_pools=5"),
    (dict(widths=(4,) * 12), "13 positive"),
    (dict(width_multiplier=0.0), "width_multiplier"),
    (dict(dropout_rate=1.0), "dropout_rate"),
  ],
)
def test_bad_config_raises(bad, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**DIGITS, **bad})
