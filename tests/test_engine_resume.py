"""Checkpoints in the engine: 1 device vs a sharded mesh, restore onto another mesh (after SIGTERM), crash and resume,
NaN guard, corrupted and incompatible checkpoints."""

import os
import signal

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from test_engine import crash_and_resume, losses, tiny_config, wrap_train_step
from zoo.engine import trainer
from zoo.engine.checkpoint import Checkpointer, CheckpointError


def test_one_device_vs_sharded_and_restore_onto_other_mesh(tmp_path, monkeypatch):
  ref = tmp_path / "ref"
  trainer.train(tiny_config(), str(ref), devices=jax.devices()[:1], progress=False)
  # data=8 until a SIGTERM after step 3 (saves step 3), then resume on data=2 x fsdp=4.
  run = tmp_path / "run"
  with monkeypatch.context() as m:
    wrap_train_step(m, lambda n, s: os.kill(os.getpid(), signal.SIGTERM) if n == 3 else None)
    trainer.train(tiny_config(data=8), str(run), progress=False)
  assert Checkpointer(str(run / "checkpoints")).all_steps() == [2, 3]
  assert max(losses(run)) == 3
  trainer.train(tiny_config(data=2, fsdp=4), str(run), progress=False)
  a, b = losses(ref), losses(run)
  assert sorted(a) == sorted(b) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=2e-5)
  assert a[6] < a[1]


def test_crash_and_resume_gives_the_same_losses(tmp_path, monkeypatch):
  ref, run = crash_and_resume(tiny_config(), tmp_path, monkeypatch)
  a, b = losses(ref), losses(run)
  assert sorted(b) == [1, 2, 3, 4, 5, 6]
  np.testing.assert_allclose([b[s] for s in a], [a[s] for s in a], rtol=1e-6)


def test_nan_guard_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
  def poison(n, state):  # the update of step 4 leaves NaN params (its loss was still finite)
    if n == 4:
      return state.replace(params=jax.tree.map(lambda p: p * jnp.nan, state.params))

  wrap_train_step(monkeypatch, poison)
  with pytest.raises(trainer.TrainingDivergedError, match="step 4.*last good checkpoint is step 2"):
    trainer.train(tiny_config(steps=8), str(tmp_path), progress=False)
  monkeypatch.undo()
  exp = trainer.Experiment(tiny_config(steps=8))
  ckpt = Checkpointer(str(tmp_path / "checkpoints"))
  assert ckpt.all_steps() == [2]
  state, _ = ckpt.restore(2, exp.abstract_state()[0])
  assert all(bool(jnp.all(jnp.isfinite(p))) for p in jax.tree.leaves(state.params))


def test_bad_checkpoints_give_clear_errors_and_delete_nothing(tmp_path):
  trainer.train(tiny_config(steps=2), str(tmp_path), progress=False)
  other = tiny_config(steps=4)
  other.model.embed_dim = 48  # incompatible shapes
  with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .*checkpoints was written by a different model"):
    trainer.train(other, str(tmp_path), progress=False)
  state_dir = tmp_path / "checkpoints" / "2" / "state"
  files = sorted(p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0)
  for p in files:
    p.write_bytes(b"garbage")
  with pytest.raises(CheckpointError, match=r"checkpoint step 2 in .*checkpoints is corrupted: its file "):
    trainer.train(tiny_config(steps=4), str(tmp_path), progress=False)
  assert sorted(p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 0) == files
