"""DiT (`zoo.models.dit`) and the DDM router (`zoo.models.flow_router`): shapes, adaLN-Zero initialisation (blocks
start as the identity, the initial velocity is exactly 0), the class, null-class and time conditioning, jit + grad,
and the analytic FLOPs against the matmuls of the traced program."""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.dit import AdaLNZeroBlock, patchify, unpatchify

TINY = dict(image_size=8, channels=1, patch_size=2, embed_dim=16, num_layers=2, num_heads=2, frequency_dim=16)
TINY_DIT = dict(TINY, name="dit", num_classes=3)
TINY_ROUTER = dict(TINY, name="flow_router", num_experts=3)
BATCH = 2


def _inputs(labels=True):
  images = jax.random.normal(jax.random.key(0), (BATCH, 8, 8, 1))
  inputs = {"images": images, "t": jnp.array([0.2, 0.7])}
  if labels:
    inputs["labels"] = jnp.array([1, 2], jnp.int32)
  return inputs


def _perturb(variables, scale=0.3):
  """Every parameter plus Gaussian noise, so that the zero-initialised modulations and output layer matter."""
  leaves, treedef = jax.tree.flatten(variables)
  keys = jax.random.split(jax.random.key(7), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.fixture(scope="module")
def dit():
  """(model, variables, apply) of the tiny class-conditional DiT; apply(variables, **inputs) is jitted."""
  model = build_model(TINY_DIT)
  variables = jax.jit(lambda r: model.init(r, **_inputs()))(jax.random.key(1))
  return model, variables, jax.jit(lambda v, **kw: model.apply(v, **kw)[0])


def test_default_sizes():
  """The defaults (8x8x1 digits, patch 2, width 64, 4 layers) and the analytic parameter counts."""
  for name, expected in (("dit", 328_708), ("flow_router", 49_444)):
    model = build_model({"name": name})
    inputs = {"images": jnp.zeros((1, 8, 8, 1)), "t": jnp.zeros((1,))}
    variables = jax.eval_shape(lambda r, m=model, i=inputs: m.init(r, **i), jax.random.key(0))
    assert count_params(variables["params"]) == model.num_params() == expected


def test_patchify_roundtrip():
  images = jax.random.normal(jax.random.key(0), (2, 8, 4, 3))
  patches = patchify(images, 2)
  assert patches.shape == (2, 8, 12)
  np.testing.assert_array_equal(patches[0, 1], images[0, 0:2, 2:4].reshape(-1))  # row-major patches
  np.testing.assert_array_equal(unpatchify(patches, 2, 8, 4, 3), images)


def test_shapes_and_zero_initial_velocity(dit):
  model, variables, apply = dit
  velocity, out = jax.jit(lambda v: model.apply(v, **_inputs()))(variables)
  assert velocity.shape == (BATCH, 8, 8, 1) and velocity.dtype == jnp.float32
  assert out.aux_loss.shape == () and float(out.aux_loss) == 0.0
  np.testing.assert_array_equal(velocity, 0.0)  # zero-initialised output layer
  params = nn.meta.unbox(variables["params"])
  for i in range(TINY["num_layers"]):
    for leaf in jax.tree.leaves(params["backbone"][f"layers_{i}"]["modulation"]):
      np.testing.assert_array_equal(leaf, 0.0)
  assert params["class_embed"]["embedding"].shape == (TINY_DIT["num_classes"] + 1, TINY["embed_dim"])  # + null


def test_block_starts_as_identity():
  block = AdaLNZeroBlock(num_heads=2, mlp_dim=32)
  x = jax.random.normal(jax.random.key(0), (2, 5, 16))
  c = jax.random.normal(jax.random.key(1), (2, 16))
  variables = block.init(jax.random.key(2), x, c)
  np.testing.assert_array_equal(block.apply(variables, x, c), x)
  assert not np.allclose(block.apply(_perturb(variables), x, c), x)  # and it is not the identity once trained


def test_class_null_class_and_time_condition_the_velocity(dit):
  _, variables, apply = dit
  variables = _perturb(variables)
  inputs = _inputs()
  base = apply(variables, **inputs)
  assert float(jnp.abs(base).max()) > 0
  null = apply(variables, **{**inputs, "labels": jnp.full((BATCH,), TINY_DIT["num_classes"], jnp.int32)})
  assert not np.allclose(null, base)
  np.testing.assert_array_equal(apply(variables, images=inputs["images"], t=inputs["t"]), null)  # None = null class
  other_class = apply(variables, **{**inputs, "labels": jnp.array([0, 0], jnp.int32)})
  assert not np.allclose(other_class[1], base[1])
  later = apply(variables, **{**inputs, "t": inputs["t"] + 0.1})
  assert np.all(np.abs(np.asarray(later - base)).max(axis=(1, 2, 3)) > 1e-4)  # every sample depends on t


def test_unconditional_ignores_labels():
  model = build_model(dict(TINY_DIT, num_classes=0))
  variables = _perturb(jax.jit(lambda r: model.init(r, **_inputs(labels=False)))(jax.random.key(1)))
  assert "class_embed" not in variables["params"]
  assert model.num_params() == count_params(variables["params"])
  apply = jax.jit(lambda v, **kw: model.apply(v, **kw)[0])
  np.testing.assert_array_equal(apply(variables, **_inputs()), apply(variables, **_inputs(labels=False)))


def test_jit_and_grad(dit):
  model, variables, _ = dit
  inputs = _inputs()
  target = jax.random.normal(jax.random.key(3), (BATCH, 8, 8, 1))

  @jax.jit
  def loss_and_grad(variables):
    return jax.value_and_grad(lambda v: jnp.mean((model.apply(v, **inputs)[0] - target) ** 2))(variables)

  loss, grads = loss_and_grad(variables)
  np.testing.assert_allclose(loss, jnp.mean(target**2), rtol=1e-6)  # the initial velocity is 0
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))
  # At initialisation the output layer is 0, so only it gets a gradient; after one SGD step the gates do too.
  g = nn.meta.unbox(grads["params"])
  assert float(jnp.abs(g["output"]["kernel"]).max()) > 0
  assert all(float(jnp.abs(x).max()) == 0 for x in jax.tree.leaves(g["backbone"]))
  stepped = jax.tree.map(lambda p, d: p - 0.1 * d, variables, grads)
  g = nn.meta.unbox(loss_and_grad(stepped)[1]["params"])
  assert float(jnp.abs(g["backbone"]["layers_0"]["modulation"]["linear"]["kernel"]).max()) > 0


def test_router_logits_depend_on_t():
  model = build_model(TINY_ROUTER)
  inputs = _inputs(labels=False)
  variables = jax.jit(lambda r: model.init(r, **inputs))(jax.random.key(1))
  apply = jax.jit(lambda v, **kw: model.apply(v, **kw))
  logits, out = apply(variables, **inputs)
  assert logits.shape == (BATCH, TINY_ROUTER["num_experts"]) and logits.dtype == jnp.float32
  assert float(out.aux_loss) == 0.0 and model.num_params() == count_params(variables["params"])
  # adaLN-Zero: at initialisation the blocks are the identity and t does not reach the logits yet.
  np.testing.assert_allclose(apply(variables, **{**inputs, "t": inputs["t"] + 0.1})[0], logits, atol=1e-6)
  variables = _perturb(variables)
  logits = apply(variables, **inputs)[0]
  later = apply(variables, **{**inputs, "t": inputs["t"] + 0.1})[0]
  assert np.all(np.abs(np.asarray(later - logits)).max(axis=1) > 1e-4)
  grads = jax.jit(jax.grad(lambda v: jnp.sum(jax.nn.log_softmax(model.apply(v, **inputs)[0])[:, 0])))(variables)
  assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


def _matmul_flops(jaxpr):
  """2 x multiply-adds of every dot_general in a (closed) jaxpr, sub-jaxprs included."""
  total = 0
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "dot_general":
      (contract, _), _ = eqn.params["dimension_numbers"]
      lhs = eqn.invars[0].aval.shape
      total += 2 * math.prod(eqn.outvars[0].aval.shape) * math.prod(lhs[i] for i in contract)
    for param in eqn.params.values():
      for sub in param if isinstance(param, (tuple, list)) else (param,):
        inner = getattr(sub, "jaxpr", sub)
        if hasattr(inner, "eqns"):
          total += _matmul_flops(inner)
  return total


@pytest.mark.parametrize("config", [TINY_DIT, dict(TINY_DIT, num_classes=0, patch_size=4), TINY_ROUTER])
def test_flops_per_sample(config):
  """`flops_per_sample` equals the matmul FLOPs of the traced forward pass of one image exactly (an independent
  count: every dot_general of the jaxpr), and XLA's CPU cost analysis (which also counts elementwise work) agrees
  within a loose factor."""
  model = build_model(config)
  inputs = {"images": jnp.zeros((1, 8, 8, 1)), "t": jnp.zeros((1,))}
  if config["name"] == "dit":
    inputs["labels"] = jnp.zeros((1,), jnp.int32)
  variables = jax.eval_shape(lambda r: model.init(r, **inputs), jax.random.key(0))
  forward = lambda v, i: model.apply(v, **i)[0]
  assert _matmul_flops(jax.make_jaxpr(forward)(variables, inputs).jaxpr) == model.flops_per_sample()
  cost = jax.jit(forward).lower(variables, inputs).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  if cost and cost.get("flops", -1) > 0:
    assert 0.9 <= cost["flops"] / model.flops_per_sample() <= 2.0


@pytest.mark.parametrize(
  "override, message",
  [
    (dict(patch_size=3), "patch_size=3 must divide image_size=8"),
    (dict(num_heads=3), "divisible by num_heads=3"),
    (dict(embed_dim=6, num_heads=1), "divisible by 4"),
    (dict(num_classes=-1), "num_classes=-1"),
    (dict(mlp_ratio=0.0), "mlp_ratio=0.0"),
  ],
)
def test_config_errors(override, message):
  with pytest.raises(ConfigError, match=message):
    build_model({**TINY_DIT, **override})


def test_bad_inputs(dit):
  model, variables, _ = dit
  with pytest.raises(ValueError, match="images must be float"):
    model.apply(variables, images=jnp.zeros((2, 4, 4, 1)), t=jnp.zeros((2,)))
  with pytest.raises(ValueError, match="t must be"):
    model.apply(variables, images=jnp.zeros((2, 8, 8, 1)), t=jnp.zeros((3,)))
  with pytest.raises(ValueError, match="labels must be int"):
    model.apply(variables, images=jnp.zeros((2, 8, 8, 1)), t=jnp.zeros((2,)), labels=jnp.zeros((2,)))


def _gates(model, override=None):
  """All-open structured-pruning gates of `model` for BATCH images, with `override[(layer, kind)] = array`."""
  gates = [
    {
      "heads": jnp.ones((BATCH, model.num_heads)),
      "mlp": jnp.ones((BATCH, int(model.embed_dim * model.mlp_ratio))),
      "block": jnp.ones((BATCH,)),
    }
    for _ in range(model.num_layers)
  ]
  for (layer, kind), value in (override or {}).items():
    gates[layer][kind] = value
  return gates


def test_pruning_gates_equal_weight_surgery(dit):
  """Structured-pruning gates (APTP): all open = no gates; a closed head, MLP unit or block gives what zeroing that
  head's output-projection rows, that unit's down-projection row, or that block's modulation gives."""
  model, variables, apply = dit
  variables = nn.unbox(_perturb(variables))
  inputs = _inputs()
  plain = apply(variables, **inputs)
  np.testing.assert_allclose(apply(variables, **inputs, gates=_gates(model)), plain, rtol=1e-6, atol=1e-6)
  layer = lambda v: v["params"]["backbone"]["layers_1"]
  cases = {
    "heads": (
      jnp.array([[1.0, 0.0]] * BATCH),
      lambda p: p["attention"]["out"].update(kernel=p["attention"]["out"]["kernel"].at[1].set(0.0)),
    ),
    "mlp": (
      jnp.ones((BATCH, 64)).at[:, 5].set(0.0),
      lambda p: p["mlp"]["down"].update(kernel=p["mlp"]["down"]["kernel"].at[5].set(0.0)),
    ),
    "block": (
      jnp.zeros((BATCH,)),
      lambda p: p["modulation"]["linear"].update(
        kernel=jnp.zeros_like(p["modulation"]["linear"]["kernel"]),
        bias=jnp.zeros_like(p["modulation"]["linear"]["bias"]),
      ),
    ),
  }
  for kind, (gate, surgery) in cases.items():
    edited = jax.tree.map(lambda x: x, variables)
    surgery(layer(edited))
    gated = apply(variables, **inputs, gates=_gates(model, {(1, kind): gate}))
    np.testing.assert_allclose(gated, apply(edited, **inputs), rtol=1e-5, atol=1e-5, err_msg=kind)
    assert not np.allclose(gated, plain, atol=1e-4), kind


def test_pruned_flops_equal_smaller_models():
  """`pruned_flops`: all open = `flops_per_sample`; a closed block = a DiT with one layer fewer; half the MLP units
  closed = a DiT with half the MLP ratio (exact); soft gates in between."""
  model = build_model(TINY_DIT)
  np.testing.assert_allclose(model.pruned_flops(_gates(model)), model.flops_per_sample())
  fewer = build_model(dict(TINY_DIT, num_layers=1))
  np.testing.assert_allclose(
    model.pruned_flops(_gates(model, {(0, "block"): jnp.zeros(BATCH)})), fewer.flops_per_sample()
  )
  half = jnp.ones((BATCH, 64)).at[:, 32:].set(0.0)
  narrower = build_model(dict(TINY_DIT, mlp_ratio=2.0))
  np.testing.assert_allclose(
    model.pruned_flops(_gates(model, {(0, "mlp"): half, (1, "mlp"): half})), narrower.flops_per_sample()
  )
  soft = model.pruned_flops(_gates(model, {(0, "block"): jnp.full((BATCH,), 0.5)}))
  assert fewer.flops_per_sample() < float(soft[0]) < model.flops_per_sample()
