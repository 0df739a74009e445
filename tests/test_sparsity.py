"""zoo.sparsity: masks, budgets, RigL/SET/static pruning, block masks, channel reordering, a digits end-to-end run."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from zoo import sparsity as sp


def mlp_params(key, sizes=(64, 32, 32, 10)):
  keys = jax.random.split(key, len(sizes) - 1)
  return {
    f"Dense_{i}": {
      "kernel": jax.random.normal(k, (a, b)) / np.sqrt(a),
      "bias": jnp.zeros((b,)),
    }
    for i, (k, a, b) in enumerate(zip(keys, sizes[:-1], sizes[1:]))
  }


def element_masks(params, state):
  return jax.tree.map(
    lambda p, m: np.asarray(jnp.broadcast_to(sp.expand_mask(m, p.shape), p.shape)), params, state.masks
  )


def adam_mu_nu(state):
  return optax.tree_utils.tree_get(state.inner_state, "mu"), optax.tree_utils.tree_get(state.inner_state, "nu")


@pytest.mark.parametrize("method", ["rigl", "set"])
def test_budget_and_zeros_through_cycles(method):
  params = mlp_params(jax.random.key(0))
  tx = sp.sparse(optax.adam(1e-2), method, 0.8, update_every=2, end_step=1000, alpha=0.5)
  state = tx.init(params)
  params = sp.apply_masks(params, state)
  want = sp.budget(params, state)
  assert want == {"Dense_0/kernel": 410, "Dense_1/kernel": 205, "Dense_2/kernel": 64}
  step = jax.jit(tx.update)
  changed = 0
  for t in range(20):  # 10 prune/regrow cycles (steps 2, 4, ..., 20)
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
    old = element_masks(params, state)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    assert sp.budget(params, state) == want
    new = element_masks(params, state)
    changed += sum(int(np.sum(old[k]["kernel"] != new[k]["kernel"])) for k in new)
    for k in params:
      assert np.all(np.asarray(params[k]["kernel"])[~new[k]["kernel"]] == 0)
  assert changed > 0 and int(state.step) == 20


def test_regrown_start_at_zero_with_zero_moments():
  params = mlp_params(jax.random.key(1))
  tx = sp.sparse(optax.adam(1e-2), "rigl", 0.5, update_every=3, end_step=100)
  state = tx.init(params)
  params = sp.apply_masks(params, state)
  step = jax.jit(tx.update)
  for t in range(3):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(10 + t), p.shape), params)
    old = element_masks(params, state)
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
  assert int(state.step) == 3
  # step 3 is a mask-update step
  grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(99), p.shape), params)
  old = element_masks(params, state)
  updates, state = step(grads, state, params)
  params = optax.apply_updates(params, updates)
  new = element_masks(params, state)
  mu, nu = adam_mu_nu(state)
  regrown = 0
  for k in params:
    grow = new[k]["kernel"] & ~old[k]["kernel"]
    regrown += int(grow.sum())
    assert np.all(np.asarray(params[k]["kernel"])[grow] == 0)
    assert np.all(np.asarray(mu[k]["kernel"])[grow] == 0) and np.all(np.asarray(nu[k]["kernel"])[grow] == 0)
    assert np.all(np.asarray(mu[k]["kernel"])[~new[k]["kernel"]] == 0)
  assert regrown > 0


def test_rigl_drops_smallest_weights_and_grows_largest_grads():
  w = np.zeros((4, 4), np.float32)
  mask = np.zeros((4, 4), bool)
  active = [(0, 0), (0, 1), (0, 2), (0, 3), (1, 0), (1, 1), (1, 2), (1, 3)]
  for i, (r, c) in enumerate(active):
    mask[r, c] = True
    w[r, c] = (i + 1) * (-1) ** i  # |w| = 1..8
  g = np.full((4, 4), 0.01, np.float32)
  g[3, 3], g[2, 0], g[3, 1], g[2, 2] = 9.0, -8.0, 7.0, 0.5
  g[0, 0] = 100.0  # an active entry: a large gradient must not matter
  params = {"w": jnp.asarray(w)}
  tx = sp.sparse(optax.sgd(0.0), "rigl", 0.5, include=".*", update_every=10, alpha=0.5, end_step=40)
  state = tx.init(params)._replace(masks={"w": jnp.asarray(mask)}, step=jnp.asarray(10, jnp.int32))
  n = int(np.floor(float(sp.update_fraction(10, 0.5, 40)) * 8))
  assert n == 3
  _, state = jax.jit(tx.update)({"w": jnp.asarray(g)}, state, params)
  new = np.asarray(state.masks["w"])
  dropped = {rc for rc in active if not new[rc]}
  grown = {tuple(int(v) for v in rc) for rc in np.argwhere(new & ~mask)}
  assert dropped == {(0, 0), (0, 1), (0, 2)}
  assert grown == {(3, 3), (2, 0), (3, 1)}
  assert new.sum() == 8


def test_cosine_update_fraction():
  f = lambda t: float(sp.update_fraction(t, 0.3, 1000))
  assert f(0) == pytest.approx(0.3)
  assert f(500) == pytest.approx(0.15)
  assert f(1000) == 0.0 and f(2000) == 0.0
  assert f(250) == pytest.approx(0.15 * (1 + np.cos(np.pi / 4)))


def test_static_pruning_keeps_zeros():
  params = mlp_params(jax.random.key(2))
  tx = sp.sparse(optax.adam(1e-2), "static", 0.9, prune_step=2)
  state = tx.init(params)
  step = jax.jit(tx.update)
  for t in range(6):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
    before = params
    updates, state = step(grads, state, params)
    params = optax.apply_updates(params, updates)
    report = sp.sparsity_report(params, state)
    if t < 2:
      assert report["total"] == 0.0
    else:
      assert report["Dense_0/kernel"] == pytest.approx(1 - 205 / 2048)
      if t == 2:  # pruned the largest |w| of the weights before the update
        k = np.abs(np.asarray(before["Dense_0"]["kernel"])).ravel()
        kept = np.asarray(params["Dense_0"]["kernel"]).ravel() != 0
        assert k[kept].min() >= k[~kept].max()
  assert sp.budget(params, state)["Dense_1/kernel"] == 102
  assert report["total_all"] < report["total"]


def test_block_masks_all_or_nothing():
  params = {"Dense_0": {"kernel": jax.random.normal(jax.random.key(3), (8, 64))}}
  tx = sp.sparse(optax.adam(1e-2), "rigl", 0.5, block_shape=(1, 16), update_every=1, end_step=100, alpha=0.5)
  state = tx.init(params)
  assert state.masks["Dense_0"]["kernel"].shape == (8, 4)
  params = sp.apply_masks(params, state)
  for t in range(3):
    grads = jax.tree.map(lambda p: jax.random.normal(jax.random.key(t), p.shape), params)
    updates, state = jax.jit(tx.update)(grads, state, params)
    params = optax.apply_updates(params, updates)
    m = element_masks(params, state)["Dense_0"]["kernel"].reshape(8, 4, 16)
    assert np.all(m.all(-1) | ~m.any(-1)) and m.all(-1).sum() == 16
    nz = np.asarray(params["Dense_0"]["kernel"]).reshape(8, 4, 16) != 0
    assert not np.any(nz & ~m)


def test_block_l1_scoring():
  k = np.zeros((2, 32), np.float32)
  k[0, :16] = 1.0  # L1 16, max 1
  k[0, 16] = 10.0  # L1 10, max 10
  k[1, :16] = 0.5  # L1 8
  k[1, 16:] = 0.75  # L1 12
  scores = np.asarray(sp.block_scores(jnp.asarray(k), (2, 2)))
  np.testing.assert_allclose(scores, [[16, 10], [8, 12]])
  tx = sp.sparse(optax.sgd(0.0), "static", 0.5, block_shape=(1, 16), include=".*")
  params = {"k": jnp.asarray(k)}
  _, state = tx.update({"k": jnp.zeros_like(params["k"])}, tx.init(params), params)
  np.testing.assert_array_equal(np.asarray(state.masks["k"]), [[True, False], [False, True]])


def test_default_include_and_regex():
  params = {
    "embed": {"embedding": jnp.ones((10, 4))},
    "norm": {"scale": jnp.ones(4)},
    "d": {"kernel": jnp.ones((4, 4))},
  }
  state = sp.sparse(optax.sgd(0.1), "rigl", 0.5, end_step=10).init(params)
  assert jax.tree.map(lambda m: m.shape, state.masks) == {
    "embed": {"embedding": ()},
    "norm": {"scale": ()},
    "d": {"kernel": (4, 4)},
  }
  state = sp.sparse(optax.sgd(0.1), "rigl", 0.5, end_step=10, include="embed").init(params)
  assert state.masks["embed"]["embedding"].shape == (10, 4) and state.masks["d"]["kernel"].shape == ()


def test_erk_keeps_total_budget():
  params = mlp_params(jax.random.key(4), (64, 256, 256, 10))
  state = sp.sparse(optax.sgd(0.1), "rigl", 0.9, distribution="erk", end_step=10).init(params)
  b = sp.budget(params, state)
  total = sum(p["kernel"].size for p in params.values())
  assert abs(sum(b.values()) - 0.1 * total) <= 3
  assert b["Dense_2/kernel"] / 2560 > b["Dense_1/kernel"] / 65536  # small layers are denser


@pytest.mark.parametrize(
  "kwargs, match",
  [
    (dict(sparsity=1.0), r"sparsity is 1.0; allowed: a number in \[0, 1\)"),
    (dict(sparsity=-0.1), r"sparsity is -0.1; allowed"),
    (dict(method="magic"), r"method 'magic' is not known"),
    (dict(method="rigl", end_step=None), r"end_step is None"),
    (dict(distribution="gauss"), r"distribution 'gauss'"),
  ],
)
def test_bad_arguments(kwargs, match):
  kwargs = {"method": "rigl", "end_step": 10, **kwargs}
  with pytest.raises(ValueError, match=match) as e:
    sp.sparse(optax.sgd(0.1), **kwargs)
  assert "\n" not in str(e.value)


def test_block_shape_must_divide():
  params = mlp_params(jax.random.key(0))  # Dense_2/kernel is (32, 10)
  tx = sp.sparse(optax.sgd(0.1), "rigl", 0.5, block_shape=(1, 16), end_step=10)
  with pytest.raises(ValueError, match=r"does not divide leaf 'Dense_2/kernel' of shape \(32, 10\)") as e:
    tx.init(params)
  assert "\n" not in str(e.value)


def test_channel_reordering_preserves_function():
  p = mlp_params(jax.random.key(5), (12, 32, 7))
  x = jax.random.normal(jax.random.key(6), (5, 12))
  b0 = jax.random.normal(jax.random.key(7), (32,))
  f = lambda k0, b, k1: jax.nn.relu(x @ k0 + b) @ k1
  k0, k1 = p["Dense_0"]["kernel"], p["Dense_1"]["kernel"]
  perm, inv = sp.channel_permutation(k0)
  pk0, pb0, pk1 = sp.permute_layer_pair(k0, b0, k1, perm)
  np.testing.assert_allclose(f(pk0, pb0, pk1), f(k0, b0, k1), rtol=1e-5, atol=1e-5)
  norms = np.abs(np.asarray(pk0)).sum(0)
  assert np.all(np.diff(norms) <= 0)
  np.testing.assert_array_equal(np.asarray(pk0[:, inv]), np.asarray(k0))
  # a conv kernel (kh, kw, in, out) followed by a 1x1 conv: the same permutation on out / next in
  c0 = jax.random.normal(jax.random.key(8), (3, 3, 4, 16))
  c1 = jax.random.normal(jax.random.key(9), (1, 1, 16, 5))
  img = jax.random.normal(jax.random.key(10), (2, 6, 6, 4))
  conv = lambda y, k: jax.lax.conv_general_dilated(y, k, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
  g = lambda a, b: conv(jax.nn.relu(conv(img, a)), b)
  perm, _ = sp.channel_permutation(c0)
  pc0, _, pc1 = sp.permute_layer_pair(c0, None, c1, perm)
  np.testing.assert_allclose(g(pc0, pc1), g(c0, c1), rtol=1e-4, atol=1e-4)


def test_digits_end_to_end():
  from sklearn.datasets import load_digits

  x, y = load_digits(return_X_y=True)
  x = jnp.asarray(x / 16.0, jnp.float32)
  y = jnp.asarray(y)
  params0 = mlp_params(jax.random.key(0), (64, 128, 128, 10))

  def loss_fn(p, xb, yb):
    h = xb
    for i in range(3):
      h = h @ p[f"Dense_{i}"]["kernel"] + p[f"Dense_{i}"]["bias"]
      h = jax.nn.relu(h) if i < 2 else h
    return optax.softmax_cross_entropy_with_integer_labels(h, yb).mean(), h

  def train(tx, params):
    state = tx.init(params)

    @jax.jit
    def step(params, state, i):
      idx = jax.random.randint(jax.random.key(i), (128,), 0, x.shape[0])
      (loss, _), g = jax.value_and_grad(loss_fn, has_aux=True)(params, x[idx], y[idx])
      updates, state = tx.update(g, state, params)
      return optax.apply_updates(params, updates), state, loss

    first = None
    for i in range(200):
      params, state, loss = step(params, state, i)
      first = float(loss) if first is None else first
    _, logits = loss_fn(params, x, y)
    return params, state, first, float(loss), float(jnp.mean(jnp.argmax(logits, -1) == y))

  results = {}
  _, _, l0, l1, acc = train(optax.adam(3e-3), params0)
  results["dense"] = (l0, l1, acc)
  for name, tx in [
    ("static", sp.sparse(optax.adam(3e-3), "static", 0.9, prune_step=50)),
    ("rigl", sp.sparse(optax.adam(3e-3), "rigl", 0.9, update_every=20, end_step=150)),
  ]:
    params, state, l0, l1, acc = train(tx, params0)
    results[name] = (l0, l1, acc)
    b = sp.budget(params, state)
    assert b == {"Dense_0/kernel": 819, "Dense_1/kernel": 1638, "Dense_2/kernel": 128}
    report = sp.sparsity_report(params, state)
    assert report["total"] >= 0.9 - 1e-3
  for name, (l0, l1, acc) in results.items():
    print(f"digits {name}: loss {l0:.3f} -> {l1:.3f}, train accuracy {acc:.3f}")
    assert l1 < l0 and acc > 0.5


# --- the engine: config.sparsity -------------------------------------------------------------------------------------


def _engine_config(**sparsity_config):
  from test_engine import tiny_config  # pylint: disable=g-import-not-at-top

  c = tiny_config(steps=6)
  c.checkpoint.every_steps = 6
  c.sparsity.update(sparsity_config)
  return c


def test_engine_trains_a_sparse_lm_and_keeps_the_budget(tmp_path):
  """`config.sparsity` wraps the engine's optimizer: after RigL steps with mask updates every kernel of the tiny LM
  has exactly its budget of non-zeros (90% zeros), the embedding and norms stay dense, and the loss is finite."""
  from zoo.engine import trainer  # pylint: disable=g-import-not-at-top

  c = _engine_config(method="rigl", sparsity=0.9, update_every=2, end_fraction=1.0)
  state = trainer.train(c, str(tmp_path), progress=False)
  assert isinstance(state.opt_state, sp.SparseState) and int(state.opt_state.step) == 6
  sparse_leaves = sp.sparsity_report(state.params, state.opt_state)
  kernels = {k: v for k, v in sparse_leaves.items() if k.endswith("kernel")}
  assert kernels and all(abs(v - 0.9) < 0.01 for v in kernels.values()), kernels
  every_leaf = sp.sparsity_report(state.params)
  assert every_leaf["embed/embedding"] < 0.01 and every_leaf["final_norm/scale"] == 0.0  # dense
  sizes = {sp.path_name(p): x.size for p, x in jax.tree_util.tree_flatten_with_path(state.params)[0]}
  for path, active in sp.budget(state.params, state.opt_state).items():
    assert active == sizes[path] - round(0.9 * sizes[path]), path  # the exact budget after 3 mask updates
  from zoo.engine.writers import read_metrics  # pylint: disable=g-import-not-at-top

  losses = [r["loss"] for r in read_metrics(str(tmp_path)) if "loss" in r]
  assert len(losses) == 6 and all(np.isfinite(losses))


@pytest.mark.parametrize(
  "sparsity_config, message",
  [
    ({"method": "dsl"}, r"config\.sparsity: method 'dsl' is not known"),
    (
      {"method": "rigl", "sparsity": 1.0},
      r"config\.sparsity: the requested sparsity is 1\.0; allowed: a number in \[0, 1\)",
    ),
    ({"method": "rigl", "block_shape": (1, 7)}, r"config\.sparsity: block_shape \(1, 7\) does not divide leaf"),
  ],
)
def test_engine_refuses_bad_sparsity_with_one_line(sparsity_config, message):
  from zoo.engine import trainer  # pylint: disable=g-import-not-at-top
  from zoo.models import ConfigError  # pylint: disable=g-import-not-at-top

  with pytest.raises(ConfigError, match=message):
    exp = trainer.Experiment(_engine_config(**sparsity_config))
    exp.abstract_state()
