"""The engine end to end on the embedded corpus: loss falls, metrics.jsonl and TensorBoard events, init_from,
KV-cache generation, schedules. Resume and mesh changes are in test_engine_resume.py."""

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs.dense_lm import get_config
from zoo.engine import trainer
from zoo.engine.checkpoint import Checkpointer
from zoo.engine.generate import generate
from zoo.engine.optim import make_schedule
from zoo.engine.writers import read_metrics
from zoo.models import build_model


def tiny_config(steps=6, **mesh):
  c = get_config()
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64)
  c.data.seq_len = 16
  c.train.update(steps=steps, batch_size=16, log_every_steps=1, eval_every_steps=0, eval_batches=2)
  c.optimizer.update(lr=1e-2, warmup_steps=2)
  c.checkpoint.update(every_steps=2, keep=3)
  c.checkpoint.async_save = False
  c.sample.max_new_tokens = 4
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  c.mesh.update(**mesh)
  return c


def losses(workdir):
  """step -> loss of the last record of each step (a resumed run logs again)."""
  return {r["step"]: r["loss"] for r in read_metrics(workdir) if "loss" in r}


def wrap_train_step(monkeypatch, after_call):
  """Call `after_call(n, state)` after the n-th train step (n from 1); it may return a replacement state."""
  original = trainer.Experiment.compile_train_step

  def make(self, *args):
    step_fn = original(self, *args)
    calls = [0]

    def wrapped(state, batch):
      state, metrics = step_fn(state, batch)
      calls[0] += 1
      return after_call(calls[0], state) or state, metrics

    return wrapped

  monkeypatch.setattr(trainer.Experiment, "compile_train_step", make)


def crash_and_resume(config, tmp_path, monkeypatch, crash_after=4):
  """Train `config` uninterrupted into tmp_path/ref, and into tmp_path/run with a crash in the step after
  `crash_after` (the last checkpoint), then resume there with a fresh driver. Returns (ref, run) workdirs."""
  ref, run = tmp_path / "ref", tmp_path / "run"
  trainer.train(config, str(ref), progress=False)

  def crash(n, state):
    if n == crash_after + 1:
      raise RuntimeError("simulated crash")

  with monkeypatch.context() as m:
    wrap_train_step(m, crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
      trainer.train(config, str(run), progress=False)
  assert Checkpointer(str(run / "checkpoints")).latest_step() == crash_after
  trainer.train(config, str(run), progress=False)  # a fresh driver resumes from the last checkpoint
  return ref, run


def test_short_run_loss_falls_and_logs(tmp_path):
  c = tiny_config(steps=40)
  c.train.update(eval_every_steps=20, log_every_steps=10, eval_batches=4)
  trainer.train(c, str(tmp_path), progress=False)
  records = read_metrics(tmp_path)
  assert [r["step"] for r in records] == [0, 10, 20, 30, 40]
  for r in records[1:]:
    for key in ("loss", "perplexity", "bits_per_byte", "learning_rate", "grad_norm", "tokens_per_sec"):
      assert np.isfinite(r[key]), (key, r)
  assert records[1]["learning_rate"] > records[-1]["learning_rate"] > 0  # cosine decay after warmup
  start, end = records[0]["eval_bits_per_byte"], records[-1]["eval_bits_per_byte"]
  assert end < start - 1.0, (start, end)  # random init is ~8 bits per byte
  assert any(name.startswith("events") for name in os.listdir(tmp_path / "tb"))


def test_init_from_starts_from_the_checkpoint_params(tmp_path):
  trainer.train(tiny_config(steps=2), str(tmp_path / "a"), progress=False)
  c = tiny_config(steps=1)
  c.init_from = str(tmp_path / "a")
  c.seed = 7  # a different init would give different params
  c.optimizer.lr = 1e-9
  state = trainer.train(c, str(tmp_path / "b"), progress=False)
  exp = trainer.Experiment(tiny_config(steps=2))
  saved, _ = Checkpointer(str(tmp_path / "a" / "checkpoints")).restore(2, exp.abstract_state()[0])
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(saved.params)):
    np.testing.assert_allclose(x, y, atol=1e-6)


def test_greedy_generation_matches_full_forward():
  c = tiny_config()
  model = build_model(c.model)
  prompt = jnp.array([[257, 100, 101, 102], [257, 40, 41, 42]], jnp.int32)
  variables = model.init(jax.random.key(1), prompt)
  out = generate(model, variables, prompt, max_new_tokens=5)
  assert out.shape == (2, 9)
  np.testing.assert_array_equal(out[:, :4], prompt)
  for i in range(4, 9):  # each new token is the argmax of a full forward pass over the prefix
    logits, _ = model.apply(variables, out[:, :i])
    np.testing.assert_array_equal(out[:, i], jnp.argmax(logits[:, -1], -1))
  top1 = generate(model, variables, prompt, max_new_tokens=5, temperature=0.7, top_k=1, rng=jax.random.key(3))
  np.testing.assert_array_equal(top1, out)
  sampled = generate(model, variables, prompt, max_new_tokens=5, temperature=5.0, rng=jax.random.key(3))
  assert sampled.shape == out.shape and not np.array_equal(sampled, out)


@pytest.mark.parametrize("name", ["warmup_cosine", "warmup_stable_decay", "constant"])
def test_schedules(name):
  c = get_config().optimizer
  c.update(schedule=name, lr=1.0, warmup_steps=10, decay_fraction=0.2, end_lr_fraction=0.1)
  f = make_schedule(c, 100)
  assert float(f(0)) == 0.0
  np.testing.assert_allclose(float(f(5)), 0.5, rtol=1e-6)
  np.testing.assert_allclose(float(f(10)), 1.0, rtol=1e-6)
  end = {"warmup_cosine": 0.1, "warmup_stable_decay": 0.0, "constant": 1.0}[name]
  np.testing.assert_allclose(float(f(100)), end, atol=1e-6)
  if name == "warmup_stable_decay":
    np.testing.assert_allclose([float(f(50)), float(f(80)), float(f(90))], [1.0, 1.0, 0.5], rtol=1e-6)
