"""SMoE-Dropout: k schedules by hand and as the authors' code computes them, slot truncation, the step counter in
'routing_state' (per optimizer step under gradient accumulation), the frozen router and its initialisation."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model_testing
from zoo import routing
from zoo.models import ConfigError, build_model
from zoo.routing.sparsity import expert_count_schedule, truncate_routing

# The authors' schedules (VITA-Group/Random-MoE-as-Dropout, new_utils.py `calculate_gate_number`, '*_increase'
# modes) written out, with Python's round (half to even), then clipped to [k_min, k_max].
AUTHORS = {
  "linear": lambda t, T, lo, hi: round((hi - lo) * t / T) + lo,
  "cosine": lambda t, T, lo, hi: round((lo - hi) * np.cos(np.pi * t / (2 * T))) + hi,
  "exponential": lambda t, T, lo, hi: round((lo - hi) * 0.99 ** (t // (T // 300))) + hi,
  "step": lambda t, T, lo, hi: [1, 2, 4, 8, 16][int(5 * t / T)],
}


@pytest.mark.parametrize(
  "kind,steps,expected",
  [
    # round(6 t / 600) + 2: t=50 -> round(0.5) = 0 -> 2, t=150 -> round(1.5) = 2 -> 4, t=250 -> round(2.5) = 2 -> 4,
    # t=450 -> round(4.5) = 4 -> 6 (halves to even); held at k_max after T.
    ("linear", [0, 50, 100, 150, 250, 300, 450, 599, 600, 700], [2, 2, 3, 4, 4, 5, 6, 8, 8, 8]),
    # 8 + round(-6 cos(pi t / 1200)): t=200 -> -5.20 -> 3; t=300 -> -4.24 -> 4; t=400 -> -3.0000000000000004 -> 5;
    # t=450 -> -2.30 -> 6; t=600 -> -0 -> 8. (The old half cosine gave 5 at t=300.)
    ("cosine", [0, 150, 200, 300, 400, 450, 599, 600], [2, 2, 3, 4, 5, 6, 8, 8]),
    # 8 + round(-6 * 0.99^(t // 2)) (T // 300 = 2): t=50 -> 0.99^25 = 0.778 -> -4.67 -> 3; t=100 -> 0.605 -> 4;
    # t=300 -> 0.99^150 = 0.221 -> -1.33 -> 7; t=600 -> 0.99^300 = 0.049 -> -0.29 -> 8.
    ("exponential", [0, 50, 100, 300, 600], [2, 3, 4, 7, 8]),
    # [1, 2, 4, 8, 16][int(5 t / 600)] clipped to [2, 8]: 1 -> 2 up to t=239, 4 from 240, 8 from 360 (16 -> 8 from
    # 480); t=600 keeps the last entry (the authors' index runs past the list there).
    ("step", [0, 119, 120, 239, 240, 359, 360, 480, 600], [2, 2, 2, 2, 4, 4, 8, 8, 8]),
    ("constant", [0, 300], [8, 8]),
  ],
)
def test_k_schedules_by_hand(kind, steps, expected):
  got = [int(expert_count_schedule(t, 600, 2, 8, kind)) for t in steps]
  assert got == expected


@pytest.mark.parametrize("kind", sorted(AUTHORS))
@pytest.mark.parametrize("total,k_min,k_max", [(600, 2, 8), (900, 1, 16), (301, 3, 7)])
def test_k_schedules_equal_the_authors_at_every_step(kind, total, k_min, k_max):
  want = [int(np.clip(AUTHORS[kind](t, total, k_min, k_max), k_min, k_max)) for t in range(total)]
  traced = jax.jit(jax.vmap(lambda t: expert_count_schedule(t, total, k_min, k_max, kind)))
  assert traced(jnp.arange(total)).tolist() == want


def test_exponential_schedule_under_300_steps():
  # The authors' interval T // 300 is 0 below 300 steps; here it is 1: 4 + round(-3 * 0.99^t) over T = 100.
  want = [int(np.clip(round(-3 * 0.99**t) + 4, 1, 4)) for t in range(101)]
  assert [int(expert_count_schedule(t, 100, 1, 4, "exponential")) for t in range(101)] == want


def test_linear_schedule_by_hand_and_traced():
  # round(8 t / 100) + 8: the paper's linear growth from k_min = 8 to k_max = 16 over T = 100 steps, then flat.
  assert [int(expert_count_schedule(t, 100, 8, 16)) for t in (0, 50, 100, 200)] == [8, 12, 16, 16]
  k = jax.jit(lambda s: expert_count_schedule(s, 10, 8, 16))(jnp.int32(5))
  assert int(k) == 12


def test_truncate_routing_by_hand():
  probs = jnp.array([[0.1, 0.2, 0.3, 0.4], [0.5, 0.15, 0.25, 0.1]])
  r = truncate_routing(routing.softmax_topk(jnp.log(probs), 3), jnp.int32(2))
  np.testing.assert_array_equal(r.expert_ids, [[3, 2, -1], [0, 2, -1]])
  # Softmax over the 2 kept logits = the 2 probabilities renormalised.
  np.testing.assert_allclose(r.weights, [[4 / 7, 3 / 7, 0], [0.5 / 0.75, 0.25 / 0.75, 0]], rtol=1e-6)
  np.testing.assert_allclose(r.metrics["expert_load"], [0.25, 0, 0.5, 0.25], rtol=1e-6)
  assert float(r.metrics["active_k"]) == 2


def test_bad_schedules_raise():
  with pytest.raises(ValueError, match="k schedule 'sqrt'"):
    expert_count_schedule(0, 10, 1, 4, "sqrt")
  with pytest.raises(ValueError, match="k_min=5, k_max=4"):
    expert_count_schedule(0, 10, 5, 4)
  with pytest.raises(ValueError, match="k_min=0"):
    expert_count_schedule(0, 10, 0, 4)


TINY = dict(model_testing.TINY_MOE, name="smoe_dropout", num_experts_per_tok=4, k_min=1, k_schedule_steps=3)
tiny = model_testing.tiny_fixture(TINY)


def test_step_counter_grows_k_in_training_only(tiny):
  model, tokens, variables = tiny
  assert "router" not in str(jax.tree_util.tree_structure(variables["params"]))  # the router is not trained
  train_apply = jax.jit(lambda v: model.apply(v, tokens, deterministic=False, mutable=["routing_state"]))
  ks = []
  for _ in range(5):
    (_, out), updates = train_apply(variables)
    variables = {**variables, **updates}
    ks.append(out.metrics["active_k"].tolist())
  # linear 1 -> 4 over 3 steps: round(3 t / 3) + 1; one k per MoE layer.
  assert ks == [[1, 1], [2, 2], [3, 3], [4, 4], [4, 4]]
  step = variables["routing_state"]["layers_0"]["ffn"]["router"]["step"]
  assert int(step) == 5
  # Evaluation neither reads nor moves the counter: it uses eval_k (default k_max).
  logits, out = model.apply(variables, tokens)
  assert out.metrics["active_k"].tolist() == [4, 4]
  assert logits.shape == (2, 8, 32) and float(out.aux_loss) == 0.0


def test_k_follows_the_optimizer_step_under_gradient_accumulation(tiny):
  # 2 micro-batches per optimizer step: the counter still counts forward passes, k the optimizer steps (counter // 2).
  _, tokens, variables = tiny
  model = build_model(TINY, grad_accum_steps=2)
  train_apply = jax.jit(lambda v: model.apply(v, tokens, deterministic=False, mutable=["routing_state"]))
  ks = []
  for _ in range(8):
    (_, out), updates = train_apply(variables)
    variables = {**variables, **updates}
    ks.append(int(out.metrics["active_k"][0]))
  assert ks == [1, 1, 2, 2, 3, 3, 4, 4]
  assert int(variables["routing_state"]["layers_0"]["ffn"]["router"]["step"]) == 8


def test_config_links_grad_accum_steps():
  # --config.train.grad_accum_steps=N reaches the model, so k stays a function of the optimizer step.
  from configs.smoe_dropout import get_config
  from configs.smoe_dropout_baseline import get_config as get_baseline_config

  config = get_config()
  assert build_model(config.model).grad_accum_steps == 1
  config.train.grad_accum_steps = 4
  assert build_model(config.model).grad_accum_steps == 4
  assert "grad_accum_steps" not in get_baseline_config().model  # the learned-router baseline has no k schedule


def test_router_init_is_the_authors_effective_one():
  # The authors' nn.Linear gate is re-initialised by train.py's weights_init: weight ~ N(0, 0.02), bias 0 (and
  # frozen), so the router holds a N(0, 0.02) kernel and no bias, in 'routing_state' (not trained).
  model = build_model({**TINY, "embed_dim": 64, "num_experts": 64, "num_experts_per_tok": 8, "num_heads": 4})
  variables = jax.jit(model.init)(jax.random.key(1), jnp.zeros((1, 4), jnp.int32))
  router = variables["routing_state"]["layers_0"]["ffn"]["router"]
  assert set(router) == {"kernel", "step"}
  kernel = np.asarray(nn.meta.unbox(router["kernel"]))
  assert kernel.shape == (64, 64)
  # 4096 draws: standard errors ~3e-4 (mean) and ~2.2e-4 (std); PyTorch's default U(-1/8, 1/8) has std 0.072.
  assert abs(kernel.mean()) < 2e-3 and abs(kernel.std() - 0.02) < 1e-3


def test_eval_k_changes_outputs_and_uses_k_experts(tiny):
  _, tokens, variables = tiny
  outputs = {}
  for k in (1, 2, 4):
    logits, out = build_model(TINY, eval_k=k).apply(variables, tokens)
    outputs[k] = logits
    assert out.metrics["active_k"].tolist() == [k, k]
  assert not np.allclose(outputs[1], outputs[4], atol=1e-4)
  assert not np.allclose(outputs[2], outputs[4], atol=1e-4)


def test_train_steps_lower_the_loss_and_leave_the_router_frozen(tiny):
  model, tokens, variables = tiny
  params, state = variables["params"], variables["routing_state"]
  kernel0 = state["layers_0"]["ffn"]["router"]["kernel"]
  tx = optax.adam(1e-2)
  opt = tx.init(params)

  def loss_fn(params, state):
    (logits, out), updates = model.apply(
      {"params": params, "routing_state": state}, tokens[:, :-1], deterministic=False, mutable=["routing_state"]
    )
    ce = optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]).mean()
    return ce + out.aux_loss, (ce, updates["routing_state"])

  grad_fn = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  losses = []
  for _ in range(5):
    (_, (ce, state)), grads = grad_fn(params, state)
    updates, opt = tx.update(grads, opt)
    params = optax.apply_updates(params, updates)
    losses.append(float(ce))
  assert losses[-1] < losses[0]
  np.testing.assert_array_equal(jax.tree.leaves(state["layers_0"]["ffn"]["router"]["kernel"]), jax.tree.leaves(kernel0))


def test_cached_decoding_matches_the_full_forward(tiny):
  _, tokens, variables = tiny
  model, tokens = build_model(TINY, eval_k=2), tokens[:, :6]
  full, _ = model.apply(variables, tokens)
  np.testing.assert_allclose(model_testing.decode_stepwise(model, variables, tokens), full, atol=1e-5)


@pytest.mark.parametrize(
  "overrides,match",
  [
    (dict(k_min=5), "k_min=5"),
    (dict(eval_k=7), "eval_k=7"),
    (dict(k_schedule="sqrt"), "k_schedule='sqrt'"),
    (dict(router="softmax_topk"), "router is not a field of model 'smoe_dropout'"),  # its router is fixed
  ],
)
def test_config_errors(overrides, match):
  with pytest.raises(ConfigError, match=match):
    build_model({**TINY, **overrides})
