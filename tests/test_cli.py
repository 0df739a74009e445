"""train.py / evaluate.py as a user runs them: one-line errors with exit code 2, resume, JSON last line."""
import json
import os
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--config=configs/dense_lm.py", "--config.model.num_layers=1", "--config.model.embed_dim=32",
        "--config.model.num_heads=2", "--config.model.num_kv_heads=1", "--config.model.mlp_dim=64",
        "--config.data.seq_len=16", "--config.train.batch_size=16", "--config.train.eval_batches=2",
        "--config.train.eval_every_steps=0", "--config.train.log_every_steps=2", "--config.checkpoint.every_steps=2",
        "--config.sample.max_new_tokens=8"]


def run(script, *args):
  return subprocess.run([sys.executable, script, *args], cwd=ROOT, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("override, words", [
    ("--config.train.stepz=3", ["stepz"]),
    ("--config.model.name=nope", ["config.model.name='nope'", "choose one of"]),
    ("--config.mesh.fsdp=3", ["config.mesh"]),
])
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
