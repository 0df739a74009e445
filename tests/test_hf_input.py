"""Bad Hugging Face input and unsafe destinations: each gets one clear line naming the file, tensor or key, and no
conversion loses or mixes a user's files.

Covers the safetensors reader (the `safetensors` package: headers without tensor data, tensors read on access),
integer/bool tensors, index entries outside the model directory and missing shards, truncated or malformed files,
config.json that is not JSON or disagrees with the tensor headers, and tools/convert_hf.py (one `error:` line with
exit status 2; a non-empty OUT_DIR refused unless --overwrite, which replaces it whole; the source never touched).

Needs torch and transformers (the `hf` extra) to build the tiny models.
"""

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from zoo.checkpoints import (
  ConversionError,
  export_hf,
  hf,
  hf_model_config,
  hf_spec,
  hf_testing,
  load_hf_checkpoint,
  safetensors_io,
)
from zoo.checkpoints.safetensors_io import SafetensorsError
from zoo.engine.checkpoint import restore_params

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCRIPT = os.path.join(ROOT, "tools", "convert_hf.py")
INDEX = "model.safetensors.index.json"


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
  """A tiny random Llama directory (2 layers), never modified: tests alter copies."""
  directory = str(tmp_path_factory.mktemp("llama"))
  hf_testing.build("llama", directory)
  return directory


@pytest.fixture(scope="module")
def mixtral_zoo(tmp_path_factory):
  """(Hugging Face dir, zoo dir converted from it, model config, variables) of a tiny Mixtral."""
  root = tmp_path_factory.mktemp("mixtral")
  hf_testing.build("mixtral", str(root / "hf"))
  model_config = hf.convert_hf_to_orbax(str(root / "hf"), str(root / "zoo"))
  _, variables = load_hf_checkpoint(str(root / "hf"))
  return str(root / "hf"), str(root / "zoo"), model_config, variables


def _copy(directory, tmp_path, name="copy"):
  out = str(tmp_path / name)
  shutil.copytree(directory, out)
  return out


def _tensors(path):
  return {k: np.asarray(v) for k, v in safetensors_io.load_file(path).items()}


def _header(path):
  """(header dict, data bytes) of a safetensors file, read directly."""
  raw = open(path, "rb").read()
  (size,) = struct.unpack("<Q", raw[:8])
  return json.loads(raw[8 : 8 + size]), raw[8 + size :]


def _write_raw(path, header, data, header_bytes=None):
  blob = header_bytes if header_bytes is not None else json.dumps(header).encode()
  with open(path, "wb") as f:
    f.write(struct.pack("<Q", len(blob)) + blob + data)


def _digest(directory):
  """name -> sha256 of every file under `directory` (to show it was not modified)."""
  out = {}
  for root, _, files in os.walk(directory):
    for name in files:
      path = os.path.join(root, name)
      out[os.path.relpath(path, directory)] = hashlib.sha256(open(path, "rb").read()).hexdigest()
  return out


def _one_line(message):
  assert "\n" not in message.strip(), message
  return message


# ------------------------------------------------------------------------------------------ safetensors reading


def test_reader_is_the_safetensors_package_and_reads_headers_only(llama, tmp_path, monkeypatch):
  path = str(tmp_path / "t.safetensors")
  arrays = {
    "f32": np.arange(6, dtype=np.float32).reshape(2, 3),
    "bf16": np.ones((4,), ml_dtypes.bfloat16),
    "i64": np.arange(3, dtype=np.int64),
    "flag": np.array([True, False]),
    "u32": np.arange(2, dtype=np.uint32),
  }
  safetensors_io.save_file(arrays, path, metadata={"format": "pt"})
  assert sorted(os.listdir(tmp_path)) == ["t.safetensors"]  # the .partial file was renamed over the target
  theirs = safetensors.numpy.load_file(path)  # the package reads what we write, and we read what it writes
  safetensors.numpy.save_file(theirs, str(tmp_path / "theirs.safetensors"))
  ours = safetensors_io.load_file(str(tmp_path / "theirs.safetensors"))
  for name, array in arrays.items():
    assert ours[name].dtype == array.dtype and theirs[name].dtype == array.dtype, name
    np.testing.assert_array_equal(ours[name], array)
  assert ours.info("bf16") == (str(tmp_path / "theirs.safetensors"), "BF16", (4,))
  header, start = safetensors_io.read_header(path)
  assert header["f32"]["shape"] == [2, 3] and start == 8 + struct.unpack("<Q", open(path, "rb").read(8))[0]

  # a failed write leaves the old file as it was, and no .partial file
  before = open(path, "rb").read()
  with pytest.raises(SafetensorsError, match=r"tensor 'c' has dtype complex64"):
    safetensors_io.save_file({"c": np.zeros(2, np.complex64)}, path)
  assert open(path, "rb").read() == before and sorted(os.listdir(tmp_path)) == ["t.safetensors", "theirs.safetensors"]

  # checking a model directory reads the headers only: no tensor data
  def no_data(self, name):
    raise AssertionError(f"tensor {name} was read")

  monkeypatch.setattr(safetensors_io.Tensors, "__getitem__", no_data)
  checked = hf_spec.check_dir(llama)
  assert checked.arch.num_layers == 2 and checked.tensors.info("model.norm.weight").shape == (32,)
  assert hf_model_config("hf:" + llama).num_layers == 2


def test_integer_and_bool_tensors_are_never_cast(llama, tmp_path):
  directory = _copy(llama, tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensors = _tensors(path)
  tensors["model.norm.weight"] = np.arange(32, dtype=np.int64)
  tensors["model.layers.1.input_layernorm.weight"] = np.ones(32, np.bool_)
  safetensors_io.save_file(tensors, path)
  for load in (load_hf_checkpoint, hf_model_config):
    with pytest.raises(ConversionError) as info:
      load(directory)
    message = _one_line(str(info.value))
    assert f"model.norm.weight in {path}: I64" in message
    assert f"model.layers.1.input_layernorm.weight in {path}: BOOL" in message
    assert "allowed dtypes: F64, F32, F16, BF16" in message
  # arrays handed to the mapping directly are refused too
  arch = hf_spec.check_dir(llama).arch
  with pytest.raises(ConversionError, match=r"tensor model.norm.weight has dtype int64; integer and bool tensors"):
    hf_spec.hf_to_canonical(tensors, arch)


def _shard_outside(llama, tmp_path, entry):
  """A copy of `llama` whose index maps every tensor to `entry`; the weights are moved to tmp_path/outside."""
  directory = _copy(llama, tmp_path)
  os.makedirs(tmp_path / "outside", exist_ok=True)
  shutil.move(os.path.join(directory, "model.safetensors"), tmp_path / "outside" / "model.safetensors")
  names = list(safetensors_io.load_file(str(tmp_path / "outside" / "model.safetensors")))
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"metadata": {}, "weight_map": {name: entry for name in names}}, f)
  return directory


@pytest.mark.parametrize(
  "entry", ["../outside/model.safetensors", "ABSOLUTE", "sub/../../outside/model.safetensors", "config.json"]
)
def test_index_entries_outside_the_directory_are_refused(llama, tmp_path, entry):
  if entry == "ABSOLUTE":
    entry = str(tmp_path / "outside" / "model.safetensors")
  directory = _shard_outside(llama, tmp_path, entry)
  for load in (load_hf_checkpoint, hf_model_config):
    with pytest.raises(ConversionError) as info:
      load(directory)
    message = _one_line(str(info.value))
    assert os.path.join(directory, INDEX) in message and repr(entry) in message
    assert "allowed: a relative path" in message


def test_missing_shard_and_misplaced_tensor_are_named(llama, tmp_path):
  directory = _copy(llama, tmp_path)
  names = sorted(safetensors_io.load_file(os.path.join(directory, "model.safetensors")))
  weight_map = {name: "model.safetensors" for name in names}
  weight_map[names[0]] = "model-00002-of-00002.safetensors"
  with open(os.path.join(directory, INDEX), "w") as f:
    json.dump({"weight_map": weight_map}, f)
  with pytest.raises(ConversionError, match=r"'model-00002-of-00002.safetensors': that shard is missing from"):
    load_hf_checkpoint(directory)
  safetensors_io.save_file(
    {"other": np.zeros(2, np.float32)}, os.path.join(directory, "model-00002-of-00002.safetensors")
  )
  with pytest.raises(
    ConversionError,
    match=rf"weight_map places tensor '{names[0]}' in model-00002-of-00002"
    rf"\.safetensors, but it is in {directory}/model\.safetensors",
  ):
    hf_model_config(directory)


# ----------------------------------------------------------------------------------------- malformed files


def _damage(path, kind):
  """Damage the safetensors file `path`; returns the tensor the message must name (None: no tensor can be)."""
  header, data = _header(path)
  last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
  if kind == "truncated":
    _write_raw(path, header, data[:-10])
    return last
  if kind == "header_not_json":
    _write_raw(path, None, data, header_bytes=b"{not json" + b" " * 7)
    return None
  if kind == "header_truncated":
    with open(path, "r+b") as f:
      f.truncate(30)
    return None
  if kind == "byte_size":
    header[last]["shape"] = [header[last]["shape"][0] + 1, *header[last]["shape"][1:]]
    _write_raw(path, header, data)
    return last
  if kind == "unknown_dtype":
    header[last]["dtype"] = "Q99"
    _write_raw(path, header, data)
    return last
  if kind == "bad_entry":
    header[last]["shape"] = "x"
    _write_raw(path, header, data)
    return last
  raise ValueError(kind)


@pytest.mark.parametrize(
  "kind", ["truncated", "header_not_json", "header_truncated", "byte_size", "unknown_dtype", "bad_entry"]
)
def test_malformed_files_name_the_file_and_tensor(llama, tmp_path, kind):
  directory = _copy(llama, tmp_path)
  path = os.path.join(directory, "model.safetensors")
  tensor = _damage(path, kind)
  for load in (hf_model_config, load_hf_checkpoint):
    with pytest.raises(SafetensorsError) as info:
      load(directory)
    assert isinstance(info.value, ConversionError)
    message = _one_line(str(info.value))
    assert message.startswith(f"{path}: ")
    if tensor is not None:
      assert repr(tensor) in message
  expected = {
    "truncated": "the file is truncated",
    "header_not_json": "the header is not valid JSON",
    "header_truncated": "the file is truncated",
    "byte_size": "needs",
    "unknown_dtype": "dtype 'Q99'; allowed",
    "bad_entry": "allowed: a list",
  }
  assert expected[kind] in message


def test_shapes_that_disagree_with_config_name_key_file_and_tensor(llama, tmp_path):
  directory = _copy(llama, tmp_path)
  path = os.path.join(directory, "model.safetensors")
  config = json.load(open(os.path.join(directory, "config.json")))
  json.dump({**config, "hidden_size": 64}, open(os.path.join(directory, "config.json"), "w"))
  with pytest.raises(ConversionError) as info:
    hf_model_config(directory)
  message = _one_line(str(info.value))
  assert f"hidden_size=64 gives 64 but model.embed_tokens.weight in {path} has shape (96, 32) (axis 1)" in message
  # one impossible tensor shape: named with its file
  json.dump(config, open(os.path.join(directory, "config.json"), "w"))
  tensors = _tensors(path)
  tensors["model.layers.1.mlp.down_proj.weight"] = np.zeros((32, 47), np.float32)
  safetensors_io.save_file(tensors, path)
  with pytest.raises(ConversionError) as info:
    load_hf_checkpoint(directory)
  assert f"model.layers.1.mlp.down_proj.weight: expected (32, 48), found (32, 47) ({path})" in _one_line(
    str(info.value)
  )


# ------------------------------------------------------------------------------------------------- config.json


def test_config_json_that_is_not_json_is_named(llama, tmp_path):
  directory = _copy(llama, tmp_path)
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write('{"model_type": "llama",')
  with pytest.raises(ConversionError, match=rf"^{os.path.join(directory, 'config.json')}: not valid JSON"):
    hf_model_config(directory)
  with open(os.path.join(directory, "config.json"), "w") as f:
    f.write("[1, 2]")
  with pytest.raises(ConversionError, match=r"config.json: a JSON list, not an object of settings"):
    load_hf_checkpoint(directory)


@pytest.mark.parametrize(
  "key,value,expected",
  [
    (
      "num_hidden_layers",
      10**6,
      r"num_hidden_layers=1000000 disagrees with the checkpoint, whose tensors hold "
      r"layers 0 to 1 \(model\.layers\.0\..* \.\.\. model\.layers\.1\..*model.safetensors",
    ),
    ("num_hidden_layers", 3, r"num_hidden_layers=3 disagrees .* layers 0 to 1"),
    ("hidden_size", "32", r"config.json hidden_size='32' is not a valid size; allowed: an integer from 1"),
    ("num_attention_heads", 0, r"config.json num_attention_heads=0 is not a valid size"),
    ("vocab_size", 10**12, r"config.json vocab_size=1000000000000 is not a valid size"),
    ("intermediate_size", None, r"config.json has no 'intermediate_size'"),
    ("num_key_value_heads", 3, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("rms_norm_eps", "small", r"config.json rms_norm_eps='small' is not valid"),
  ],
)
def test_absurd_config_sizes_are_refused_before_any_model_is_built(llama, tmp_path, key, value, expected):
  directory = _copy(llama, tmp_path)
  config = json.load(open(os.path.join(directory, "config.json")))
  if value is None:
    del config[key]
  else:
    config[key] = value
  json.dump(config, open(os.path.join(directory, "config.json"), "w"))
  start = time.perf_counter()
  with pytest.raises(ConversionError, match=expected) as info:
    hf_model_config(directory)
  assert time.perf_counter() - start < 5
  _one_line(str(info.value))


@pytest.mark.parametrize(
  "key,value", [("sliding_window", 0), ("sliding_window", None), ("head_dim", None), ("rms_norm_eps", 1)]
)
def test_valid_config_edge_values_are_accepted(llama, tmp_path, key, value):
  directory = _copy(llama, tmp_path)
  config = json.load(open(os.path.join(directory, "config.json")))
  json.dump({**config, key: value}, open(os.path.join(directory, "config.json"), "w"))
  assert hf_model_config(directory).num_layers == 2


def test_experts_count_disagreeing_with_the_tensors_is_named(mixtral_zoo, tmp_path):
  directory = _copy(mixtral_zoo[0], tmp_path)
  config = json.load(open(os.path.join(directory, "config.json")))
  json.dump({**config, "num_local_experts": 10**5}, open(os.path.join(directory, "config.json"), "w"))
  with pytest.raises(
    ConversionError,
    match=r"num_local_experts=100000 disagrees with the checkpoint, whose tensors "
    r"hold experts 0 to 3 \(model\.layers\.\d\.block_sparse_moe\.experts\.3",
  ):
    hf_model_config(directory)
  json.dump({**config, "num_experts_per_tok": 5}, open(os.path.join(directory, "config.json"), "w"))
  with pytest.raises(ConversionError, match=r"config.json num_experts_per_tok=5 exceeds the 4 experts"):
    hf_model_config(directory)


# ---------------------------------------------------------------------------------------------- destinations


def test_write_dir_failure_keeps_the_old_directory(tmp_path):
  out = tmp_path / "out"
  out.mkdir()
  (out / "old.txt").write_text("old")

  def failing(directory):
    open(os.path.join(directory, "half.bin"), "wb").write(b"x")
    raise RuntimeError("disk full")

  with pytest.raises(RuntimeError, match="disk full"):
    hf.write_dir(str(out), failing, overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["old.txt"]
  with pytest.raises(
    ConversionError,
    match=r"output directory .*out is not empty; allowed: a new or empty "
    r"directory, or pass overwrite=True to replace it whole",
  ):
    hf.write_dir(str(out), lambda d: None)
  hf.write_dir(str(out), lambda d: open(os.path.join(d, "new.txt"), "w").write("new"), overwrite=True)
  assert sorted(os.listdir(tmp_path)) == ["out"] and os.listdir(out) == ["new.txt"]


def test_export_refuses_a_directory_with_old_shards(mixtral_zoo, tmp_path):
  src, _, model_config, variables = mixtral_zoo
  out = _copy(src, tmp_path, "old")  # an older export: config.json + model.safetensors
  before = _digest(out)
  with pytest.raises(ConversionError, match=r"is not empty"):
    export_hf(model_config, variables, out, "mixtral")
  assert _digest(out) == before


# -------------------------------------------------------------------------------------------------------- CLI


def _cli(*args):
  """(exit status, stderr) of tools/convert_hf.py run as a script."""
  done = subprocess.run(
    [sys.executable, "tools/convert_hf.py", *args],
    cwd=ROOT,
    capture_output=True,
    text=True,
    env={**os.environ, "JAX_PLATFORMS": "cpu"},
    timeout=600,
  )
  return done.returncode, done.stderr


def _assert_error(result, *needles):
  code, stderr = result
  assert code == 2, stderr[-3000:]
  lines = stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  for needle in needles:
    assert needle in lines[0], (needle, lines[0])


def test_cli_refuses_non_empty_destinations(llama, mixtral_zoo, tmp_path):
  workdir = tmp_path / "run"
  (workdir / "checkpoints").mkdir(parents=True)
  (workdir / "metrics.jsonl").write_text("{}\n")
  before = _digest(workdir)
  _assert_error(_cli("to-zoo", llama, str(workdir)), f"output directory {workdir} is not empty", "--overwrite")
  old_hf = _copy(mixtral_zoo[0], tmp_path, "old_hf")
  before_hf = _digest(old_hf)
  _assert_error(
    _cli("to-hf", mixtral_zoo[1], old_hf, "--family", "mixtral"),
    f"output directory {old_hf} is not empty",
    "--overwrite",
  )
  assert _digest(workdir) == before and _digest(old_hf) == before_hf


def test_cli_overwrite_replaces_the_destination_whole(llama, mixtral_zoo, tmp_path):
  other = str(tmp_path / "other")
  hf_testing.build("llama", other, seed=1)
  out = str(tmp_path / "zoo")
  hf.convert_hf_to_orbax(llama, out)
  (tmp_path / "zoo" / "stale.txt").write_text("from an older run")
  code, stderr = _cli("to-zoo", other, out, "--overwrite")
  assert code == 0, stderr[-3000:]
  assert sorted(os.listdir(tmp_path)) == ["other", "zoo"] and "stale.txt" not in os.listdir(out)
  _, expected = load_hf_checkpoint(other)
  restored = restore_params(out, jax.tree.map(np.zeros_like, expected["params"]))
  jax.tree.map(np.testing.assert_array_equal, restored, expected["params"])

  # to-hf over an older sharded export: the old shards and index go, so the loader reads the new model
  src, zoo_dir, model_config, variables = mixtral_zoo
  hf_out = tmp_path / "hf"
  hf_out.mkdir()
  tensors = _tensors(os.path.join(src, "model.safetensors"))
  names = sorted(tensors)
  half = len(names) // 2
  zeros = {n: np.zeros_like(tensors[n]) for n in names}
  safetensors_io.save_file({n: zeros[n] for n in names[:half]}, str(hf_out / "model-00001-of-00002.safetensors"))
  safetensors_io.save_file({n: zeros[n] for n in names[half:]}, str(hf_out / "model-00002-of-00002.safetensors"))
  json.dump(
    {"weight_map": {n: f"model-0000{1 + (i >= half)}-of-00002.safetensors" for i, n in enumerate(names)}},
    open(hf_out / INDEX, "w"),
  )
  shutil.copy(os.path.join(src, "config.json"), hf_out / "config.json")
  code, stderr = _cli("to-hf", zoo_dir, str(hf_out), "--family", "mixtral", "--overwrite")
  assert code == 0, stderr[-3000:]
  assert sorted(os.listdir(hf_out)) == ["config.json", "model.safetensors"]
  assert sorted(os.listdir(tmp_path)) == ["hf", "other", "zoo"]
  _, loaded = load_hf_checkpoint(str(hf_out))
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), np.asarray(b)), loaded, variables)


def test_cli_never_writes_into_or_over_its_source(llama, mixtral_zoo, tmp_path):
  src = _copy(llama, tmp_path, "models/llama")
  before = _digest(str(tmp_path / "models"))
  _assert_error(_cli("to-zoo", src, src, "--overwrite"), f"output directory {src} is the source")
  _assert_error(_cli("to-zoo", src, os.path.join(src, "zoo"), "--overwrite"), "is inside the source")
  _assert_error(_cli("to-zoo", src, str(tmp_path / "models"), "--overwrite"), "contains the source")
  zoo_dir = mixtral_zoo[1]
  zoo_before = _digest(zoo_dir)
  _assert_error(_cli("to-hf", zoo_dir, os.path.join(zoo_dir, "hf"), "--family", "mixtral"), "is inside the source")
  assert _digest(str(tmp_path / "models")) == before and _digest(zoo_dir) == zoo_before


def _bad_input(kind, tmp_path, llama, mixtral_zoo):
  """(argv, text the error line must hold) for one kind of bad input."""
  out = str(tmp_path / "out")
  if kind == "missing_source":
    return ["to-zoo", str(tmp_path / "nope"), out], f"HF_DIR {tmp_path / 'nope'} does not exist"
  if kind == "no_config":
    (tmp_path / "empty").mkdir()
    return ["to-zoo", str(tmp_path / "empty"), out], "has no config.json"
  if kind == "unsupported":
    directory = _copy(llama, tmp_path)
    json.dump({"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"]}, open(f"{directory}/config.json", "w"))
    return ["to-zoo", directory, out], "unsupported architecture: model_type='gpt2'"
  if kind == "malformed_safetensors":
    directory = _copy(llama, tmp_path)
    tensor = _damage(os.path.join(directory, "model.safetensors"), "truncated")
    return ["to-zoo", directory, out], f"tensor {tensor!r} ends at byte"
  if kind == "no_checkpoint":
    (tmp_path / "run").mkdir()
    shutil.copy(os.path.join(mixtral_zoo[1], "zoo_config.json"), tmp_path / "run")
    return ["to-hf", str(tmp_path / "run"), out, "--family", "mixtral"], "no checkpoint in"
  if kind == "bad_model_config":
    (tmp_path / "model.json").write_text("{name: moe_lm}")
    return (
      ["to-hf", mixtral_zoo[1], out, "--family", "mixtral", "--model-config", str(tmp_path / "model.json")],
      "model.json is not valid JSON",
    )
  if kind == "wrong_model_config":
    config = dict(mixtral_zoo[2].to_dict(), embed_dim=64)
    json.dump(config, open(tmp_path / "model.json", "w"))
    return (
      ["to-hf", mixtral_zoo[1], out, "--family", "mixtral", "--model-config", str(tmp_path / "model.json")],
      "does not fit the model config: variable ['params']['embed']['embedding'] has shape (96, 32), the config "
      "gives (96, 64)",
    )
  if kind == "unknown_option":
    return ["to-zoo", llama, out, "--force"], "unrecognized arguments: --force"
  raise ValueError(kind)


@pytest.mark.parametrize(
  "kind",
  [
    "missing_source",
    "no_config",
    "unsupported",
    "malformed_safetensors",
    "no_checkpoint",
    "bad_model_config",
    "wrong_model_config",
    "unknown_option",
  ],
)
def test_cli_errors_are_one_line_with_status_2(kind, llama, mixtral_zoo, tmp_path):
  argv, needle = _bad_input(kind, tmp_path, llama, mixtral_zoo)
  zoo_before = _digest(mixtral_zoo[1])
  _assert_error(_cli(*argv), needle)
  assert not os.path.exists(tmp_path / "out") and _digest(mixtral_zoo[1]) == zoo_before
  assert not [name for name in os.listdir(tmp_path) if name.startswith(".out.")]  # no temporary directory left


def test_cli_imports_the_installed_package(tmp_path):
  assert "sys.path" not in open(SCRIPT).read()
  done = subprocess.run(
    [sys.executable, SCRIPT, "to-zoo", "--help"], cwd=str(tmp_path), capture_output=True, text=True, timeout=600
  )
  assert done.returncode == 0 and "--overwrite" in done.stdout, done.stderr
