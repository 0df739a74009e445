"""What a run guarantees when things go wrong: SIGTERM at any moment leaves the announced step committed, one
train.py per workdir, corrupted checkpoints are named (never deleted) and an earlier step can be chosen, every bad
input is refused before step 1, and nothing the user has is silently replaced."""

import json
import os
import random
import signal
import threading

import jax
import numpy as np
import pytest

from test_engine import losses, tiny_config
from zoo.data import builders
from zoo.engine import trainer
from zoo.engine.checkpoint import Checkpointer, CheckpointError, CheckpointNotFound
from zoo.engine.workdir import WorkdirError, WorkdirLock
from zoo.engine.writers import read_metrics
from zoo.models import ConfigError


def _announced(capsys):
  """The step of the 'SIGTERM: saved checkpoint step N' line, 0 for a SIGTERM before the first step, or None."""
  for line in capsys.readouterr().out.splitlines():
    if line.startswith("SIGTERM: saved checkpoint step "):
      return int(line.split()[4])
    if line.startswith("SIGTERM before the first step: nothing new to save"):
      return 0
  return None


def test_sigterm_during_the_metrics_fetch_saves_the_announced_step(tmp_path, monkeypatch, capsys):
  c = tiny_config(steps=20)
  c.train.log_every_steps = 3
  c.checkpoint.every_steps = 100  # no periodic save: only the SIGTERM save can hold step 3
  original = trainer.Experiment.host_metrics

  def host_metrics(self, metrics):
    if not getattr(self, "_signalled", False):
      self._signalled = True
      os.kill(os.getpid(), signal.SIGTERM)  # arrives while the logged step's metrics are fetched
    return original(self, metrics)

  monkeypatch.setattr(trainer.Experiment, "host_metrics", host_metrics)
  trainer.train(c, str(tmp_path), progress=False)
  step = _announced(capsys)
  assert step == 3
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]


def test_sigterm_at_random_moments_always_leaves_the_announced_step(tmp_path, monkeypatch, capsys):
  """The signal comes from another thread at a random moment of the loop: during a step, a metrics fetch, an
  evaluation or an asynchronous save."""
  rng, announced, timers = random.Random(0), [], []
  original = trainer.Experiment.compile_train_step

  def compile_train_step(self, *args):
    compiled = original(self, *args)
    timers.append(threading.Timer(rng.uniform(0.0, 1.5), os.kill, (os.getpid(), signal.SIGTERM)))

    def step(state, batch):
      if not timers[-1].is_alive() and not timers[-1].finished.is_set():
        timers[-1].start()  # the clock starts with the first step
      return compiled(state, batch)

    return step

  monkeypatch.setattr(trainer.Experiment, "compile_train_step", compile_train_step)
  for attempt in range(3):
    c = tiny_config(steps=2000)
    c.train.update(log_every_steps=7, eval_every_steps=40, eval_batches=1)
    c.checkpoint.every_steps = 25
    c.checkpoint.async_save = True
    workdir = tmp_path / str(attempt)
    try:
      trainer.train(c, str(workdir), progress=False)
    finally:
      timers[-1].cancel()
    step = _announced(capsys)
    assert step is not None and step < 2000, step
    ckpt = Checkpointer(str(workdir / "checkpoints"))
    if step == 0:  # the signal came during start-up
      assert ckpt.latest_step() is None
    else:
      assert ckpt.latest_step() == step and ckpt.verify(step) is None
      announced.append(step)
  assert announced  # at least one signal arrived while training


def test_a_second_run_on_a_workdir_is_refused_and_a_stale_lock_is_recovered(tmp_path):
  c = tiny_config(steps=2)
  with WorkdirLock(str(tmp_path)):  # another process holding the workdir
    with pytest.raises(WorkdirError, match=r"in use by a training run \(pid \d+ on .* since .*\); allowed: one "):
      trainer.train(c, str(tmp_path), progress=False)
  assert not (tmp_path / "checkpoints").exists() and not (tmp_path / "metrics.jsonl").exists()
  (tmp_path / ".lock").write_text("pid 999999 on somewhere since 2020-01-01T00:00:00\n")  # a dead holder's file
  trainer.train(c, str(tmp_path), progress=False)
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2]


def _flip_a_byte(path):
  data = bytearray(path.read_bytes())
  data[len(data) // 2] ^= 0x55
  path.write_bytes(bytes(data))


def test_a_corrupted_checkpoint_is_named_and_an_earlier_step_can_be_chosen(tmp_path):
  ref = tmp_path / "ref"
  trainer.train(tiny_config(steps=6), str(ref), progress=False)
  run = tmp_path / "run"
  trainer.train(tiny_config(steps=4), str(run), progress=False)  # steps 2 and 4
  data_files = sorted(
    p for p in (run / "checkpoints" / "4" / "state").rglob("*") if p.is_file() and "ocdbt.process_0/d/" in str(p)
  )
  victim = max(data_files, key=lambda p: p.stat().st_size)
  _flip_a_byte(victim)
  before = sorted(str(p) for p in (run / "checkpoints").rglob("*"))
  name = os.path.relpath(victim, run / "checkpoints" / "4")
  with pytest.raises(
    CheckpointError,
    match=rf"step 4 .* is corrupted: its file {name} does not match .* Steps that "
    r"verify: \[2\]; resume from one with `train.py ... --step 2`",
  ):
    trainer.train(tiny_config(steps=6), str(run), progress=False)
  with pytest.raises(CheckpointError, match="is corrupted"):
    trainer.evaluate(tiny_config(steps=6), str(run))
  assert sorted(str(p) for p in (run / "checkpoints").rglob("*")) == before  # nothing deleted or rewritten
  step, results, _ = trainer.evaluate(tiny_config(steps=6), str(run), step=2)
  assert step == 2 and np.isfinite(results["loss"])

  trainer.train(tiny_config(steps=6), str(run), progress=False, step=2)  # the corrupt step 4 is set aside
  assert (run / "checkpoints" / "4.set_aside.0").is_dir()
  a, b = losses(ref), losses(run)
  np.testing.assert_allclose([b[s] for s in range(1, 7)], [a[s] for s in range(1, 7)], rtol=1e-6)
  assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4, 5, 6]  # re-run steps logged once


def test_non_finite_values_in_a_checkpoint_are_refused(tmp_path):
  exp = trainer.Experiment(tiny_config(steps=2))
  state, _ = exp.init_state()
  state = state.replace(opt_state=jax.tree.map(lambda x: x * np.nan if x.dtype == np.float32 else x, state.opt_state))
  ckpt = Checkpointer(str(tmp_path / "checkpoints"), use_async=False)
  ckpt.save(2, state, {})
  ckpt.close()
  with pytest.raises(CheckpointError, match=r"step 2 .* is corrupted: it holds non-finite values in \['opt_state'\]"):
    trainer.train(tiny_config(steps=4), str(tmp_path), progress=False)


def test_bad_eval_split_and_empty_domains_are_refused_before_step_one(tmp_path):
  c = tiny_config(steps=2)
  c.data.eval_split = "nope"
  with pytest.raises(ValueError, match="split='nope' is not a split"):
    trainer.train(c, str(tmp_path / "a"), progress=False)
  assert not os.path.exists(tmp_path / "a" / "metrics.jsonl")
  c = tiny_config(steps=2)
  c.data.domains = ("json",)  # the json package's files all fall in the train split
  with pytest.raises(ValueError, match="split='validation' domains=\\('json',\\) has no examples"):
    trainer.train(c, str(tmp_path / "b"), progress=False)
  assert not os.path.exists(tmp_path / "b" / "checkpoints" / "1")


def test_the_final_step_is_saved_before_the_final_evaluation(tmp_path, monkeypatch):
  c = tiny_config(steps=3)
  c.checkpoint.every_steps = 100

  def failing_eval(self, state, eval_step):
    raise RuntimeError("evaluation failed")

  monkeypatch.setattr(trainer.Experiment, "run_eval", failing_eval)
  with pytest.raises(RuntimeError, match="evaluation failed"):
    trainer.train(c, str(tmp_path), progress=False)
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [3]


def test_config_json_is_kept_when_a_resume_fails_and_a_changed_config_is_reported(tmp_path, capsys):
  trainer.train(tiny_config(steps=2), str(tmp_path), progress=False)
  original = (tmp_path / "config.json").read_text()
  other = tiny_config(steps=4)
  other.model.embed_dim = 48
  with pytest.raises(CheckpointError, match=r"different model or optimizer config: params\.\S+ has shape"):
    trainer.train(other, str(tmp_path), progress=False)
  assert (tmp_path / "config.json").read_text() == original
  capsys.readouterr()
  changed = tiny_config(steps=4)
  changed.optimizer.lr = 5e-3
  trainer.train(changed, str(tmp_path), progress=False)
  out = capsys.readouterr().out
  assert "differs from the run's config.json" in out and "optimizer.lr: 0.01 -> 0.005" in out
  assert "train.steps: 2 -> 4" in out
  assert (tmp_path / "config.step2.json").read_text() == original
  assert json.loads((tmp_path / "config.json").read_text())["optimizer"]["lr"] == 5e-3


def test_a_step_that_cannot_fit_in_memory_is_refused_before_allocating(tmp_path):
  c = tiny_config(steps=2)
  c.data.seq_len = 10**8
  with pytest.raises(
    ConfigError,
    match=r"one training step needs about [\d.]+ GiB per device .* but a cpu device has "
    r"[\d.]+ GiB; lower train.batch_size",
  ):
    trainer.train(c, str(tmp_path), progress=False)


def test_checks_that_used_to_pass(tmp_path):
  c = tiny_config()
  c.optimizer.lr = float("inf")
  with pytest.raises(ConfigError, match=r"config.optimizer.lr=inf is invalid; allowed: a finite number"):
    trainer.Experiment(c)
  c = tiny_config()
  c.checkpoint["async"] = False
  with pytest.raises(ConfigError, match="config.checkpoint.async was renamed config.checkpoint.async_save"):
    trainer.Experiment(c)
  c = tiny_config()
  c.data.data_dir = str(tmp_path / "a_file")
  (tmp_path / "a_file").write_text("")
  with pytest.raises(ValueError, match="data_dir=.* is a file; allowed: a directory"):
    trainer.Experiment(c)


def test_nothing_is_created_where_nothing_was(tmp_path):
  missing = tmp_path / "missing"
  with pytest.raises(WorkdirError, match="does not exist; train first"):
    trainer.evaluate(tiny_config(), str(missing))
  (tmp_path / "empty").mkdir()
  with pytest.raises(CheckpointNotFound, match="no checkpoint in"):
    trainer.evaluate(tiny_config(), str(tmp_path / "empty"))
  c = tiny_config(steps=1)
  c.init_from = str(missing)
  with pytest.raises(CheckpointNotFound, match="no such directory"):
    trainer.train(c, str(tmp_path / "run"), progress=False)
  assert not missing.exists() and not (tmp_path / "empty" / "checkpoints").exists()


def test_workdir_checks(tmp_path, monkeypatch):
  (tmp_path / "file").write_text("")
  with pytest.raises(WorkdirError, match="is a file; allowed: a directory"):
    trainer.train(tiny_config(steps=1), str(tmp_path / "file"), progress=False)
  trainer.train(tiny_config(steps=1), str(tmp_path / "run"), progress=False)
  real_access = os.access
  monkeypatch.setattr(os, "access", lambda path, mode: False if str(path).endswith("run") else real_access(path, mode))
  with pytest.raises(WorkdirError, match="is not writable"):  # before anything is computed
    trainer.evaluate(tiny_config(steps=1), str(tmp_path / "run"))


def test_a_data_position_of_other_data_is_refused(tmp_path):
  trainer.train(tiny_config(steps=2), str(tmp_path), progress=False)
  c = tiny_config(steps=4)
  c.data.seq_len = 24  # the same model, other sequences: the saved position means nothing for them
  with pytest.raises(CheckpointError, match=r"data position was taken over seq_len=16 but this run reads seq_len=24"):
    trainer.train(c, str(tmp_path), progress=False)


def test_nan_message_without_a_checkpoint(tmp_path, monkeypatch):
  from test_engine import wrap_train_step

  c = tiny_config(steps=4)
  c.checkpoint.every_steps = 100
  wrap_train_step(monkeypatch, lambda n, s: s.replace(params=jax.tree.map(lambda p: p * np.nan, s.params)))
  with pytest.raises(trainer.TrainingDivergedError, match=r"at step \d: .* No checkpoint was saved in .* before it"):
    trainer.train(c, str(tmp_path), progress=False)


def test_prepare_resolves_the_default_data_dir(tmp_path, monkeypatch):
  monkeypatch.setenv("ZOO_DATA_DIR", str(tmp_path))
  builder = builders.prepare("digits")  # no data_dir: the default, here $ZOO_DATA_DIR
  assert builder.info.splits["test"].num_examples == 297
  assert str(builder.data_dir).startswith(str(tmp_path))
