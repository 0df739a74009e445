"""The experiment tools: the run comparison table (`tools/compare_runs.py`), Duo-LLM route comparison
(`tools/duo_llm_compare.py`) and Read-ME expert extraction from a dense checkpoint (`tools/readme_extract.py`)."""

import json
import os
import re
import subprocess
import sys

import jax
import numpy as np
import pytest

from configs.duo_llm_router import get_config as get_duo_config
from test_engine import tiny_config
from test_engine_eval import save_init_checkpoint
from tools import compare_runs, duo_llm_compare
from zoo.engine.checkpoint import restore_variables
from zoo.engine.trainer import Experiment
from zoo.engine.writers import MetricsWriter, read_config
from zoo.models import build_model

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _write_run(workdir, config, records):
  writer = MetricsWriter(str(workdir))
  writer.write_config(config)
  for record in records:
    writer.write(record.pop("step"), record)
  writer.close()


def test_config_json_round_trips(tmp_path):
  config = tiny_config()
  MetricsWriter(str(tmp_path)).write_config(config)
  back = read_config(str(tmp_path))
  assert back.model.to_dict() == config.model.to_dict() and back.train.steps == config.train.steps
  with pytest.raises(FileNotFoundError, match="no config.json"):
    read_config(str(tmp_path / "missing"))


def test_compare_runs_table(tmp_path, capsys):
  config = tiny_config(steps=6)
  _write_run(
    tmp_path / "a",
    config,
    [
      {"step": 0, "eval_loss": 5.0},
      {"step": 3, "loss": 4.0},
      {"step": 3, "eval_loss": 3.5},
      {"step": 6, "loss": 3.0, "eval_loss": 2.5, "eval_bits_per_byte": 3.6, "eval_load_imbalance": [1.0, 2.0]},
    ],
  )
  row = compare_runs.summarize(str(tmp_path / "a"), ["load_imbalance"])
  model = build_model(config.model)
  tokens = 6 * 16 * 16  # steps x batch x seq_len
  assert row["params"] == model.num_params() == row["active_params"]
  assert row["steps"] == 6 and row["tokens"] == tokens
  assert row["train_flops"] == pytest.approx(model.train_flops_per_token(16) * tokens)
  assert row["eval_loss"] == 2.5 and row["eval_load_imbalance"] == 1.5
  assert row["eval_loss_by_step"] == {0: 5.0, 3: 3.5, 6: 2.5}
  compare_runs.main([str(tmp_path / "a"), "--every-eval"])
  table = capsys.readouterr().out.splitlines()
  assert table[0].startswith("| run | model | params") and table[0].endswith("| loss@3 | loss@6 |")
  assert table[2].startswith("| a | dense_lm |") and table[2].endswith("| 3.5000 | 2.5000 |")

  _write_run(tmp_path / "b", config, [{"step": 0, "eval_loss": 5.0}])
  with pytest.raises(SystemExit, match="no training or no evaluation record"):
    compare_runs.main([str(tmp_path / "b")])


def test_duo_llm_compare_rows(tmp_path):
  config = get_duo_config()
  config.model.update(num_layers=3, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32, small_mlp_dim=8)
  config.data.seq_len = 16
  config.train.batch_size = 8
  save_init_checkpoint(config, tmp_path)
  MetricsWriter(str(tmp_path)).write_config(config)
  rows, budget = duo_llm_compare.compare(str(tmp_path), batches=1, samples=4)
  assert budget == 1
  assert list(rows) == ["trained router", "oracle (best of 4)", "random routes", "all big", "all small", "all skip"]
  assert all(np.isfinite(loss) and loss > 0 for loss, _ in rows.values())
  assert rows["trained router"][1] <= 1 and rows["oracle (best of 4)"][1] == 1 and rows["all big"][1] == 3
  with pytest.raises(ValueError, match="needs a 'duo_llm' run"):
    os.makedirs(tmp_path / "dense")
    MetricsWriter(str(tmp_path / "dense")).write_config(tiny_config())
    duo_llm_compare.compare(str(tmp_path / "dense"))


def test_readme_extract_slices_the_dense_checkpoint(tmp_path):
  dims = dict(num_layers=2, embed_dim=16, num_heads=2, num_kv_heads=1, mlp_dim=32)
  dense_config = tiny_config()
  dense_config.model.update(**dims)
  dense_exp, dense_state = save_init_checkpoint(dense_config, tmp_path / "dense")
  MetricsWriter(str(tmp_path / "dense")).write_config(dense_config)
  overrides = [f"--config.model.{k}={v}" for k, v in dims.items()] + [
    "--config.model.router_mlp_dim=16",
    "--config.data.seq_len=16",
    "--config.train.batch_size=8",
    "--config.train.eval_batches=1",
    "--config.mesh.data=-1",
  ]
  command = [
    sys.executable,
    "tools/readme_extract.py",
    "--config",
    "configs/readme_moe.py",
    "--workdir",
    str(tmp_path / "out"),
    "--dense_workdir",
    str(tmp_path / "dense"),
    "--batches",
    "1",
  ]
  # One CPU device, where the suite forces 8: the extraction does not depend on the mesh, and compiles in less time.
  env = {**os.environ, "XLA_FLAGS": re.sub(r"device_count=\d+", "device_count=1", os.environ["XLA_FLAGS"])}
  done = subprocess.run(command + overrides, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert done.returncode == 0, done.stderr[-2000:]
  assert "| layer | shared | docs | modules | web | packages |" in done.stdout
  assert "validation loss: dense" in done.stdout

  config = read_config(str(tmp_path / "out"))
  exp = Experiment(config)
  params = restore_variables(str(tmp_path / "out"), exp.abstract_state()[0].variables())["params"]
  dense = jax.tree.map(np.asarray, dense_state.params)
  np.testing.assert_array_equal(params["embed"]["embedding"], dense["embed"]["embedding"])
  np.testing.assert_array_equal(params["router"]["embed"]["embedding"], dense["embed"]["embedding"])
  for i in range(2):
    moe, ffn = params[f"layers_{i}"]["ffn"], dense[f"layers_{i}"]["ffn"]
    np.testing.assert_array_equal(
      params[f"layers_{i}"]["attention"]["query"]["kernel"], dense[f"layers_{i}"]["attention"]["query"]["kernel"]
    )
    # Every real (non-padding) column of the shared and domain experts is a column of the dense FFN, and each
    # domain's kept neurons (shared + its expert) are half of them: 16 distinct columns.
    dense_up = np.asarray(ffn["up"]["kernel"]).T
    for e in range(4):
      cols = np.concatenate([np.asarray(moe["shared_up"]).T, np.asarray(moe["up"][e]).T])
      real = [c for c in cols if np.any(c)]
      assert len(real) == 16
      assert all(any(np.array_equal(c, d) for d in dense_up) for c in real)

  wider = [o for o in overrides if "embed_dim" not in o] + ["--config.model.embed_dim=32"]
  bad = subprocess.run(command + wider, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert bad.returncode == 2 and "embed_dim" in bad.stderr and "must match" in bad.stderr
  assert json.loads((tmp_path / "dense" / "config.json").read_text())["model"]["name"] == "dense_lm"
