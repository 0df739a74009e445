"""train.py / evaluate.py as a user runs them: one-line errors with exit code 2, resume, JSON last line."""

import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = [
  "--config=configs/dense_lm.py",
  "--config.model.num_layers=1",
  "--config.model.embed_dim=32",
  "--config.model.num_heads=2",
  "--config.model.num_kv_heads=1",
  "--config.model.mlp_dim=64",
  "--config.data.seq_len=16",
  "--config.train.batch_size=16",
  "--config.train.eval_batches=2",
  "--config.train.eval_every_steps=0",
  "--config.train.log_every_steps=2",
  "--config.checkpoint.every_steps=2",
  "--config.sample.max_new_tokens=8",
  "--config.optimizer.schedule=constant",
  "--config.optimizer.warmup_steps=1",
]
# A constant learning rate after a warmup shorter than any run: the train step does not depend on train.steps, so
# the runs of this file compile the same programs and all but the first read them from the compilation cache.


# One CPU device, as on a user's machine, where the suite forces 8 (the mesh is tested in-process and in
# test_multihost.py): the programs compile and run in less time.
ENV = {**os.environ, "XLA_FLAGS": re.sub(r"device_count=\d+", "device_count=1", os.environ["XLA_FLAGS"])}


def run(script, *args):
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize(
  "override, words",
  [
    ("--config.train.stepz=3", ["stepz"]),
    ("--config.model.name=nope", ["config.model.name='nope'", "choose one of"]),
    ("--config.mesh.fsdp=3", ["config.mesh"]),
  ],
)
def test_bad_config_is_one_line_and_exit_code_2(tmp_path, override, words):
  result = run("train.py", *TINY, f"--workdir={tmp_path}", override)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  last = result.stderr.strip().splitlines()[-1]
  assert last.startswith("error: ")
  for word in words:
    assert word in last, last


def test_train_resume_and_evaluate(tmp_path):
  first = run("train.py", *TINY, f"--workdir={tmp_path}", "--config.train.steps=4")
  assert first.returncode == 0, first.stderr[-3000:]
  second = run("train.py", *TINY, f"--workdir={tmp_path}", "--config.train.steps=6")
  assert second.returncode == 0, second.stderr[-3000:]
  assert "resumed from checkpoint step 4" in second.stdout
  records = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert [r["step"] for r in records] == [2, 4, 6]
  assert "eval_loss" in records[1] and "eval_loss" in records[2]  # each run evaluates at its last step
  result = run("evaluate.py", *TINY, f"--workdir={tmp_path}")
  assert result.returncode == 0, result.stderr[-3000:]
  last = json.loads(result.stdout.strip().splitlines()[-1])
  assert last["step"] == 6
  for key in ("loss", "perplexity", "bits_per_byte"):
    assert last[key] > 0
  assert isinstance(last["sample"], str) and last["sample"].startswith("def ")
  assert json.load(open(tmp_path / "eval_6.json")) == last
  older = run("evaluate.py", *TINY, f"--workdir={tmp_path}", "--step=4")
  assert json.loads(older.stdout.strip().splitlines()[-1])["step"] == 4
  missing = run("evaluate.py", *TINY, f"--workdir={tmp_path}", "--step=3")
  assert missing.returncode == 2 and "checkpoint step 3" in missing.stderr.strip().splitlines()[-1]


def _one_error_line(result):
  lines = [line for line in result.stderr.splitlines() if line.strip()]
  assert result.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize(
  "content, words",
  [
    (None, ["does not exist"]),
    ("x = (\n", ["line 1", "SyntaxError"]),
    ("def get_config():\n  return {'a': 1}\n", ["returned a dict", "ConfigDict"]),
    ("import nonexistent_module_xyz\ndef get_config():\n  pass\n", ["ModuleNotFoundError", "nonexistent_module_xyz"]),
    ("x = 1\n", ["defines no get_config()"]),
    ("dir", ["is not a file"]),
    ("txt", ["is not a .py file"]),
  ],
)
def test_bad_config_files_are_one_line(tmp_path, content, words):
  path = tmp_path / "config.py"
  if content == "dir":
    path.mkdir()
  elif content == "txt":
    path = tmp_path / "config.txt"
    path.write_text("hello\n")
  elif content is not None:
    path.write_text(content)
  line = _one_error_line(run("train.py", f"--config={path}", f"--workdir={tmp_path / 'w'}"))
  for word in words:
    assert word in line, line
  assert not (tmp_path / "w").exists()


def test_workdir_that_is_a_file_is_one_line(tmp_path):
  (tmp_path / "f").write_text("")
  line = _one_error_line(run("train.py", *TINY, f"--workdir={tmp_path / 'f'}", "--config.train.steps=2"))
  assert "is a file" in line


def test_a_second_process_is_refused_and_a_killed_one_leaves_no_stale_lock(tmp_path):
  first = subprocess.Popen(
    [
      sys.executable,
      "train.py",
      *TINY,
      f"--workdir={tmp_path}",
      "--config.train.steps=100000",
      "--config.checkpoint.every_steps=10",
    ],
    cwd=ROOT,
    env=ENV,
    stdout=subprocess.DEVNULL,
    stderr=subprocess.DEVNULL,
  )
  try:
    lock = tmp_path / ".lock"
    for _ in range(600):  # until the first run holds the workdir and has saved once
      if lock.exists() and lock.read_text() and (tmp_path / "checkpoints" / "10").is_dir():
        break
      time.sleep(0.1)
    assert first.poll() is None
    first.send_signal(signal.SIGSTOP)  # it keeps the lock (and the workdir) without training on meanwhile
    line = _one_error_line(run("train.py", *TINY, f"--workdir={tmp_path}", "--config.train.steps=20"))
    assert f"pid {first.pid}" in line and "one train.py per workdir" in line
  finally:
    first.kill()  # kill -9 (a stopped process dies too): the lock goes with the process
    first.wait()
  third = run("train.py", *TINY, f"--workdir={tmp_path}", "--config.train.steps=1")
  assert third.returncode == 0, third.stderr[-3000:]
  assert "resumed from checkpoint step" in third.stdout
