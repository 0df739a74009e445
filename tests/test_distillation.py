"""LSF-IDM (papers.md F): the distillation loss on hand-written logits, the BiLSTM student (shapes, masking, the
backward direction), the 'distillation' model (a frozen teacher that no gradient reaches) and task (sums, finalize,
options), and a short distillation of a fixed random teacher on a tiny synthetic task."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

from zoo.engine import partition
from zoo.models import ConfigError, build_model
from zoo.tasks import get_task
from zoo.tasks.distillation import distillation_loss, distillation_terms

V, T, C = 8, 6, 3
TEACHER = dict(name="text_encoder", vocab_size=V, num_layers=1, embed_dim=8, num_heads=2, mlp_dim=16, num_classes=C)
STUDENT = dict(name="bilstm", vocab_size=V, embed_dim=8, hidden_dim=8, num_classes=C)
MODEL = dict(name="distillation", teacher=TEACHER, student=STUDENT)

# Hand-written logits of 2 examples over 3 classes.
S = np.array([[1.0, 2.0, 0.5], [0.0, -1.0, 3.0]], np.float32)
TL = np.array([[2.0, 0.0, 1.0], [1.0, 1.0, 1.0]], np.float32)
Y = np.array([1, 2], np.int32)


def _log_softmax(z):
  z = np.asarray(z, np.float64)
  return z - np.log(np.sum(np.exp(z), axis=-1, keepdims=True))


def _np_ce(s, y):
  return -_log_softmax(s)[np.arange(len(y)), y]


def _np_kl(s, t, temperature):
  """KL(softmax(t / T) || softmax(s / T)) per row, from explicit exp and log."""
  log_p, log_q = _log_softmax(np.asarray(t) / temperature), _log_softmax(np.asarray(s) / temperature)
  return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)


# The loss


def test_distillation_loss_on_hand_written_logits():
  expected = 0.25 * _np_ce(S, Y) + 0.75 * 2.0**2 * _np_kl(S, TL, 2.0)
  np.testing.assert_allclose(expected, [0.70194222, 1.13970125], rtol=1e-7)  # the same numbers, written down
  loss = distillation_loss(jnp.asarray(S), jnp.asarray(TL), jnp.asarray(Y), 0.25, 2.0)
  assert loss.shape == (2,) and loss.dtype == jnp.float32
  np.testing.assert_allclose(loss, expected, rtol=1e-5)
  ce, kd = distillation_terms(jnp.asarray(S), jnp.asarray(TL), jnp.asarray(Y), 2.0)
  np.testing.assert_allclose(ce, [0.46436878, 0.0658839], rtol=1e-5)
  np.testing.assert_allclose(kd, 4.0 * np.array([0.19528334, 0.37441009]), rtol=1e-5)


def test_alpha_one_is_plain_cross_entropy():
  loss = distillation_loss(jnp.asarray(S), jnp.asarray(TL), jnp.asarray(Y), 1.0, 3.0)
  np.testing.assert_allclose(loss, _np_ce(S, Y), rtol=1e-5)
  np.testing.assert_allclose(loss, optax.softmax_cross_entropy_with_integer_labels(S, Y), rtol=1e-6)


def test_the_soft_term_is_scaled_by_t_squared():
  for temperature in (1.0, 2.0, 4.0):
    loss = distillation_loss(jnp.asarray(S), jnp.asarray(TL), jnp.asarray(Y), 0.0, temperature)
    np.testing.assert_allclose(loss, temperature**2 * _np_kl(S, TL, temperature), rtol=1e-5)
  # T^2 KL_T tends to the squared-logit-difference limit as T grows, so the scaled term stays of the same size
  kd = [float(jnp.sum(distillation_loss(jnp.asarray(S), jnp.asarray(TL), jnp.asarray(Y), 0.0, t))) for t in (8, 64)]
  assert 0.5 < kd[1] / kd[0] < 1.5


def test_kl_is_zero_when_student_equals_teacher():
  for temperature in (0.5, 2.0):
    loss = distillation_loss(jnp.asarray(S), jnp.asarray(S), jnp.asarray(Y), 0.0, temperature)
    np.testing.assert_allclose(loss, 0.0, atol=1e-6)
    loss = distillation_loss(jnp.asarray(S), jnp.asarray(S), jnp.asarray(Y), 0.5, temperature)
    np.testing.assert_allclose(loss, 0.5 * _np_ce(S, Y), rtol=1e-5)


# The BiLSTM student


@pytest.fixture(scope="module")
def bilstm():
  """(apply with the given model and variables, variables) of a 1-layer BiLSTM per pooling."""
  out = {}
  tokens = jnp.zeros((2, T), jnp.int32)
  for pooling in ("final", "mean"):
    model = build_model(dict(STUDENT, pooling=pooling))
    variables = model.init(jax.random.key(1), tokens)
    out[pooling] = (model, jax.jit(lambda v, t, m, model=model: model.apply(v, t, mask=m)[0]), variables)
  return out


def _tokens(seed, shape=(4, T)):
  return jax.random.randint(jax.random.key(seed), shape, 0, V)


def test_bilstm_shapes_and_parameter_count():
  model = build_model(dict(STUDENT, num_layers=2, dropout_rate=0.1))
  tokens = _tokens(0, (3, 5))
  variables = model.init(jax.random.key(0), tokens)
  logits, out = model.apply(variables, tokens, mask=jnp.ones((3, 5)))
  assert logits.shape == (3, C) and logits.dtype == jnp.float32 and out.aux_loss.shape == ()
  assert model.num_params() == sum(x.size for x in jax.tree.leaves(variables["params"]))
  paths = {"/".join(p[:2]) for p in traverse_util.flatten_dict(variables["params"])}
  assert {"forward_0/cell", "backward_0/cell", "forward_1/cell", "backward_1/cell", "embed/embedding"} <= paths
  dropped, _ = model.apply(variables, tokens, deterministic=False, rngs={"dropout": jax.random.key(2)})
  assert not np.allclose(dropped, logits)


@pytest.mark.parametrize("pooling", ["final", "mean"])
def test_bilstm_padding_after_the_real_tokens_changes_nothing(bilstm, pooling):
  _, apply, variables = bilstm[pooling]
  lengths = np.array([T, 4, 1, 3])
  mask = jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.float32)
  tokens = _tokens(3)
  other_padding = jnp.where(mask > 0, tokens, _tokens(4))
  logits = apply(variables, tokens, mask)
  np.testing.assert_allclose(apply(variables, other_padding, mask), logits, atol=1e-6)
  for i, n in list(enumerate(lengths))[1:3]:  # an example alone, unpadded
    alone = apply(variables, tokens[i : i + 1, :n], jnp.ones((1, n)))
    np.testing.assert_allclose(alone[0], logits[i], atol=1e-5)
  assert not np.allclose(apply(variables, tokens, jnp.ones((4, T))), logits, atol=1e-4)  # the mask matters


def _swap_directions(params, hidden):
  """The BiLSTM's params with the forward and backward cells exchanged, and the head's rows of the two halves of the
  pooled vector exchanged to match."""
  p = dict(params)
  p["forward_0"], p["backward_0"] = params["backward_0"], params["forward_0"]
  kernel = params["head"]["kernel"]
  value = kernel.value if hasattr(kernel, "value") else kernel
  swapped = jnp.concatenate([value[hidden:], value[:hidden]], axis=0)
  p["head"] = dict(params["head"], kernel=kernel.replace_boxed(swapped) if hasattr(kernel, "value") else swapped)
  return p


@pytest.mark.parametrize("pooling", ["final", "mean"])
def test_bilstm_backward_direction_reads_the_real_tokens_reversed(bilstm, pooling):
  """With the two directions' cells exchanged, reversing each sequence's real tokens gives the same logits: the
  backward LSTM reads the real tokens last to first (padding stays after them). A unidirectional model, or a
  'backward' one reading in order, fails this."""
  _, apply, variables = bilstm[pooling]
  lengths = np.array([T, 4, 2, 5])
  mask = jnp.asarray(np.arange(T)[None, :] < lengths[:, None], jnp.float32)
  tokens = np.asarray(_tokens(5))
  reversed_real = tokens.copy()
  for i, n in enumerate(lengths):
    reversed_real[i, :n] = tokens[i, :n][::-1]
  swapped = {"params": _swap_directions(variables["params"], STUDENT["hidden_dim"])}
  logits = apply(variables, jnp.asarray(tokens), mask)
  np.testing.assert_allclose(apply(swapped, jnp.asarray(reversed_real), mask), logits, atol=1e-5)
  # the model is not symmetric in its directions by chance: the unswapped params on reversed tokens differ
  assert not np.allclose(apply(variables, jnp.asarray(reversed_real), mask), logits, atol=1e-4)


def test_bilstm_config_errors():
  with pytest.raises(ConfigError, match="config.model.pooling"):
    build_model(dict(STUDENT, pooling="max"))
  with pytest.raises(ConfigError, match="config.model.hidden_dim"):
    build_model(dict(STUDENT, hidden_dim=0))


# The distillation model


@pytest.fixture(scope="module")
def distill():
  """(model with a dropout teacher, variables) of a tiny distillation model."""
  model = build_model(dict(MODEL, teacher=dict(TEACHER, dropout_rate=0.5)))
  return model, jax.jit(model.init)(jax.random.key(0), _tokens(0))


def test_distillation_model_outputs_and_sub_trees(distill):
  model, variables = distill
  tokens = _tokens(1)
  outputs, out = model.apply(variables, tokens, mask=jnp.ones(tokens.shape))
  assert set(outputs) == {"student", "teacher"} and all(v.shape == (4, C) for v in outputs.values())
  assert set(variables["params"]) == {"teacher", "student"} and "agreement" in out.metrics
  # each sub-tree is exactly the standalone model's, so init_from={'teacher': <a text_encoder run>} loads it
  for role, config in (("teacher", dict(TEACHER, dropout_rate=0.5)), ("student", STUDENT)):
    alone = jax.eval_shape(build_model(config).init, jax.random.key(0), tokens)["params"]
    shapes = jax.tree.map(lambda x: x.shape, (alone, variables["params"][role]))
    assert shapes[0] == shapes[1]
  standalone, _ = build_model(dict(TEACHER, dropout_rate=0.5)).apply({"params": variables["params"]["teacher"]}, tokens)
  np.testing.assert_allclose(outputs["teacher"], standalone, atol=1e-6)
  # the teacher is frozen: by the model's hook, and config.frozen_params=('teacher/.*',) matches it
  mask = partition.trainable_mask(variables["params"], model, (), ("teacher/.*",))
  assert all(m == (path[0] == "student") for path, m in mask.items())
  assert not any(partition.trainable_mask(variables["params"], model).get(p) for p in mask if p[0] == "teacher")


def test_teacher_runs_deterministically_and_gets_no_gradient(distill):
  model, variables = distill
  task = get_task("distillation", {"alpha": 0.5, "temperature": 2.0})
  tokens, labels = _tokens(2), jnp.array([0, 1, 2, 1])
  batch = {"ids": tokens, "label": labels, "weight": jnp.ones(4)}
  inputs, targets = task.prepare(batch, {})
  assert set(inputs) == {"tokens", "mask"}
  train, _ = model.apply(variables, **inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
  evaluation, _ = model.apply(variables, **inputs)
  np.testing.assert_allclose(train["teacher"], evaluation["teacher"], atol=1e-6)  # no dropout in the teacher

  def loss(params, teacher_weight):
    outputs, _ = model.apply({"params": params}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(3)})
    stats = task.stats(outputs, targets, batch)
    # + the teacher's logits themselves: only the model's stop_gradient keeps this from reaching the teacher
    return stats["loss_sum"] / stats["weight"] + teacher_weight * jnp.sum(outputs["teacher"])

  for teacher_weight in (0.0, 1.0):
    grads = jax.jit(jax.grad(loss))(variables["params"], teacher_weight)
    teacher_grads = jax.tree.leaves(grads["teacher"])
    assert teacher_grads and all(bool(jnp.all(g == 0)) for g in teacher_grads)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in jax.tree.leaves(grads["student"])) > 0


def test_distillation_model_config_errors():
  with pytest.raises(ConfigError, match="config.model.student.num_classes=4 must equal"):
    build_model(dict(MODEL, student=dict(STUDENT, num_classes=4)))
  with pytest.raises(ConfigError, match="config.model.teacher.*not a classifier"):
    build_model(dict(MODEL, teacher=dict(TEACHER, num_classes=0)))
  with pytest.raises(ConfigError, match="config.model.student.hidden_size is not a field"):
    build_model(dict(MODEL, student=dict(STUDENT, hidden_size=4)))
  with pytest.raises(ConfigError, match="config.model.teacher="):
    build_model(dict(MODEL, teacher="text_encoder"))


# The task


def test_task_sums_and_finalize_give_both_f1_scores():
  task = get_task("distillation", {"alpha": 0.25, "temperature": 2.0})
  labels = jnp.array([0, 1, 2, 2])
  weight = jnp.array([1.0, 1.0, 1.0, 0.0])  # the last row is padding
  student = jnp.array([[3.0, 0, 0], [0, 3, 0], [0, 3, 0], [0, 0, 9]])  # predicts 0, 1, 1 (, 2)
  teacher = jnp.array([[2.0, 0, 0], [0, 2, 0], [0, 0, 2], [9, 0, 0]])  # predicts 0, 1, 2 (, 0)
  batch = {"ids": jnp.zeros((4, T), jnp.int32), "label": labels, "weight": weight}
  sums = task.stats({"student": student, "teacher": teacher}, {}, batch)
  metrics = task.finalize(jax.tree.map(np.asarray, sums), {})
  assert metrics["accuracy"] == pytest.approx(2 / 3) and metrics["teacher_accuracy"] == pytest.approx(1.0)
  # student per class: F1 = 2 tp / (predicted + actual): class 0: 2/2, class 1: 2/3, class 2: 0/1
  assert metrics["f1_macro"] == pytest.approx((1 + 2 / 3 + 0) / 3)
  assert metrics["teacher_f1_macro"] == pytest.approx(1.0)
  ce = _np_ce(np.asarray(student[:3]), np.asarray(labels[:3]))
  kd = 4.0 * _np_kl(np.asarray(student[:3]), np.asarray(teacher[:3]), 2.0)
  assert metrics["ce"] == pytest.approx(ce.mean(), rel=1e-5) and metrics["kd"] == pytest.approx(kd.mean(), rel=1e-5)
  assert metrics["loss"] == pytest.approx(0.25 * ce.mean() + 0.75 * kd.mean(), rel=1e-5)
  assert float(sums["weight"]) == 3.0 and float(sums["teacher_correct"]) == 3.0
  with pytest.raises(ValueError, match="needs the 'distillation' model"):
    task.stats(student, {}, batch)


@pytest.mark.parametrize(
  "options, key",
  [
    ({"alpha": 1.5}, "alpha"),
    ({"alpha": -0.1}, "alpha"),
    ({"alpha": "half"}, "alpha"),
    ({"temperature": 0.0}, "temperature"),
    ({"temperature": -2.0}, "temperature"),
    ({"tau": 1.0}, "tau"),
  ],
)
def test_bad_task_options_are_config_errors(options, key):
  with pytest.raises(ConfigError, match=f"config.task_options.{key}"):
    get_task("distillation", options)


def test_distillation_raises_the_students_agreement_with_a_fixed_random_teacher():
  """A tiny synthetic task: random token windows, no labels to learn from (alpha = 0, pure soft targets); the
  teacher is a randomly initialised (fixed) text encoder, from a key whose decisions spread over the 3 classes.
  300 Adam steps on the student only."""
  model = build_model(MODEL)
  task = get_task("distillation", {"alpha": 0.0, "temperature": 2.0})
  tokens = _tokens(10, (128, T))
  batch = {"ids": tokens, "label": jnp.zeros(128, jnp.int32), "weight": jnp.ones(128)}
  inputs, targets = task.prepare(batch, {})
  student = model.init(jax.random.key(7), tokens)["params"]["student"]
  teacher = build_model(TEACHER).init(jax.random.key(4), tokens)["params"]

  def outputs(student):
    return model.apply({"params": {"teacher": teacher, "student": student}}, **inputs)[0]

  def agreement(student):
    out = outputs(student)
    return float(jnp.mean(jnp.argmax(out["student"], -1) == jnp.argmax(out["teacher"], -1)))

  def loss(student):
    stats = task.stats(outputs(student), targets, batch)
    return stats["loss_sum"] / stats["weight"]

  tx = optax.adam(1e-2)

  @jax.jit
  def steps(student, opt_state):
    def body(carry, _):
      student, opt_state = carry
      value, grads = jax.value_and_grad(loss)(student)
      updates, opt_state = tx.update(grads, opt_state, student)
      return (optax.apply_updates(student, updates), opt_state), value

    return jax.lax.scan(body, (student, opt_state), None, length=300)

  teacher_classes = np.bincount(np.asarray(jnp.argmax(outputs(student)["teacher"], -1)), minlength=C)
  assert teacher_classes.min() >= 20, teacher_classes  # the teacher's decisions are no constant class
  before = agreement(student)
  (trained, _), losses = steps(student, tx.init(student))
  after = agreement(trained)
  assert float(losses[-1]) < 0.2 * float(losses[0]), (losses[0], losses[-1])
  assert after >= 0.9 and after > before + 0.3, (before, after)  # measured: 0.45 -> 1.0
