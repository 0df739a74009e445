"""QLoRA (`config.lora.quantize='nf4'`, `zoo.layers.lora` + `zoo.layers.nf4`): the adapted layers' frozen base
kernels are stored in NF4 in the train state and dequantised in the matmul; the adapters train on that base; the
run's checkpoints (NF4 frozen part included) resume bit-exactly; the base checkpoint is not modified."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from test_engine import crash_and_resume, read_metrics
from test_lora import TOKENS, _digest, _random_b, lora_config
from test_models_contract import TINY
from zoo.checkpoints import save_orbax
from zoo.engine import trainer
from zoo.layers import lora, nf4
from zoo.models import ConfigError, build_model

TARGETS = (r"attention/(query|key|value|out)$", r"ffn/(gate|up|down)$")


def _nf4_leaves(tree):
  leaves = traverse_util.flatten_dict(tree, is_leaf=lambda _, x: isinstance(x, nf4.NF4Tensor))
  return {"/".join(p): v for p, v in leaves.items() if isinstance(v, nf4.NF4Tensor)}


def test_an_nf4_base_computes_the_dequantised_base_plus_the_adapters():
  model = build_model({"name": "dense_lm", **TINY["dense_lm"]})
  spec = lora.LoRASpec(r=4, alpha=8.0, target_modules=TARGETS, quantize="nf4")
  adapted = lora.with_lora(model, spec)
  params = _random_b(nn.unbox(adapted.init(jax.random.key(0), TOKENS))["params"])
  base, adapters = lora.split_adapters(params)
  stored = lora.quantize_frozen(base, spec)
  quantised = _nf4_leaves(stored)
  # Every adapted layer's kernel (attention q/k/v/o and the FFN, in every layer) is NF4; nothing else is.
  assert set(quantised) == {m + "/kernel" for m in lora.adapted_modules(params)}
  assert not any("embed" in name or "norm" in name for name in quantised)
  # The forward on the stored base is the forward on its dequantised kernels, adapters included.
  flat = traverse_util.flatten_dict(stored, is_leaf=lambda _, x: isinstance(x, nf4.NF4Tensor))
  dequantised = traverse_util.unflatten_dict(
    {p: nf4.dequantize(v) if isinstance(v, nf4.NF4Tensor) else v for p, v in flat.items()}
  )
  with_adapters = lambda b: {**traverse_util.flatten_dict(b), **traverse_util.flatten_dict(adapters)}
  out_nf4 = adapted.apply({"params": traverse_util.unflatten_dict(with_adapters(stored))}, TOKENS)[0]
  out_deq = adapted.apply({"params": traverse_util.unflatten_dict(with_adapters(dequantised))}, TOKENS)[0]
  np.testing.assert_allclose(out_nf4, out_deq, atol=1e-5)
  # Quantisation changes the base (NF4 is lossy) but stays near it, and merge folds the adapters into it.
  out_float = adapted.apply({"params": params}, TOKENS)[0]
  diff = float(jnp.abs(out_nf4 - out_float).max())
  assert 1e-4 < diff < 0.5 * float(jnp.abs(out_float).max()), diff
  merged = lora.merge(traverse_util.unflatten_dict(with_adapters(stored)), spec)
  np.testing.assert_allclose(model.apply({"params": merged}, TOKENS)[0], out_nf4, atol=2e-5)
  # Bytes: per kernel of n weights, n / 2 for the indices, one int8 per block of 64, and an fp32 per block of 256
  # scales plus their fp32 mean (4.127 bits per weight on large kernels, more on these tiny ones).
  sizes = [int(np.prod(q.shape)) for q in quantised.values()]
  expected = sum(n // 2 + n // 64 + 4 * -(-n // (64 * 256)) + 4 for n in sizes)
  assert sum(q.nbytes() for q in quantised.values()) == expected
  rest = [v for v in flat.values() if not isinstance(v, nf4.NF4Tensor)]
  assert nf4.nbytes(stored) == expected + sum(4 * int(v.size) for v in rest)  # the float32 rest as it is

  # Gradients reach the adapters through the NF4 base.
  def loss(a):
    p = traverse_util.unflatten_dict({**traverse_util.flatten_dict(stored), **traverse_util.flatten_dict(a)})
    return jnp.mean(adapted.apply({"params": p}, TOKENS)[0] ** 2)

  grads = jax.grad(loss)(adapters)
  assert all(float(jnp.abs(g).max()) > 0 for g in jax.tree.leaves(grads))


def qlora_config(base_dir, steps=1):
  c = lora_config(base_dir, steps)
  c.lora.update(target_modules=TARGETS, quantize="nf4", dropout=0.0)
  return c


def test_a_qlora_run_keeps_the_base_in_nf4_and_trains_the_adapters(tmp_path):
  c = qlora_config(tmp_path / "base", steps=6)
  c.train.update(log_every_steps=3, eval_every_steps=6, eval_batches=2)
  base_vars = nn.unbox(jax.jit(build_model(c.model).init)(jax.random.key(5), TOKENS))
  save_orbax(str(tmp_path / "base"), c.model, base_vars)
  before = _digest(tmp_path / "base")
  state = trainer.train(c, str(tmp_path / "run"), progress=False)
  quantised = _nf4_leaves(state.frozen)
  assert len(quantised) == 7 * c.model.num_layers  # q, k, v, o, gate, up, down of every layer
  base_flat = {"/".join(p): v for p, v in traverse_util.flatten_dict(base_vars["params"]).items()}
  for name, q in quantised.items():  # the loaded base, quantised (not a fresh init)
    w = base_flat[name]
    step = np.abs(w).reshape(-1, 64).max(axis=1, keepdims=True)  # the widest NF4 gap is about 0.3 x absmax
    assert np.all(np.abs(np.asarray(nf4.dequantize(q)).reshape(-1, 64) - w.reshape(-1, 64)) <= 0.17 * step + 1e-3)
  assert all(p[-1] in ("lora_a", "lora_b") for p in traverse_util.flatten_dict(state.params))
  records = read_metrics(tmp_path / "run")
  assert all(np.isfinite(r["loss"]) for r in records if "loss" in r)
  assert _digest(tmp_path / "base") == before


def test_a_qlora_run_resumes_bit_exactly(tmp_path, monkeypatch):
  c = qlora_config(tmp_path / "base", steps=6)
  c.checkpoint.update(every_steps=2)
  base_vars = nn.unbox(jax.jit(build_model(c.model).init)(jax.random.key(5), TOKENS))
  save_orbax(str(tmp_path / "base"), c.model, base_vars)
  ref, run = crash_and_resume(c, tmp_path, monkeypatch, crash_after=4)
  a, b = read_metrics(ref), read_metrics(run)
  assert [r["loss"] for r in a if "loss" in r][-1] == [r["loss"] for r in b if "loss" in r][-1]


def test_qlora_refuses_an_unknown_quantisation_and_a_kernel_off_the_block():
  with pytest.raises(ConfigError, match="config.lora.quantize='int3'"):
    lora.LoRASpec(quantize="int3")
  spec = lora.LoRASpec(target_modules=("q$",), quantize="nf4")
  with pytest.raises(ConfigError, match="not a multiple of the NF4 block"):
    lora.quantize_frozen({"q": {"kernel": jnp.ones((3, 5))}}, spec)
