"""BlockFFN's adaptive chunk-loss coefficient lives in 'routing_state/chunk_lambda' of the train state: a crashed run
resumes it exactly, and a checkpoint written before the schedule gained its ramp is refused in one message."""

import jax.numpy as jnp
import pytest

from configs.blockffn import get_config
from test_engine import crash_and_resume, losses
from zoo.engine import trainer
from zoo.engine.checkpoint import CheckpointError
from zoo.engine.writers import read_metrics
from zoo.routing import sparsity


def tiny_config(steps=6, **overrides):
  c = get_config()
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, num_kv_heads=1, mlp_dim=64, num_experts=4)
  c.model.update(expert_mlp_dim=8, chunk_length=8, chunk_warmup_steps=2, chunk_interval=2)
  c.data.seq_len = 16
  c.train.update(steps=steps, batch_size=8, log_every_steps=1, eval_every_steps=0, eval_batches=2)
  c.optimizer.update(lr=1e-2, warmup_steps=2)
  c.checkpoint.update(every_steps=2, keep=3)
  c.checkpoint.async_save = False
  c.mesh.update(data=-1, fsdp=1, expert=1, tensor=1)
  c.update(overrides)
  return c


def lambdas(workdir):
  return {r["step"]: r["chunk_lambda"] for r in read_metrics(workdir) if "chunk_lambda" in r and "loss" in r}


def test_crash_and_resume_gives_the_same_losses_and_lambdas(tmp_path, monkeypatch):
  ref, run = crash_and_resume(tiny_config(), tmp_path, monkeypatch)
  a, b = losses(ref), losses(run)
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  assert [b[s] for s in sorted(a)] == pytest.approx([a[s] for s in sorted(a)], rel=1e-6)
  la, lb = lambdas(ref), lambdas(run)
  assert [lb[s] for s in sorted(la)] == pytest.approx([la[s] for s in sorted(la)], rel=1e-6)
  assert la[4] != pytest.approx(la[1])  # adapted at step 4: the resumed steps 5 and 6 follow its ramp


def _old_state(initial=5e-2):
  """The state of the schedule before its ramp: lambda, step, window_sum, previous_mean."""
  return {
    "lambda": jnp.asarray(initial, jnp.float32),
    "step": jnp.zeros((), jnp.int32),
    "window_sum": jnp.zeros((), jnp.float32),
    "previous_mean": jnp.zeros((), jnp.float32),
  }


def test_a_checkpoint_without_the_ramp_is_refused_in_one_message_and_init_from_reuses_it(tmp_path, monkeypatch):
  old = tmp_path / "old"
  with monkeypatch.context() as m:
    m.setattr(sparsity, "init_chunk_lambda_state", _old_state)
    m.setattr(sparsity, "update_chunk_lambda", lambda state, loss, **kw: {**state, "step": state["step"] + 1})
    trainer.train(tiny_config(steps=2), str(old), progress=False)
  with pytest.raises(
    CheckpointError,
    match=r"chunk_lambda\.ramp_from \(shape \(\)\) is not in the checkpoint.*"
    r"config\.init_from to reuse the weights",
  ):
    trainer.train(tiny_config(steps=4), str(old), progress=False)
  new = tmp_path / "new"
  trainer.train(tiny_config(steps=2, init_from=str(old)), str(new), progress=False)
  assert sorted(losses(new)) == [1, 2]
