"""SMoE-Dropout: k schedules by hand, slot truncation, the step counter in 'routing_state', the frozen router."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import model_testing
from zoo import routing
from zoo.models import ConfigError, build_model
from zoo.routing.sparsity import expert_count_schedule, truncate_routing


@pytest.mark.parametrize(
  "kind,k_min,k_max,total,steps,expected",
  [
    # round(6 * t / 6) + 2, clipped outside [0, T].
    ("linear", 2, 8, 6, [-1, 0, 3, 6, 100], [2, 2, 5, 8, 8]),
    # 2 + round(6 (1 - cos(pi s)) / 2): s=1/6 -> 0.40 -> 2; s=1/2 -> 3 -> 5; s=5/6 -> 5.60 -> 8.
    ("cosine", 2, 8, 6, [1, 3, 5, 6], [2, 5, 8, 8]),
    # round(16^(t/4)): 1, 2, 4, 8, 16.
    ("exponential", 1, 16, 4, [0, 1, 2, 3, 4], [1, 2, 4, 8, 16]),
    # 3 doublings in 4 intervals of 2 steps: 1, 1, 2, 2, 4, 4, 8, 8, 8.
    ("step", 1, 8, 8, list(range(9)), [1, 1, 2, 2, 4, 4, 8, 8, 8]),
    ("constant", 1, 8, 8, [0, 4], [8, 8]),
  ],
)
def test_k_schedules_by_hand(kind, k_min, k_max, total, steps, expected):
  got = [int(expert_count_schedule(s, total, k_min, k_max, kind)) for s in steps]
  assert got == expected


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
