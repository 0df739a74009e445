"""Bad Hugging Face input: each gets one clear line naming the file, tensor or key.

Covers the safetensors reader (the `safetensors` package: headers without tensor data, tensors read on access),
integer/bool tensors, index entries outside the model directory and missing shards, truncated or malformed files,
and config.json that is not JSON or disagrees with the tensor headers.

Needs torch and transformers (the `hf` extra) to build the tiny models.
"""
import hashlib
import json
import os
import shutil
import struct
import time

import jax
import ml_dtypes
import numpy as np
import pytest
import safetensors.numpy

from zoo.checkpoints import ConversionError, hf, hf_model_config, hf_spec, hf_testing, load_hf_checkpoint
from zoo.checkpoints import safetensors_io
from zoo.checkpoints.safetensors_io import SafetensorsError

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
  return json.loads(raw[8:8 + size]), raw[8 + size:]


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
  arrays = {"f32": np.arange(6, dtype=np.float32).reshape(2, 3), "bf16": np.ones((4,), ml_dtypes.bfloat16),
            "i64": np.arange(3, dtype=np.int64), "flag": np.array([True, False]), "u32": np.arange(2, dtype=np.uint32)}
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


@pytest.mark.parametrize("entry", ["../outside/model.safetensors", "ABSOLUTE", "sub/../../outside/model.safetensors",
                                   "config.json"])
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
  safetensors_io.save_file({"other": np.zeros(2, np.float32)},
                            os.path.join(directory, "model-00002-of-00002.safetensors"))
  with pytest.raises(ConversionError, match=rf"weight_map places tensor '{names[0]}' in model-00002-of-00002"
                                            rf"\.safetensors, but it is in {directory}/model\.safetensors"):
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
  if kind == "bad_entry":
    header[last]["shape"] = "x"
    _write_raw(path, header, data)
    return last
  raise ValueError(kind)


@pytest.mark.parametrize("kind", ["truncated", "header_not_json", "header_truncated", "byte_size", "bad_entry"])
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
  expected = {"truncated": "the file is truncated", "header_not_json": "the header is not valid JSON",
              "header_truncated": "the file is truncated", "byte_size": "needs", "bad_entry": "allowed: a list"}
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
      str(info.value))


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


@pytest.mark.parametrize("key,value,expected", [
    ("num_hidden_layers", 10**6, r"num_hidden_layers=1000000 disagrees with the checkpoint, whose tensors hold "
                                 r"layers 0 to 1 \(model\.layers\.0\..* \.\.\. model\.layers\.1\..*model.safetensors"),
    ("num_hidden_layers", 3, r"num_hidden_layers=3 disagrees .* layers 0 to 1"),
    ("hidden_size", "32", r"config.json hidden_size='32' is not a valid size; allowed: an integer from 1"),
    ("num_attention_heads", 0, r"config.json num_attention_heads=0 is not a valid size"),
    ("vocab_size", 10**12, r"config.json vocab_size=1000000000000 is not a valid size"),
    ("intermediate_size", None, r"config.json has no 'intermediate_size'"),
    ("num_key_value_heads", 3, r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
    ("rms_norm_eps", "small", r"config.json rms_norm_eps='small' is not valid"),
])
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


def test_experts_count_disagreeing_with_the_tensors_is_named(mixtral_zoo, tmp_path):
  directory = _copy(mixtral_zoo[0], tmp_path)
  config = json.load(open(os.path.join(directory, "config.json")))
  json.dump({**config, "num_local_experts": 10**5}, open(os.path.join(directory, "config.json"), "w"))
  with pytest.raises(ConversionError, match=r"num_local_experts=100000 disagrees with the checkpoint, whose tensors "
                                            r"hold experts 0 to 3 \(model\.layers\.\d\.block_sparse_moe\.experts\.3"):
    hf_model_config(directory)
