"""BlockFFN: router, losses, sparsity metrics and the lambda schedule by hand; the model and its chunk-skip path."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model_testing
from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.blockffn import BlockFFNLayer
from zoo.routing import sparsity


def test_relu_rmsnorm_router_by_hand():
  # ReLU -> [3, 0, 4, 0]; RMS = sqrt((9 + 16) / 4) = 2.5 -> [1.2, 0, 1.6, 0]; gain scales each expert.
  r = sparsity.relu_rmsnorm_router(jnp.array([[3.0, -1.0, 4.0, 0.0]]), jnp.array([1.0, 5.0, 0.5, 2.0]), epsilon=0.0)
  np.testing.assert_allclose(r, [[1.2, 0.0, 0.8, 0.0]], rtol=1e-6)


def test_chunk_loss_and_sparsity_metrics_by_hand():
  r = jnp.array([[[1.0, 0.0], [1.0, 1.0]]])  # p = [[1, 0], [0.5, 0.5]]
  # Chunk of 2: prod(1 - p) = [0 * 0.5, 1 * 0.5] -> mean 0.25 -> loss 0.75.
  np.testing.assert_allclose(sparsity.chunk_sparsification_loss(r, 2), 0.75, rtol=1e-6)
  # Chunks of 1: 1 - p -> [[0, 1], [0.5, 0.5]] -> mean 0.5 -> loss 0.5.
  np.testing.assert_allclose(sparsity.chunk_sparsification_loss(r, 1), 0.5, rtol=1e-6)
  assert float(sparsity.token_level_sparsity(r)) == 0.25
  assert float(sparsity.chunk_level_sparsity(r, 1)) == 0.25
  assert float(sparsity.chunk_level_sparsity(r, 2)) == 0.0  # both experts fire somewhere in the chunk
  with pytest.raises(ValueError, match="chunk_length=3"):
    sparsity.chunk_level_sparsity(r, 3)


def test_activation_locality_by_hand():
  s = jnp.zeros((1, 2, 1))
  # BCE(logit 0, target sigmoid(0) = 0.5) = log 2.
  np.testing.assert_allclose(sparsity.activation_locality_loss(s, alpha=1.0), np.log(2), rtol=1e-6)
  # A document boundary between the two tokens leaves no pair.
  assert float(sparsity.activation_locality_loss(s, segment_ids=jnp.array([[0, 1]]))) == 0.0
  # Agreeing signs cost less than disagreeing ones.
  agree = sparsity.activation_locality_loss(jnp.array([[[0.1], [0.1]]]))
  disagree = sparsity.activation_locality_loss(jnp.array([[[0.1], [-0.1]]]))
  assert float(agree) < float(disagree)


def test_activation_locality_differentiates_the_target():
  # One pair, one expert, alpha 1: loss = softplus(a) - a sigmoid(b) with a = s_0, b = s_1 (the authors'
  # BCEWithLogits with an undetached target). d/da = sigmoid(a) - sigmoid(b); d/db = -a sigmoid(b) (1 - sigmoid(b)).
  a, b = 1.0, 0.0
  sig = lambda v: 1.0 / (1.0 + np.exp(-v))
  grad = jax.grad(lambda s: sparsity.activation_locality_loss(s, alpha=1.0))(jnp.array([[[a], [b]]]))
  np.testing.assert_allclose(np.asarray(grad)[0, :, 0], [sig(a) - sig(b), -a * sig(b) * (1 - sig(b))], rtol=1e-6)
  assert float(grad[0, 1, 0]) == pytest.approx(-0.25)  # the later token is pulled too


def test_cls_windows_drop_the_tail_by_hand():
  # 5 tokens, 2 experts; windows of 2 -> tokens [0, 1] and [2, 3], token 4 left out (as the authors truncate).
  r = jnp.array([[[1.0, 0.0], [0.0, 0.0], [0.0, 0.0], [0.0, 1.0], [1.0, 1.0]]])
  # window 1: expert 0 on, expert 1 off; window 2: expert 0 off, expert 1 on -> 2 of 4 pairs off.
  assert float(sparsity.chunk_level_sparsity(r, 2)) == 0.5
  # windows of 4: tokens 0-3, both experts on somewhere -> 0.
  assert float(sparsity.chunk_level_sparsity(r, 4)) == 0.0
  # windows of 1 = TLS: 1 + 2 + 2 + 1 + 0 = 6 of 10 pairs off.
  assert float(sparsity.chunk_level_sparsity(r, 1)) == pytest.approx(0.6)
  # windows of 3: tokens 0-2 (3 and 4 left out), expert 1 off -> 1 of 2.
  assert float(sparsity.chunk_level_sparsity(r, 3)) == 0.5
  with pytest.raises(ValueError, match="chunk_length=6"):
    sparsity.chunk_level_sparsity(r, 6)


def test_chunk_lambda_schedule_by_hand():
  # The authors' AdaptiveLinearScheduler with start 1, stable_iter 4, step_iter 2, min 1.025, max 4. Windows of 2
  # steps; from step 4 on, at each window end, ratio = this window's mean / the previous one's, raised to >= 1.025
  # when > 1, capped so lambda <= 4; lambda ramps linearly to lambda * ratio over the next 2 steps.
  losses = [4, 4, 2, 2, 3, 3, 3.03, 3.03, 30.3, 30.3, 60.6, 60.6]
  # step 4: 2 / 4 = 0.5 -> ramp 1 -> 0.5: steps 5, 6 use 0.75, 0.5.
  # step 6: 3 / 2 = 1.5 -> ramp 0.5 -> 0.75: steps 7, 8 use 0.625, 0.75.
  # step 8: 3.03 / 3 = 1.01 -> raised to 1.025 -> ramp 0.75 -> 0.76875: steps 9, 10 use 0.759375, 0.76875.
  # step 10: 30.3 / 3.03 = 10 -> capped at 4 / 0.76875 -> ramp to 4: steps 11, 12 use 2.384375, 4.
  # step 12: 60.6 / 30.3 = 2 -> capped at 4 / 4 = 1: lambda stays 4.
  used = [1, 1, 1, 1, 0.75, 0.5, 0.625, 0.75, 0.759375, 0.76875, 2.384375, 4, 4]  # lambda of steps 1..13
  state = sparsity.init_chunk_lambda_state(1.0)
  lambdas = [float(state["lambda"])]
  for loss in losses:
    state = sparsity.update_chunk_lambda(state, jnp.float32(loss), initial=1.0, warmup_steps=4, interval=2)
    lambdas.append(float(state["lambda"]))
  np.testing.assert_allclose(lambdas, used, rtol=1e-5)
  assert int(state["step"]) == 12


def test_chunk_lambda_waits_for_the_stable_steps_and_keeps_a_ratio_of_one():
  # Before stable_iter (here 6) nothing adapts, even at a window end; a ratio of exactly 1 is not raised to 1.025.
  state = sparsity.init_chunk_lambda_state(2.0)
  lambdas = []
  for loss in [8, 8, 1, 1, 1, 1, 1, 1]:
    state = sparsity.update_chunk_lambda(state, jnp.float32(loss), initial=2.0, warmup_steps=6, interval=2)
    lambdas.append(float(state["lambda"]))
  # step 4 (ratio 1/8) is before step 6: no change; step 6: ratio 1 -> stays 2; step 8: ratio 1 -> stays 2.
  np.testing.assert_allclose(lambdas, [2.0] * 8, rtol=1e-6)


def test_chunk_sparse_ffn_equals_dense_experts():
  x = jax.random.normal(jax.random.key(0), (2, 8, 6))
  r = jax.nn.relu(jax.random.normal(jax.random.key(1), (2, 8, 5)) - 0.8)
  r = r.at[:, :4, 2].set(0.0)  # expert 2 off for the first chunk of 4
  w = {"up": jax.random.normal(jax.random.key(2), (5, 6, 3)), "down": jax.random.normal(jax.random.key(3), (5, 3, 6))}
  per_expert = jnp.stack([jax.nn.silu(x @ w["up"][e]) @ w["down"][e] for e in range(5)], axis=2)  # [b, t, e, d]
  dense = jnp.einsum("bte,bted->btd", r, per_expert)
  np.testing.assert_allclose(sparsity.chunk_sparse_ffn(x, r, w, 4), dense, rtol=1e-5, atol=1e-5)


TINY = dict(
  model_testing.TINY_MOE,
  name="blockffn",
  chunk_length=4,
  cls_lengths=(2, 4, 8, 16),
  chunk_warmup_steps=2,
  chunk_interval=2,
)
tiny = model_testing.tiny_fixture(TINY)


def test_shapes_params_metrics_and_aux(tiny):
  model, tokens, variables = tiny
  assert count_params(variables["params"]) == model.num_params()
  logits, out = jax.jit(model.apply)(variables, tokens)
  assert logits.shape == (2, 8, 32)
  m = out.metrics
  for key in ("tls", "cls_2", "cls_4", "cls_8", "activation_locality", "chunk_sparsification", "active_experts"):
    assert m[key].shape == (2,), key
  assert "cls_16" not in m  # longer than the 8-token call
  assert np.all((m["tls"] >= 0) & (m["tls"] <= 1))
  assert np.all(m["cls_8"] <= m["cls_4"] + 1e-6) and np.all(m["cls_4"] <= m["cls_2"] + 1e-6)
  assert np.all(m["cls_2"] <= m["tls"] + 1e-6)


def test_losses_are_averaged_over_layers(tiny):
  # The authors divide the summed per-layer locality and chunk losses by the number of layers (2 here).
  model, tokens, variables = tiny
  _, out = jax.jit(model.apply)(variables, tokens)
  loc, chunk = np.asarray(out.metrics["activation_locality"]), np.asarray(out.metrics["chunk_sparsification"])
  expected = 2e-3 * (loc[0] + loc[1]) / 2 + 5e-2 * (chunk[0] + chunk[1]) / 2
  np.testing.assert_allclose(out.aux_loss, expected, rtol=1e-5)
  assert abs(float(out.aux_loss) - (2e-3 * loc.sum() + 5e-2 * chunk.sum())) > 1e-4


def test_chunk_loss_takes_p_before_the_gain():
  # Router kernel = identity, so s = x: tokens [1, 3] and [2, 0]. Before the gain p = ReLU(s) / sum = [0.25, 0.75],
  # [1, 0]; one chunk of 2: prod(1 - p) = [0.75 * 0, 0.25 * 1] -> mean 0.125 -> loss 0.875. With the gain [1, 3]
  # taken into p it would be [0.1, 0.9], [1, 0] -> prod [0, 0.1] -> loss 0.95.
  layer = BlockFFNLayer(num_experts=2, expert_mlp_dim=4, chunk_length=2, cls_lengths=(1, 2), dispatch="dense")
  x = jnp.array([[[1.0, 3.0], [2.0, 0.0]]])
  variables = layer.init(jax.random.key(0), x)
  params = nn.meta.unbox(variables["params"])
  params["router"] = {"kernel": jnp.eye(2), "gain": jnp.array([1.0, 3.0])}
  _, (aux, metrics, _) = layer.apply({"params": params}, x)
  np.testing.assert_allclose(aux["chunk_sparsification"], 0.875, rtol=1e-5)
  assert float(metrics["cls_1"]) == 0.25 and float(metrics["cls_2"]) == 0.0  # one (token, expert) pair is off
  grad = jax.grad(lambda p: layer.apply({"params": p}, x)[1][0]["chunk_sparsification"])(params)
  assert float(jnp.abs(grad["router"]["gain"]).max()) == 0.0  # the gain is not in this loss


def test_chunk_skip_dispatch_equals_dense_and_decoding_matches(tiny):
  model, tokens, variables = tiny
  full, _ = jax.jit(model.apply)(variables, tokens)
  skip_model = build_model(TINY, chunk_skip=True)
  skipped, _ = jax.jit(skip_model.apply)(variables, tokens)
  np.testing.assert_allclose(skipped, full, atol=1e-5)
  np.testing.assert_allclose(model_testing.decode_stepwise(skip_model, variables, tokens), full, atol=1e-5)


def test_train_steps_lower_the_loss_and_adapt_lambda(tiny):
  model, tokens, variables = tiny
  params, state = variables["params"], variables["routing_state"]
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  def loss_fn(params, state):
    (logits, out), updates = model.apply(
      {"params": params, "routing_state": state}, tokens, deterministic=False, mutable=["routing_state"]
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits[:, :-1], tokens[:, 1:]).mean()
    return ce + out.aux_loss, (ce, updates["routing_state"])

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  losses = []
  for _ in range(5):
    (_, (ce, state)), grads = grad_fn(params, state)
    assert np.any(np.asarray(grads["layers_0"]["ffn"]["router"]["gain"]) != 0)
    updates, opt = tx.update(grads, opt)
    params = optax.apply_updates(params, updates)
    losses.append(float(ce))
  assert losses[-1] < losses[0]
  lam = state["chunk_lambda"]
  assert int(lam["step"]) == 5
  # Adapted at step 4 (the first window end from the 2-step stable phase on, with a previous window): a ramp from
  # 5e-2 to 5e-2 times the ratio of the chunk losses, within 4 x 5e-2.
  assert int(lam["ramp_start"]) == 4 and float(lam["ramp_from"]) == pytest.approx(5e-2)
  assert float(lam["ramp_to"]) != pytest.approx(5e-2) and 0 < float(lam["ramp_to"]) <= 4 * 5e-2 + 1e-7
  assert float(lam["lambda"]) == pytest.approx(float(lam["ramp_to"]))  # the ramp of 2 steps is over after step 5


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(chunk_coef=-1.0), "chunk_coef=-1.0"),
    (dict(chunk_length=0), "chunk_length=0"),
    (dict(cls_lengths=(8, 0)), "cls_lengths=\\(8, 0\\)"),
    (dict(cls_lengths=(8, 8)), "cls_lengths=\\(8, 8\\)"),
    (dict(cls_lengths=8), "cls_lengths=8"),
    (dict(chunk_max_factor=0.5), "chunk_max_factor=0.5"),
  ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**TINY, **overrides})
