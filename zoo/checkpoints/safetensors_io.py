"""Reading and writing safetensors files with numpy only (no pickle, no torch).

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header size N, N bytes of
JSON mapping each tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets into the byte buffer that
follows the header) plus an optional `__metadata__` dict of strings, then the buffer. Tensors are memory-mapped, so a
large checkpoint is read one tensor at a time. bfloat16 and float8 tensors come back as `ml_dtypes` arrays (the
dtypes jax itself uses).
"""
import json
import os
import struct

import ml_dtypes
import numpy as np

DTYPES = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "F8_E4M3": np.dtype(ml_dtypes.float8_e4m3fn),
    "F8_E5M2": np.dtype(ml_dtypes.float8_e5m2), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
_NAMES = {dtype: name for name, dtype in DTYPES.items()}
INDEX_FILE = "model.safetensors.index.json"


class SafetensorsError(ValueError):
  """A safetensors file or directory is malformed; the message names the file."""


def read_header(path):
  """The JSON header of one file: (dict name -> {dtype, shape, data_offsets}, byte offset of the buffer)."""
  with open(path, "rb") as f:
    raw = f.read(8)
    if len(raw) != 8:
      raise SafetensorsError(f"{path}: too short to be a safetensors file")
    (size,) = struct.unpack("<Q", raw)
    if size > os.path.getsize(path) - 8:
      raise SafetensorsError(f"{path}: header size {size} exceeds the file size")
    header = json.loads(f.read(size))
  header.pop("__metadata__", None)
  return header, 8 + size


def load_file(path):
  """All tensors of one file as read-only memory-mapped numpy arrays: dict name -> array."""
  header, start = read_header(path)
  buffer = np.memmap(path, dtype=np.uint8, mode="r")
  tensors = {}
  for name, info in header.items():
    if info["dtype"] not in DTYPES:
      raise SafetensorsError(f"{path}: tensor {name!r} has dtype {info['dtype']}; supported: {sorted(DTYPES)}")
    begin, end = info["data_offsets"]
    dtype = DTYPES[info["dtype"]]
    shape = tuple(info["shape"])
    if end - begin != dtype.itemsize * int(np.prod(shape, dtype=np.int64)):
      raise SafetensorsError(f"{path}: tensor {name!r} of shape {shape} {info['dtype']} has {end - begin} bytes")
    tensors[name] = buffer[start + begin:start + end].view(dtype).reshape(shape)
  return tensors


def load_dir(directory):
  """Every tensor of a Hugging Face model directory: `model.safetensors`, or the shards named by
  `model.safetensors.index.json`, or else every `*.safetensors` file. Returns dict name -> array."""
  index = os.path.join(directory, INDEX_FILE)
  if os.path.exists(index):
    with open(index) as f:
      files = sorted(set(json.load(f)["weight_map"].values()))
  else:
    files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
  if not files:
    raise SafetensorsError(f"{directory}: no *.safetensors files (weights stored as pickle/.bin are not read; "
                           "convert them to safetensors first)")
  tensors = {}
  for name in files:
    for key, value in load_file(os.path.join(directory, name)).items():
      if key in tensors:
        raise SafetensorsError(f"{directory}: tensor {key!r} appears in more than one file (second: {name})")
      tensors[key] = value
  return tensors


def save_file(tensors, path, metadata=None):
  """Write dict name -> numpy array as one safetensors file (names sorted, buffer 8-byte aligned).

  The file is written beside `path` and renamed over it, so arrays still memory-mapped from an old `path` stay
  valid.
  """
  header, offset, arrays = {}, 0, []
  for name in sorted(tensors):
    array = np.ascontiguousarray(tensors[name])
    if array.dtype not in _NAMES:
      raise SafetensorsError(f"tensor {name!r} has dtype {array.dtype}; supported: {sorted(map(str, _NAMES))}")
    header[name] = {"dtype": _NAMES[array.dtype], "shape": list(array.shape),
                    "data_offsets": [offset, offset + array.nbytes]}
    offset += array.nbytes
    arrays.append(array)
  if metadata:
    header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
  blob = json.dumps(header, separators=(",", ":")).encode()
  blob += b" " * (-len(blob) % 8)
  partial = f"{path}.partial"
  with open(partial, "wb") as f:
    f.write(struct.pack("<Q", len(blob)))
    f.write(blob)
    for array in arrays:
      f.write(array.tobytes())
  os.replace(partial, path)
