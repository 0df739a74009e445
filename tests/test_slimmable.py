"""Slimmable encoder: each width is exactly a plain network of that width holding the first channels of the shared
weights and its own BatchNorm, the parameter count, the summed loss and per-width metrics, bad widths."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import slimmable_digits
from zoo.engine.config import validate_config
from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.slimmable import slim_channels
from zoo.tasks import get_task

TINY = dict(
  name="slimmable",
  num_classes=3,
  width_mults=(0.25, 0.5, 1.0),
  encoder_widths=(4, 8),
  encoder_strides=(1, 2),
  bottleneck=4,
  decoder_widths=(8,),
)


class Plain(nn.Module):
  """The non-slimmable network of the given widths: Conv-BN-ReLU per layer (SAME-size padding), mean, Dense."""

  widths: tuple
  kernels: tuple
  strides: tuple
  classes: int

  @nn.compact
  def __call__(self, x, train):
    for i, (w, k, s) in enumerate(zip(self.widths, self.kernels, self.strides)):
      x = nn.Conv(w, (k, k), (s, s), padding=((k // 2, k // 2),) * 2, use_bias=False, name=f"conv{i}")(x)
      x = nn.relu(nn.BatchNorm(use_running_average=not train, momentum=0.9, epsilon=1e-5, name=f"bn{i}")(x))
    return nn.Dense(self.classes, name="dense")(jnp.mean(x, axis=(1, 2)))


def test_every_width_is_the_plain_network_of_its_first_channels():
  model = build_model(TINY)
  images = jax.random.uniform(jax.random.key(0), (4, 8, 8, 1))
  variables = nn.unbox(jax.jit(model.init)(jax.random.key(1), images))
  # running statistics that differ per width, so that evaluation reads each width's own
  stats = jax.tree.map(lambda v: v + jax.random.uniform(jax.random.key(2), v.shape), variables["batch_stats"])
  variables = {**variables, "batch_stats": stats}
  names = ("encoder_0", "encoder_1", "bottleneck", "decoder_0")
  full = (4, 8, 4, 8)

  def slimmable(v):  # evaluation and training outputs of every width
    return [model.apply(v, images, deterministic=not train, mutable=["batch_stats"]) for train in (False, True)]

  def plain_widths(v):  # the plain network of each width, from the first channels and that width's BatchNorm
    out = []
    for train in (False, True):
      for i, mult in enumerate(TINY["width_mults"]):
        widths = tuple(slim_channels(c, mult) for c in full)
        p, s = v["params"], v["batch_stats"]
        params, plain_stats, cin = {}, {}, 1
        for j, (name, w) in enumerate(zip(names, widths)):
          params[f"conv{j}"] = {"kernel": p[name]["kernel"][:, :, :cin, :w]}
          params[f"bn{j}"] = p[f"{name}_bn_{i}"]
          plain_stats[f"bn{j}"] = s[f"{name}_bn_{i}"]
          cin = w
        params["dense"] = {"kernel": p["classifier"]["kernel"][:cin], "bias": p["classifier"]["bias"]}
        plain = Plain(widths, (3, 3, 1, 3), (1, 2, 1, 1), 3)
        out.append(plain.apply({"params": params, "batch_stats": plain_stats}, images, train, mutable=["batch_stats"]))
    return out

  got, want = jax.jit(slimmable)(variables), jax.jit(plain_widths)(variables)
  for m in range(2):  # evaluation, training
    (logits, out), mutated = got[m]
    assert logits.shape == (3, 4, 3)
    for i in range(len(TINY["width_mults"])):
      plain_logits, new_stats = want[m * len(TINY["width_mults"]) + i]
      np.testing.assert_allclose(logits[i], plain_logits, atol=1e-5)
      for j, name in enumerate(names):  # in training, each width's BatchNorm statistics move alone
        for k in ("mean", "var"):
          np.testing.assert_allclose(
            mutated["batch_stats"][f"{name}_bn_{i}"][k], new_stats["batch_stats"][f"bn{j}"][k], atol=1e-6
          )
    assert float(out.metrics["transmitted_w0.25"]) == 4 * 4 * 1  # bottleneck 4 channels x 0.25 on the 4x4 grid


def test_parameter_count():
  model = build_model(TINY)
  variables = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  convs = 9 * 1 * 4 + 9 * 4 * 8 + 1 * 8 * 4 + 9 * 4 * 8  # shared kernels at width 1
  bn = sum(2 * slim_channels(c, a) for c in (4, 8, 4, 8) for a in (0.25, 0.5, 1.0))  # switchable: one per width
  assert count_params(variables["params"]) == convs + bn + 8 * 3 + 3
  # The seed abstract states no architecture or parameter count: nothing to compare at the paper's size.


def test_summed_loss_and_per_width_metrics():
  task = get_task("slimmable", {"width_mults": (0.5, 1.0)})
  logits = jnp.array([[[2.0, 0.0], [2.0, 0.0]], [[0.0, 2.0], [2.0, 0.0]]])  # [widths, B, classes]
  batch = {"label": jnp.array([1, 0]), "weight": jnp.array([1.0, 1.0])}
  metrics = task.finalize(jax.device_get(task.stats(logits, {}, batch)), {})
  wrong, right = np.log(1 + np.exp(2.0)), np.log(1 + np.exp(-2.0))
  assert metrics["loss_w0.5"] == pytest.approx((wrong + right) / 2, rel=1e-5)
  assert metrics["loss_w1.0"] == pytest.approx(right, rel=1e-5)
  assert metrics["loss"] == pytest.approx((wrong + right) / 2 + right, rel=1e-5)  # the sum over widths
  assert (metrics["accuracy_w0.5"], metrics["accuracy_w1.0"], metrics["accuracy"]) == (0.5, 1.0, 1.0)


@pytest.mark.parametrize("mults", [(0.0, 0.5), (0.5, 1.5), (0.5, 0.5), ()])
def test_bad_width_multipliers_fail_with_a_clear_message(mults):
  with pytest.raises(ConfigError, match=r"width_mults=.* allowed: distinct multipliers in \(0, 1\]"):
    build_model({**TINY, "width_mults": mults})
  with pytest.raises(ConfigError, match=r"width_mults=.* allowed: distinct multipliers in \(0, 1\]"):
    get_task("slimmable", {"width_mults": mults})


def test_task_and_model_widths_must_agree():
  task = get_task("slimmable", {"width_mults": (0.5, 1.0)})
  with pytest.raises(ConfigError, match=r"needs logits \[num_widths=2, batch, classes\].*gives \(3, 2, 4\)"):
    task.stats(jnp.zeros((3, 2, 4)), {}, {"label": jnp.zeros(2, jnp.int32), "weight": jnp.ones(2)})
  with pytest.raises(ConfigError, match=r"model.width_mults=\(0.25, 0.5, 1.0\) must equal"):
    task.check_model(build_model(TINY), {}, {})


def test_roles_validate():
  for role in slimmable_digits.ROLES:
    c = slimmable_digits.get_config(role)
    validate_config(c, num_devices=8)
    assert tuple(c.model.width_mults) == tuple(c.task_options.width_mults)
  assert tuple(slimmable_digits.get_config("fixed_0.5").model.width_mults) == (0.5,)
