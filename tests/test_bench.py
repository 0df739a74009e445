"""bench/gmm.py, the one command of the GPU benchmark, runs end to end at --small shapes (interpreted Triton
kernels)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_gmm_benchmark_small_with_tiling_sweep(tmp_path):
  # The interpreter runs a kernel's grid programs one by one, so the sweep uses few, large tiles: 64x64x64 still splits
  # k=128 in two and leaves a partial tile of n=96; 128x128x128 takes k in one tile.
  out = tmp_path / "gmm.md"
  subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "bench", "gmm.py"),
      "--small",
      "--implementations",
      "xla,interpret_gpu",
      "--tilings",
      "64x64x64,128x128x128",
      "--reps",
      "1",
      "--out",
      str(out),
    ],
    check=True,
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  rows = [line.split("|")[1:-1] for line in out.read_text().splitlines() if line.startswith("| ")]
  gmm_rows = [[c.strip() for c in r] for r in rows if len(r) == 8 and r[0].strip() != "case"]
  labels = {r[2] for r in gmm_rows}
  assert labels == {"xla", "interpret_gpu 64x64x64", "interpret_gpu 128x128x128"}
  assert len(gmm_rows) == 3 * 3 * 2  # cases x variants x (fwd, bwd)
  for r in gmm_rows:
    assert all(float(v) >= 0 for v in r[4:]), r
    if r[2] == "xla":
      assert float(r[7]) == 1.0  # ragged_dot against itself
  moe_rows = [[c.strip() for c in r] for r in rows if len(r) == 5 and r[0].strip() != "layer"]
  assert [r[1] for r in moe_rows] == ["xla", "interpret_gpu 64x64x64", "interpret_gpu 128x128x128"]
  assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in moe_rows)


def test_gmm_benchmark_rejects_a_bad_tiling():
  result = subprocess.run(
    [sys.executable, os.path.join(ROOT, "bench", "gmm.py"), "--small", "--tilings", "128x64"],
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  assert result.returncode != 0
  assert "TMxTKxTN" in result.stderr


def test_mor_decode_benchmark_small(tmp_path):
  plot = tmp_path / "occupancy.png"
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(ROOT, "bench", "mor_decode.py"),
      "--small",
      "--models",
      "vanilla,expert",
      "--plot",
      str(plot),
    ],
    check=True,
    capture_output=True,
    text=True,
    cwd=ROOT,
  )
  tables = result.stdout.split("\n\n")
  rows = [line.split("|")[1:-1] for line in tables[0].splitlines() if line.startswith("| ")]
  assert [r[0].strip() for r in rows[1:]] == ["vanilla (dense_lm)", "MoR expert, N_r=3, recursion-wise KV"]
  assert float(rows[1][4]) == 1.0 and float(rows[2][3]) > 0  # ratio of vanilla to itself; MoR's tokens/s
  # Prefill and decoding apart: one row per model and batch size, both rates measured.
  split = [[c.strip() for c in line.split("|")[1:-1]] for line in tables[1].splitlines() if line.startswith("| ")]
  assert [r[:2] for r in split[1:]] == [["vanilla (dense_lm)", "4"], ["MoR expert, N_r=3, recursion-wise KV", "4"]]
  assert all(float(r[2]) > 0 and float(r[3]) > 0 for r in split[1:])
  assert plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
