"""EMOv2 (papers.md E): the authors' parameter counts, shapes, BatchNorm statistics, the i2RMB residual wiring, the
close/remote windowed attention against hand-built references, a few optimizer steps on digits, one-line errors."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.emov2 import I2RMB, hybrid_window_attention, window_attention, window_merge, window_partition

# The authors' training logs (resources/Cls/log_train_EMOv2_{1M,2M,5M}_224.txt, fvcore at 224 px, 1000 classes)
# report 1.461M / 2.384M / 5.126M; the README and the paper's table give these cut to one decimal: 1.4M / 2.3M / 5.1M.
LOGGED = {"1m": 1.461e6, "2m": 2.384e6, "5m": 5.126e6}
README = {"1m": 1.4, "2m": 2.3, "5m": 5.1}
EXACT = {"1m": 1_460_844, "2m": 2_384_312, "5m": 5_126_440}

# 8x8 digits: stem stride 1, stages 1, 2, 1, 2 -> maps 8, 8, 4, 4, 2; stage 3 has 2x2 close and remote windows, stage 4
# one window (the whole 2x2 map).
TINY = dict(
  name="emov2",
  variant="custom",
  num_classes=10,
  image_size=8,
  in_channels=1,
  depths=(1, 2, 2, 2),
  widths=(8, 8, 16, 16),
  head_dims=(4, 4, 4, 4),
  stem_stride=1,
  stage_strides=(1, 2, 1, 2),
  window_size=2,
)


@pytest.mark.parametrize("variant", sorted(LOGGED))
def test_param_counts_match_the_authors(variant):
  model = build_model(dict(name="emov2", variant=variant))
  variables = jax.eval_shape(model.init, jax.random.key(0), jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32))
  count = count_params(variables["params"])
  assert count == model.num_params() == EXACT[variant]
  assert abs(count - LOGGED[variant]) <= 5e-4 * LOGGED[variant]  # fvcore's rounding to 4 digits
  assert int(count / 1e5) / 10 == README[variant]
  logits, out = jax.eval_shape(model.apply, variables, jax.ShapeDtypeStruct((2, 224, 224, 3), jnp.float32))
  assert logits.shape == (2, 1000) and logits.dtype == jnp.float32 and out.aux_loss.shape == ()


@pytest.fixture(scope="module")
def tiny():
  model = build_model(TINY)
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  variables = jax.jit(model.init)(jax.random.key(1), images)
  return model, variables, images


def test_tiny_shapes_and_count(tiny):
  model, variables, images = tiny
  logits, out = jax.jit(model.apply)(variables, images)
  assert logits.shape == (4, 10) and logits.dtype == jnp.float32 and bool(jnp.all(jnp.isfinite(logits)))
  assert out.aux_loss.shape == ()
  assert model.num_params() == count_params(variables["params"])
  assert variables["params"]["stage3_block1"]["qk"]["kernel"].value.shape == (16, 32)  # attention in stages 3-4
  assert "qk" not in variables["params"]["stage3_block0"]  # the downsampling block expands with a 1x1 conv
  assert variables["params"]["stage4_block0"]["expand"]["kernel"].value.shape == (16, int(16 * 3.5 * 2))


def test_batch_stats_update_only_in_training(tiny):
  model, variables, images = tiny
  apply = jax.jit(model.apply, static_argnames=("deterministic", "mutable"))
  _, mutated = apply(variables, images, deterministic=True, mutable=("batch_stats",))
  jax.tree.map(np.testing.assert_array_equal, mutated["batch_stats"], variables["batch_stats"])
  _, mutated = apply(
    variables, images, deterministic=False, mutable=("batch_stats",), rngs={"dropout": jax.random.key(2)}
  )
  old, new = jax.tree.leaves(variables["batch_stats"]), jax.tree.leaves(mutated["batch_stats"])
  # Every statistic moves; some only slightly: each stage's downsampling block has no shortcut, so at init its output
  # is LayerScale's 1e-6 times its branch and the next norms see tiny activations (as in the authors' code).
  assert all(bool(np.any(a != b)) for a, b in zip(old, new))
  kernel = variables["params"]["stem_conv"]["kernel"].value  # zero bias at init
  conv = jax.lax.conv_general_dilated(
    images, kernel, (1, 1), ((1, 1), (1, 1)), dimension_numbers=("NHWC", "HWIO", "NHWC")
  )
  mean = mutated["batch_stats"]["stem_bn"]["mean"]
  np.testing.assert_allclose(mean, 0.1 * conv.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-6)  # momentum 0.9


@pytest.mark.parametrize("operator, norm", [("conv", "batch"), ("attention", "layer")])
def test_block_is_near_identity_at_init_and_linear_in_layer_scale(operator, norm):
  block = I2RMB(features=16, exp_ratio=3.0, operator=operator, norm=norm, head_dim=4, window_size=2)
  x = jax.random.normal(jax.random.key(0), (2, 4, 4, 16))
  variables = block.init(jax.random.key(1), x)
  apply = jax.jit(block.apply)
  out = apply(variables, x)
  rel = float(jnp.linalg.norm(out - x) / jnp.linalg.norm(x))
  assert 0 < rel < 1e-4  # LayerScale 1e-6: the shortcut carries the block at init

  def with_gamma(g):
    params = nn.meta.unbox(variables["params"])
    params = {**params, "layer_scale": jnp.full((16,), g)}
    return apply({**variables, "params": params}, x)

  np.testing.assert_array_equal(with_gamma(0.0), x)  # out = x + gamma * branch exactly
  branch = with_gamma(1.0) - x
  assert float(jnp.linalg.norm(branch)) > 0.1 * float(jnp.linalg.norm(x))  # the branch is alive
  np.testing.assert_allclose(with_gamma(2.0) - x, 2 * branch, rtol=1e-4, atol=1e-5)
  np.testing.assert_allclose(out - x, 1e-6 * branch, atol=2e-6)


def test_downsampling_block_has_no_shortcut():
  block = I2RMB(features=8, exp_ratio=4.0, stride=2, shortcut=False)
  x = jax.random.normal(jax.random.key(0), (2, 8, 8, 4))
  variables = block.init(jax.random.key(1), x)
  out = block.apply(variables, x)
  assert out.shape == (2, 4, 4, 8) and float(jnp.max(jnp.abs(out))) < 1e-4  # gamma * branch only


def test_window_partitions_by_hand():
  grid = jnp.arange(16.0).reshape(1, 4, 4, 1)
  close = window_partition(grid, (2, 2), "close")[..., 0]
  remote = window_partition(grid, (2, 2), "remote")[..., 0]
  np.testing.assert_array_equal(close, [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]])
  np.testing.assert_array_equal(remote, [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]])
  for mode in ("close", "remote"):
    parts = window_partition(grid, (2, 2), mode)
    np.testing.assert_array_equal(window_merge(parts, (2, 2), mode, 4, 4), grid)


def _reference_attention(q, k, v, heads, groups):
  """Per-token numpy attention over the tokens of its group (lists of flat indices); q, k, v [B, N, C]."""
  b, n, _ = q.shape
  dk, dv = q.shape[-1] // heads, v.shape[-1] // heads
  out = np.zeros((b, n, v.shape[-1]))
  for group in groups:
    for h in range(heads):
      qh, kh = q[:, group, h * dk : (h + 1) * dk], k[:, group, h * dk : (h + 1) * dk]
      logits = np.einsum("bqd,bkd->bqk", qh, kh) / np.sqrt(dk)
      p = np.exp(logits - logits.max(-1, keepdims=True))
      p /= p.sum(-1, keepdims=True)
      out[:, np.array(group)[:, None], np.arange(h * dv, (h + 1) * dv)] = p @ v[:, group, h * dv : (h + 1) * dv]
  return out


def test_windowed_attention_against_hand_built_references():
  rng = np.random.default_rng(0)
  q, k = rng.normal(size=(2, 2, 4, 4, 6)).astype(np.float32)
  v = rng.normal(size=(2, 4, 4, 10)).astype(np.float32)  # heads 2: dk 3, dv 5
  flat = [x.reshape(2, 16, -1) for x in (q, k, v)]

  def run(window, mode):
    return np.asarray(window_attention(q, k, v, num_heads=2, window=window, mode=mode)).reshape(2, 16, -1)

  everything = [list(range(16))]
  global_attention = _reference_attention(*flat, 2, everything)
  for mode in ("close", "remote"):  # window = the whole map: both are global attention
    np.testing.assert_allclose(run((4, 4), mode), global_attention, rtol=1e-5, atol=1e-5)
  hybrid = hybrid_window_attention(q, k, v, num_heads=2, window=(4, 4))
  np.testing.assert_allclose(np.asarray(hybrid).reshape(2, 16, -1), 2 * global_attention, rtol=1e-5, atol=1e-5)
  close_groups = [[0, 1, 4, 5], [2, 3, 6, 7], [8, 9, 12, 13], [10, 11, 14, 15]]
  remote_groups = [[0, 2, 8, 10], [1, 3, 9, 11], [4, 6, 12, 14], [5, 7, 13, 15]]
  np.testing.assert_allclose(run((2, 2), "close"), _reference_attention(*flat, 2, close_groups), rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(run((2, 2), "remote"), _reference_attention(*flat, 2, remote_groups), rtol=1e-5, atol=1e-5)
  assert not np.allclose(run((2, 2), "close"), run((2, 2), "remote"))


def test_drop_path_uses_the_dropout_rng(tiny):
  _, variables, images = tiny
  model = build_model({**TINY, "drop_path_rate": 0.5})
  apply = jax.jit(model.apply, static_argnames=("deterministic", "mutable"))

  def train_logits(seed):
    (logits, _), _ = apply(
      variables, images, deterministic=False, mutable=("batch_stats",), rngs={"dropout": jax.random.key(seed)}
    )
    return logits

  a, b = train_logits(0), train_logits(1)
  assert float(jnp.max(jnp.abs(a - b))) > 1e-3 * float(jnp.max(jnp.abs(a)))  # logits are ~1e-9 at init (LayerScale)
  np.testing.assert_array_equal(train_logits(0), train_logits(0))


def test_a_few_optimizer_steps_on_digits_lower_the_loss(tiny):
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel

  model, variables, _ = tiny
  digits = load_digits()
  images = jnp.asarray(digits.images[:64, :, :, None] / 16.0, jnp.float32)
  labels = jnp.asarray(digits.target[:64])
  params, stats = nn.meta.unbox(variables["params"]), variables["batch_stats"]
  opt = optax.adam(3e-3)

  def loss_fn(params, stats):
    (logits, _), state = model.apply(
      {"params": params, "batch_stats": stats}, images, deterministic=False, mutable=["batch_stats"]
    )
    return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean(), state["batch_stats"]

  @jax.jit
  def step(params, stats, opt_state):
    (loss, stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats)
    updates, opt_state = opt.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), stats, opt_state, loss

  opt_state, losses = opt.init(params), []
  for _ in range(8):
    params, stats, opt_state, loss = step(params, stats, opt_state)
    losses.append(float(loss))
  assert losses[-1] < losses[0] - 0.05, losses


@pytest.mark.parametrize(
  "shape, match",
  [
    ((2, 6, 6, 1), "multiples of the total stride 4"),
    ((2, 12, 12, 1), "stage 4 a 3x3 feature map that does not divide into 2x2 windows"),
    ((2, 8, 8, 3), "3 channels but config.model.in_channels=1"),
  ],
)
def test_images_the_model_cannot_take_raise_one_line(tiny, shape, match):
  model, variables, _ = tiny
  with pytest.raises(ValueError, match=match) as error:
    model.apply(variables, jnp.zeros(shape))
  assert "\n" not in str(error.value)


@pytest.mark.parametrize(
  "bad, match",
  [
    (dict(variant="3m"), "variant='3m' is invalid"),
    (dict(variant="1m"), "fixes depths and widths"),
    (dict(depths=None), "needs config.model.depths"),
    (dict(head_dims=(4, 4, 5, 4)), r"head_dims\[2\]=5 must divide widths\[2\]=16"),
    (dict(image_size=10), "image_size=10: an image of 10x10 must have height and width multiples"),
    (dict(window_size=3), "does not divide into 3x3 windows"),
    (dict(stage_strides=(1, 3, 1, 2)), "stage_strides"),
    (dict(drop_path_rate=1.0), "drop_path_rate"),
  ],
)
def test_bad_config_raises(bad, match):
  with pytest.raises(ConfigError, match=match) as error:
    build_model({**TINY, **bad})
  assert "\n" not in str(error.value)
