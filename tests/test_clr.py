"""CLR: the identity reprogramming leaves the frozen backbone exact, ResNet-50's size and the per-task fraction, the
per-task BatchNorm, an engine step that trains only the current task, and the continual task's label mapping and
per-task metrics."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from configs import clr_digits
from zoo.engine import partition, sharding, trainer
from zoo.engine.config import validate_config
from zoo.models import ConfigError, build_model
from zoo.models.clr import RESNET50, TaskBatchNorm, task_patterns
from zoo.tasks import get_task

TINY = dict(name="clr", head_classes=(3, 2), stage_sizes=(1, 1), width=4)
INFO = {"format": "images", "num_classes": 10, "image_shape": (8, 8, 1)}


def _flat(tree):
  return {"/".join(k): v for k, v in traverse_util.flatten_dict(nn.unbox(tree)).items()}


def test_identity_reprogramming_leaves_the_frozen_backbone_output_exact():
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  task = jnp.array([0, 1, 1, 0])
  clr = build_model(TINY)
  plain = build_model({**TINY, "reprogram": False})
  variables = nn.unbox(jax.jit(lambda r: clr.init(r, images, task=task))(jax.random.key(1)))
  reprogram = {k for k in _flat(variables["params"]) if "/reprogram_" in k}
  assert len(reprogram) == 2 * 5  # two tasks x (stem + 2 convs per basic block x 2 blocks); none on the 1x1 shortcut
  params = traverse_util.unflatten_dict(
    {k: v for k, v in traverse_util.flatten_dict(variables["params"]).items() if "/".join(k) not in reprogram}
  )
  base = {**variables, "params": params}
  plain_params = jax.eval_shape(lambda r: plain.init(r, images, task=task), jax.random.key(1))["params"]
  assert set(_flat(params)) == set(_flat(plain_params))

  def both(model, variables):  # evaluation and training outputs
    (train, _), _ = model.apply(variables, images, task=task, deterministic=False, mutable=["batch_stats"])
    return model.apply(variables, images, task=task)[0], train

  run_clr = jax.jit(lambda v: both(clr, v))
  got, want = run_clr(variables), jax.jit(lambda v: both(plain, v))(base)
  for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
    np.testing.assert_array_equal(g, w)
  # a reprogramming kernel that is not the identity changes the features of its task's rows only
  flat = traverse_util.flatten_dict(variables["params"])
  key = next(k for k in flat if k[-1] == "reprogram_1")
  flat[key] = flat[key] * 1.5
  moved = run_clr({**variables, "params": traverse_util.unflatten_dict(flat)})[0]
  same = got[0]
  rows1 = np.asarray(task) == 1
  assert not np.allclose(moved[1][rows1], same[1][rows1])
  np.testing.assert_array_equal(moved[0][~rows1], same[0][~rows1])


def test_resnet50_size_and_per_task_fraction():
  counts = build_model({"name": "clr", **RESNET50, "head_classes": (1000,)}).param_counts()
  stages = ((3, 64), (4, 128), (6, 256), (3, 512))
  dw_channels = 64 + sum(n * w for n, w in stages)  # the stem and every bottleneck's 3x3 conv
  bn_channels = 64 + sum(n * (w + w + 4 * w) + 4 * w for n, w in stages)  # + each stage's projection shortcut
  per_task = 9 * dw_channels + 2 * bn_channels
  assert counts["reprogram_bn"] == [per_task] == [87_680]
  resnet50 = counts["total"] - 9 * dw_channels  # without the reprogramming: torchvision's resnet50 count
  assert resnet50 == 25_557_032 and abs(resnet50 - 25.6e6) / 25.6e6 < 0.02
  fraction = per_task / resnet50
  print(f"CLR per-task parameters at ResNet-50 size (no head): {per_task} = {100 * fraction:.3f}% of {resnet50}")
  assert fraction < 0.006  # the paper: under 0.6% per task


def test_task_batchnorm_is_a_batchnorm_per_task():
  x = jax.random.normal(jax.random.key(0), (6, 3, 3, 4)) * 2 + 1
  task = jnp.array([1, 1, 0, 1, 0, 1])
  adapt = task == 1
  onehot = jax.nn.one_hot(task, 3)
  norm = TaskBatchNorm(3, momentum=0.9)
  variables = norm.init(jax.random.key(1), x, onehot, adapt, True)
  stats = jax.tree.map(lambda v: v + 0.5, variables["batch_stats"])  # running statistics that differ from init
  y, mutated = jax.jit(lambda v: norm.apply(v, x, onehot, adapt, False, mutable=["batch_stats"]))(
    {**variables, "batch_stats": stats}
  )
  ref = nn.BatchNorm(use_running_average=False, momentum=0.9, epsilon=1e-5)
  ref_vars = ref.init(jax.random.key(1), x[adapt])
  ref_vars = {**ref_vars, "batch_stats": stats["bn_1"]}
  want, ref_mutated = ref.apply(ref_vars, x[adapt], mutable=["batch_stats"])
  np.testing.assert_allclose(y[adapt], want, atol=1e-5)
  for name in ("mean", "var"):
    np.testing.assert_allclose(mutated["batch_stats"]["bn_1"][name], ref_mutated["batch_stats"][name], atol=1e-6)
    for t in ("bn_0", "bn_2"):  # no adapting row: frozen
      np.testing.assert_array_equal(mutated["batch_stats"][t][name], stats[t][name])
  frozen = (x[~adapt] - 0.5) / jnp.sqrt(1.5 + 1e-5)  # task 0's rows: its running statistics, scale 1, bias 0
  np.testing.assert_allclose(y[~adapt], frozen, atol=1e-5)


def test_task_patterns_select_exactly_one_task():
  model = build_model({**TINY, "head_classes": (3, 2, 4)})
  params = nn.unbox(jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))["params"])
  mask = partition.trainable_mask(params, model, task_patterns(1))
  names = {"/".join(p) for p, m in mask.items() if m}
  assert names and all("_1" in n.split("/")[-2] or n.endswith("reprogram_1") for n in names)
  assert (
    sum(params_size for p, params_size in _sizes(params).items() if "/".join(p) in names)
    == (model.param_counts(8, 1)["per_task"][1])
  )


def _sizes(params):
  return {p: int(np.prod(v.shape)) for p, v in traverse_util.flatten_dict(params).items()}


def test_continual_task_maps_labels_and_scores_every_learned_task():
  task = get_task("continual", {"task_classes": ((0, 1, 2), (3, 4), (5,)), "current_task": 1})
  label = jnp.array([0, 4, 3, 5, 2, 1, 4])
  batch = {"image": jnp.zeros((7, 8, 8, 1)), "label": label, "weight": jnp.array([1, 1, 1, 1, 1, 1, 0.0])}
  inputs, targets = jax.jit(task.prepare)(batch, {})
  np.testing.assert_array_equal(inputs["task"], [0, 1, 1, -1, 0, 0, 1])  # class 5 (task 2) is not learned yet
  np.testing.assert_array_equal(targets["label"], [0, 1, 0, 0, 2, 1, 1])
  np.testing.assert_array_equal(inputs["adapt"], [False, True, True, False, False, False, True])
  # head 0 predicts class 0 for every row, head 1 predicts its class 1 (= digit 4) for every row
  head0 = jnp.tile(jnp.array([[2.0, 0.0, 0.0]]), (7, 1))
  head1 = jnp.tile(jnp.array([[0.0, 1.0]]), (7, 1))
  sums = jax.device_get(jax.jit(task.stats)((head0, head1, jnp.zeros((7, 1))), targets, batch))
  metrics = task.finalize(sums, INFO)
  assert metrics["accuracy_task0"] == pytest.approx(1 / 3)  # rows 0, 4, 5: only row 0 is class 0
  assert metrics["accuracy_task1"] == pytest.approx(1 / 2)  # rows 1, 2 (row 6 has weight 0): row 1 is digit 4
  assert metrics["accuracy"] == pytest.approx((1 / 3 + 1 / 2) / 2)
  assert "accuracy_task2" not in metrics
  log1 = np.log(1 + np.e)  # -log softmax of [0, 1] at 1 is log(1 + e^-1); at 0 it is log(1 + e)
  want = (np.log(1 + np.exp(-1.0)) + log1) / 2
  assert metrics["loss"] == pytest.approx(want, rel=1e-5) and metrics["loss_task1"] == pytest.approx(want, rel=1e-5)
  assert float(sums["weight"]) == 2


@pytest.mark.parametrize(
  "options, message",
  [
    ({"task_classes": ((0, 1), (1, 2))}, "class 1 is in task 0 and task 1"),
    ({"task_classes": ((0, 1), ())}, "non-empty tuple of non-empty tuples"),
    ({"task_classes": ((0, 1), (2,)), "current_task": 2}, r"current_task=2 is out of range; allowed: 0..1"),
    ({"current_task": -1}, "current_task=-1 is out of range"),
  ],
)
def test_bad_task_options_fail_with_a_clear_message(options, message):
  with pytest.raises(ConfigError, match=message):
    get_task("continual", options)


def test_bad_classes_heads_and_task_indices():
  task = get_task("continual", {"task_classes": ((0, 1), (9, 10))})
  with pytest.raises(ConfigError, match="names class 10, which dataset 'digits' lacks; allowed: class ids 0..9"):
    task.batch_spec(INFO, {"name": "digits"}, 4)
  task = get_task("continual", {"task_classes": ((0, 1), (2, 3, 4))})
  targets = {"task": jnp.zeros(2, jnp.int32), "label": jnp.zeros(2, jnp.int32)}
  with pytest.raises(ConfigError, match=r"sizes \(2, 3\); the model gives \(3, 2\)"):
    task.stats((jnp.zeros((2, 3)), jnp.zeros((2, 2))), targets, {"weight": jnp.ones(2)})
  model = build_model(TINY)
  with pytest.raises(ConfigError, match=r"head_classes=\(3, 2\) must be the sizes of .*task_classes: \(2, 3\)"):
    task.check_model(model, INFO, {})
  images = jnp.zeros((2, 8, 8, 1))
  with pytest.raises(ValueError, match=r"task indices must be in \[-1, 2\)"):
    model.init(jax.random.key(0), images, task=jnp.array([0, 2]))
  for bad, message in ((dict(head_classes=()), "head_classes"), (dict(block="dense"), "block")):
    with pytest.raises(ConfigError, match=message):
      build_model({**TINY, **bad})


def test_roles_chain_and_validate():
  for role, init_from in (("pretrain", ""), ("task1", "workdirs/clr_pretrain"), ("task2", "workdirs/clr_task1")):
    c = clr_digits.get_config(role)
    validate_config(c, num_devices=8)
    assert c.init_from == init_from
  assert clr_digits.get_config("finetune2").init_from == "workdirs/clr_finetune1"
  with pytest.raises(ValueError, match="allowed roles are pretrain, task1, task2, finetune1, finetune2"):
    clr_digits.get_config("task3")


def test_an_engine_step_trains_only_the_current_task():
  c = clr_digits.get_config("task1")
  c.init_from = ""  # a fresh backbone stands in for the pre-trained one
  c.model.width = 4
  c.train.batch_size = 16
  c.mesh.update(data=1)
  c.optimizer.update(schedule="constant", warmup_steps=0)
  exp = trainer.Experiment(c, devices=jax.devices()[:1])
  state, shardings = exp.init_state()
  trainable = _flat(state.params)
  assert trainable and all(("_1/" in k or k.endswith("reprogram_1")) and "/conv/" not in k for k in trainable)
  rng = np.random.default_rng(0)
  batch = {"image": rng.uniform(size=(16, 8, 8, 1)).astype(np.float32), "label": np.arange(16, dtype=np.int32) % 10}
  step = exp.make_train_step(shardings, exp.batch_spec)
  before = jax.device_get(state.variables())
  state, metrics = step(state, sharding.global_batch(exp.pad(batch), exp.mesh))
  after = jax.device_get(state.variables())
  assert float(metrics["stats"]["weight"]) == 3  # digits 5, 6 and 15 % 10: task 1 only
  for collection in ("params", "batch_stats"):
    old, new = _flat(before[collection]), _flat(after[collection])
    for k in old:
      task1 = "_1/" in k or k.endswith("reprogram_1")
      if task1 and not k.endswith("bias"):  # a bias may still sit at its zero init
        assert not np.array_equal(old[k], new[k]), k
      if not task1:
        np.testing.assert_array_equal(old[k], new[k], err_msg=k)  # backbone, other tasks' BNs, heads, statistics
