"""bench/cpu_train_step.py, the CPU train step of the zoo against plain JAX and transformers + PyTorch, runs end to end
at --small shapes with its profile: a table row per (model, implementation), the same initial loss from the same
weights, a jax trace, and the per-op category summary."""

import glob
import math
import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODELS = ("dense", "moe")
IMPLEMENTATIONS = ("zoo", "jax_minimal", "torch")
CATEGORIES = (
  "matmul (dot)",
  "attention dots (QK^T, PV)",
  "attention softmax/masking",
  "RoPE",
  "norms",
  "optimizer update",
  "copies/transposes",
  "MoE dispatch (router, gather/scatter/sort)",
  "other (embedding, loss, activations, adds)",
)


def _cells(text, first_header):
  """Rows (lists of stripped cells) of the markdown table whose header starts with `first_header`."""
  block = text[text.index(f"| {first_header} |") :].split("\n\n")[0]
  return [[c.strip() for c in line.split("|")[1:-1]] for line in block.splitlines()[2:] if line.startswith("| ")]


def _number(cell):
  value = float(re.match(r"[\d,.]+", cell).group(0).replace(",", ""))
  assert math.isfinite(value) and value > 0, cell
  return value


def test_cpu_train_step_benchmark_small_with_profile(tmp_path):
  # One CPU device, where the suite forces 8: the benchmark runs every step on one device.
  env = {**os.environ, "XLA_FLAGS": re.sub(r"device_count=\d+", "device_count=1", os.environ.get("XLA_FLAGS", ""))}
  command = [sys.executable, "bench/cpu_train_step.py", "--small", "--models", ",".join(MODELS)]
  done = subprocess.run(
    [*command, "--profile", str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0, done.stderr[-3000:]
  out = done.stdout

  rows = _cells(out, "model")
  assert [(r[0], r[1]) for r in rows] == [(m, i) for m in MODELS for i in IMPLEMENTATIONS]
  for r in rows:
    _, step_ms, tokens_per_s, _, _, _ = (_number(c) for c in r[2:])
    assert tokens_per_s == pytest.approx(2 * 16 / (step_ms / 1e3), rel=0.05)  # --small: 2 x 16 tokens
    if r[1] == "torch":
      assert r[5] == r[7] == "1.00x"
  for m in MODELS:
    assert len({r[2] for r in rows if r[0] == m}) == 1  # the same parameter count in all three

  # Same weights and batch: the same initial cross-entropy (the MoE: zoo and jax_minimal share the capacity dispatch,
  # torch drops nothing, so it may differ by the few dropped assignments).
  for m in MODELS:
    line = next(line for line in out.splitlines() if line.startswith(f"{m}: initial cross-entropy"))
    losses = {k: float(v) for k, v in re.findall(r"(zoo|jax_minimal|torch) ([\d.]+)", line)}
    assert abs(losses["zoo"] - losses["jax_minimal"]) < 1e-4, line
    assert abs(losses["zoo"] - losses["torch"]) < (1e-4 if m == "dense" else 0.05), line

  for m in MODELS:
    assert glob.glob(str(tmp_path / f"{m}_jax" / "**" / "*.xplane.pb"), recursive=True)
    assert (tmp_path / f"{m}_zoo.hlo.txt").read_text().startswith("HloModule jit_step")
    assert (tmp_path / f"{m}_torch_trace.json").stat().st_size > 0
    section = out[out.index(f"### Profile: {m},") :]
    categories = _cells(section, "category")
    assert [r[0] for r in categories[: len(CATEGORIES)]] == list(CATEGORIES)
    totals = next(r for r in categories if r[0] == "**all ops (sum of op times)**")
    assert all(_number(totals[1 + 2 * i]) > 0 for i in range(len(IMPLEMENTATIONS)))  # op times read for each
    matmul = categories[0]
    assert all(_number(matmul[1 + 2 * i]) > 0 for i in range(len(IMPLEMENTATIONS)))
    assert "Top ops, zoo (HLO op)" in section and "Self CPU time total" in section
    census = {r[0]: r[1:] for r in _cells(section, "optimized HLO")}
    assert all(float(v) > 0 for v in census["matmul GFLOP"]) and all(int(v) > 0 for v in census["dot"])
  moe = out[out.index("### Profile: moe,") :]
  dispatch = next(r for r in _cells(moe, "category") if r[0].startswith("MoE dispatch"))
  assert _number(dispatch[1]) > 0 and _number(dispatch[3]) > 0  # the zoo's and the minimal model's dispatch ops
