"""Mamba-1 (zoo/layers/mamba.py): associative vs sequential scan, parity with the mambapy reference (random weights,
float32), causality, initialisation, shapes, jit + grad.

Needs torch and mambapy (the `hf` extra); the import fails loudly when they are missing.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from mambapy.mamba import Mamba as TorchMamba, MambaConfig, ResidualBlock as TorchResidualBlock

from zoo.layers import Mamba, MambaBlock, MambaStack, load_mambapy_state_dict, selective_scan, sequential_scan

D_MODEL, N_LAYERS, BATCH, LENGTH = 16, 2, 2, 12


def _config(pscan=True):
  return MambaConfig(d_model=D_MODEL, n_layers=N_LAYERS, d_state=16, d_conv=4, expand_factor=2, pscan=pscan)


def _scan_inputs(key, batch=BATCH, length=LENGTH, d_inner=8, d_state=4):
  k = jax.random.split(key, 6)
  x = jax.random.normal(k[0], (batch, length, d_inner))
  delta = jax.nn.softplus(jax.random.normal(k[1], (batch, length, d_inner)))
  A = -jnp.exp(jax.random.normal(k[2], (d_inner, d_state)))
  B = jax.random.normal(k[3], (batch, length, d_state))
  C = jax.random.normal(k[4], (batch, length, d_state))
  D = jax.random.normal(k[5], (d_inner,))
  return x, delta, A, B, C, D


def _randomise(module):
  """Moves every torch parameter off its structured init (A_log = log(1..N), D = 1, norms = 1) so that the parity
  check sees each parameter's layout."""
  with torch.no_grad():
    for name, p in module.named_parameters():
      if name.endswith(("A_log", "D", "norm.weight", "norm_f.weight")):
        p.add_(0.1 * torch.randn_like(p))


def _input(seed=0):
  return np.random.default_rng(seed).standard_normal((BATCH, LENGTH, D_MODEL)).astype(np.float32)


def _torch_out(module, x):
  with torch.no_grad():
    return module(torch.from_numpy(x)).numpy()


def test_associative_scan_matches_sequential():
  inputs = _scan_inputs(jax.random.key(0))
  y_assoc = selective_scan(*inputs)
  y_seq = sequential_scan(*inputs)
  assert y_assoc.shape == (BATCH, LENGTH, 8) and y_assoc.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(y_assoc), np.asarray(y_seq), rtol=1e-5, atol=1e-6)


def test_scan_is_the_recurrence():
  """sequential_scan against a plain numpy loop of h_t = exp(delta_t A) h_{t-1} + delta_t B_t x_t, y = h C + D x."""
  x, delta, A, B, C, D = (np.asarray(v, np.float64) for v in _scan_inputs(jax.random.key(1)))
  h = np.zeros((BATCH, x.shape[-1], A.shape[-1]))
  ys = []
  for t in range(LENGTH):
    h = np.exp(delta[:, t, :, None] * A) * h + delta[:, t, :, None] * B[:, t, None, :] * x[:, t, :, None]
    ys.append(np.einsum("ben,bn->be", h, C[:, t]) + D * x[:, t])
  y = np.asarray(sequential_scan(x, delta, A, B, C, D))
  np.testing.assert_allclose(y, np.stack(ys, 1), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pscan", [True, False])
def test_stack_matches_mambapy(pscan):
  torch.manual_seed(0)
  ref = TorchMamba(_config(pscan)).eval()
  _randomise(ref)
  x = _input()
  params = load_mambapy_state_dict(ref.state_dict())
  model = MambaStack(N_LAYERS, final_norm=False)
  init = nn.meta.unbox(model.init(jax.random.key(0), x))["params"]
  assert jax.tree.map(np.shape, init) == jax.tree.map(np.shape, params)  # the loader fills every parameter
  y = np.asarray(model.apply({"params": params}, x))
  diff = np.max(np.abs(y - _torch_out(ref, x)))
  print(f"MambaStack vs mambapy Mamba (pscan={pscan}): max abs diff {diff:.2e}")
  assert diff <= 1e-4


def test_block_matches_mambapy():
  torch.manual_seed(1)
  ref = TorchResidualBlock(_config()).eval()
  _randomise(ref)
  x = _input(1)
  params = load_mambapy_state_dict(ref.state_dict())
  block_out = np.asarray(MambaBlock().apply({"params": params}, x))
  mixer_out = np.asarray(Mamba().apply({"params": params["mixer"]}, x))
  block_diff = np.max(np.abs(block_out - _torch_out(ref, x)))
  mixer_diff = np.max(np.abs(mixer_out - _torch_out(ref.mixer, x)))
  print(f"MambaBlock vs ResidualBlock: {block_diff:.2e}; Mamba vs MambaBlock (mixer): {mixer_diff:.2e}")
  assert block_diff <= 1e-4 and mixer_diff <= 1e-4


def test_final_norm_and_prefix():
  """A MambaLM-style state_dict (`mamba.` prefix, `norm_f.weight`) loads into MambaStack(final_norm=True)."""
  torch.manual_seed(2)
  ref = TorchMamba(_config()).eval()
  norm_f = torch.nn.RMSNorm(D_MODEL, eps=1e-5)
  with torch.no_grad():
    norm_f.weight.copy_(1 + 0.1 * torch.randn(D_MODEL))
  state = {f"mamba.{k}": v for k, v in ref.state_dict().items()} | {"norm_f.weight": norm_f.weight}
  params = load_mambapy_state_dict(state, prefix="mamba.")
  x = _input(2)
  y = np.asarray(MambaStack(N_LAYERS).apply({"params": params}, x))
  with torch.no_grad():
    expected = norm_f(ref(torch.from_numpy(x))).numpy()
  assert np.max(np.abs(y - expected)) <= 1e-4


@pytest.mark.parametrize("scan", ["associative", "sequential"])
def test_causal(scan):
  model = MambaStack(N_LAYERS, scan=scan)
  x = jnp.asarray(_input(3))
  params = model.init(jax.random.key(0), x)
  y = model.apply(params, x)
  t = 5
  x2 = x.at[:, t + 1 :].set(jax.random.normal(jax.random.key(9), x[:, t + 1 :].shape))
  y2 = model.apply(params, x2)
  np.testing.assert_array_equal(np.asarray(y[:, : t + 1]), np.asarray(y2[:, : t + 1]))
  assert not np.allclose(np.asarray(y[:, t + 1 :]), np.asarray(y2[:, t + 1 :]))


def test_init_and_shapes():
  x = jnp.asarray(_input(4))
  variables = MambaBlock().init(jax.random.key(0), x)
  p = nn.meta.unbox(variables)["params"]
  mixer, d_inner, rank = p["mixer"], 2 * D_MODEL, 1
  shapes = jax.tree.map(np.shape, p)
  assert shapes == {
    "norm": {"scale": (D_MODEL,)},
    "mixer": {
      "in_proj": {"kernel": (D_MODEL, 2, d_inner)},
      "conv1d": {"kernel": (4, d_inner), "bias": (d_inner,)},
      "x_proj": {"kernel": (d_inner, rank + 32)},
      "dt_proj": {"kernel": (rank, d_inner), "bias": (d_inner,)},
      "A_log": (d_inner, 16),
      "D": (d_inner,),
      "out_proj": {"kernel": (d_inner, D_MODEL)},
    },
  }
  np.testing.assert_allclose(mixer["A_log"], np.log(np.tile(np.arange(1, 17), (d_inner, 1))), rtol=1e-6)
  np.testing.assert_array_equal(mixer["D"], np.ones(d_inner))
  dt = np.asarray(jax.nn.softplus(mixer["dt_proj"]["bias"]))
  assert np.all(dt >= 1e-3 * (1 - 1e-4)) and np.all(dt <= 0.1 * (1 + 1e-4))
  assert np.all(np.abs(mixer["dt_proj"]["kernel"]) <= rank**-0.5)
  assert np.all(np.abs(mixer["conv1d"]["kernel"]) <= 0.5)
  y = MambaBlock(dtype=jnp.bfloat16).apply(variables, x.astype(jnp.bfloat16))
  assert y.shape == x.shape and y.dtype == jnp.bfloat16


def test_jit_grad():
  model = MambaStack(N_LAYERS)
  x = jnp.asarray(_input(5))
  params = nn.meta.unbox(model.init(jax.random.key(0), x))["params"]
  loss = jax.jit(jax.value_and_grad(lambda p, x: jnp.mean(model.apply({"params": p}, x) ** 2), argnums=(0, 1)))
  value, (g_params, g_x) = loss(params, x)
  leaves = jax.tree.leaves(g_params)
  assert np.isfinite(float(value)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves + [g_x])
  assert all(float(jnp.max(jnp.abs(g))) > 0 for g in leaves)


def test_non_default_config_matches_mambapy():
  """Biases on in_proj/out_proj, d_conv 3, expand 3, d_state 8, dt_rank 2 (d_model 20)."""
  torch.manual_seed(3)
  ref = TorchMamba(MambaConfig(d_model=20, n_layers=1, d_state=8, d_conv=3, expand_factor=3, bias=True)).eval()
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if name.endswith("bias"):
        p.add_(0.1 * torch.randn_like(p))
  x = np.random.default_rng(6).standard_normal((BATCH, 9, 20)).astype(np.float32)
  model = MambaStack(1, d_state=8, d_conv=3, expand=3, use_bias=True, final_norm=False)
  y = np.asarray(model.apply({"params": load_mambapy_state_dict(ref.state_dict())}, x))
  assert np.max(np.abs(y - _torch_out(ref, x))) <= 1e-4
