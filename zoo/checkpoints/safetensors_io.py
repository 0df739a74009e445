"""Reading and writing safetensors files (no pickle, no torch), through the `safetensors` package's numpy API.

The format (https://github.com/huggingface/safetensors, "Format"): an 8-byte little-endian header size N, N bytes of
JSON mapping each tensor name to `{dtype, shape, data_offsets: [begin, end]}` (offsets into the byte buffer that
follows the header) plus an optional `__metadata__` dict of strings, then the buffer.

`safetensors.safe_open` validates a file's header when it opens it and memory-maps the file, so reading a checkpoint
costs one tensor's memory at a time: `load_file` and `load_dir` return a read-on-access mapping (`Tensors`) and
`read_headers` gives every tensor's file, dtype and shape without reading any tensor data. bfloat16 tensors come back
as `ml_dtypes.bfloat16` arrays (the dtype jax uses), which `safetensors.numpy` reads and writes itself; float8 tensors
are refused by name (its numpy API cannot read them).

When `safe_open` refuses a file, its message names neither the file nor the tensor; `_diagnose` then reads the
header's JSON itself to say which tensor is at fault (truncated data, byte size != dtype x shape, bad offsets).

Every problem raises `SafetensorsError` (a `ConversionError`) with one line naming the file and, where one is at
fault, the tensor.
"""

import collections
import json
import os
import struct

import numpy as np
import safetensors
import safetensors.numpy

from zoo.checkpoints.hf_spec import ConversionError

# Header dtype name -> bytes per element, for the dtypes `Tensors` can read.
ITEMSIZES = {
  "F64": 8,
  "F32": 4,
  "F16": 2,
  "BF16": 2,
  "I64": 8,
  "I32": 4,
  "I16": 2,
  "I8": 1,
  "U64": 8,
  "U32": 4,
  "U16": 2,
  "U8": 1,
  "BOOL": 1,
}
# Dtypes the format defines that `Tensors` cannot read (float8, sub-byte floats, complex).
OTHER_DTYPES = ("F8_E4M3", "F8_E5M2", "F8_E8M0", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F6_E2M3", "F6_E3M2", "F4", "C64")
INDEX_FILE = "model.safetensors.index.json"

TensorInfo = collections.namedtuple("TensorInfo", ["file", "dtype", "shape"])
TensorInfo.__doc__ = "Where a tensor is stored: file path, header dtype name ('F32', 'BF16', ...), shape tuple."


class SafetensorsError(ConversionError):
  """A safetensors file, its index or a shard is malformed or missing; the message names the file (and tensor)."""


def _raw_header(path):
  """The header JSON of `path` parsed without `safetensors` (for offsets and diagnoses): (dict, buffer bytes)."""
  size = os.path.getsize(path)
  if size < 8:
    raise SafetensorsError(f"{path}: {size} bytes is too short for a safetensors file (8-byte header size first)")
  with open(path, "rb") as f:
    (length,) = struct.unpack("<Q", f.read(8))
    if length > size - 8:
      raise SafetensorsError(
        f"{path}: the header claims {length} bytes but the file holds {size - 8} after the "
        "size field; the file is truncated or not a safetensors file"
      )
    raw = f.read(length)
  try:
    header = json.loads(raw)
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(
      f"{path}: the header is not valid JSON ({e}); allowed: a JSON object of tensor entries"
    ) from None
  if not isinstance(header, dict):
    raise SafetensorsError(f"{path}: the header is a JSON {type(header).__name__}, not an object of tensor entries")
  return header, size - 8 - length


def _diagnose(path, reason):
  """The SafetensorsError for a file `safe_open` refused with `reason`: names the tensor at fault when it can."""
  try:
    header, buffer = _raw_header(path)
  except SafetensorsError as e:
    return e
  metadata = header.pop("__metadata__", {})
  if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
    return SafetensorsError(f"{path}: the header's __metadata__ must map names to strings; got {metadata!r}")
  entries = []
  for name, info in header.items():
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= set(info):
      return SafetensorsError(
        f"{path}: tensor {name!r} has header entry {info!r}; allowed: {{dtype, shape, data_offsets}}"
      )
    dtype, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    if not isinstance(dtype, str) or dtype not in ITEMSIZES and dtype not in OTHER_DTYPES:
      return SafetensorsError(
        f"{path}: tensor {name!r} has dtype {dtype!r}; allowed: {', '.join(sorted(ITEMSIZES) + list(OTHER_DTYPES))}"
      )
    if not isinstance(shape, list) or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in shape):
      return SafetensorsError(f"{path}: tensor {name!r} has shape {shape!r}; allowed: a list of integers >= 0")
    if not (
      isinstance(offsets, list)
      and len(offsets) == 2
      and all(isinstance(n, int) and n >= 0 for n in offsets)
      and offsets[0] <= offsets[1]
    ):
      return SafetensorsError(
        f"{path}: tensor {name!r} has data_offsets {offsets!r}; allowed: [begin, end] with 0 <= begin <= end"
      )
    if dtype in ITEMSIZES and offsets[1] - offsets[0] != ITEMSIZES[dtype] * int(np.prod(shape, dtype=object)):
      return SafetensorsError(
        f"{path}: tensor {name!r} of dtype {dtype} and shape {tuple(shape)} needs "
        f"{ITEMSIZES[dtype] * int(np.prod(shape, dtype=object))} bytes but its data_offsets "
        f"{offsets} span {offsets[1] - offsets[0]}"
      )
    entries.append((offsets[0], offsets[1], name))
  position = 0
  for begin, end, name in sorted(entries):
    if begin != position:
      return SafetensorsError(
        f"{path}: tensor {name!r} starts at byte {begin} of the data but the previous tensor "
        f"ends at {position}; allowed: tensors stored back to back"
      )
    if end > buffer:
      return SafetensorsError(
        f"{path}: tensor {name!r} ends at byte {end} of the data but the file holds {buffer} "
        "bytes of data; the file is truncated"
      )
    position = end
  if position != buffer:
    return SafetensorsError(
      f"{path}: {buffer - position} bytes follow the last tensor's data; the file is damaged or not a safetensors file"
    )
  return SafetensorsError(f"{path}: {reason}")


def _open(path):
  """A `safetensors.safe_open` handle of `path` (numpy); SafetensorsError naming the file (and tensor) otherwise."""
  if not os.path.isfile(path):
    raise SafetensorsError(f"{path}: " + ("is not a file" if os.path.exists(path) else "no such file"))
  try:
    return safetensors.safe_open(path, framework="numpy")
  except safetensors.SafetensorError as e:
    raise _diagnose(path, str(e)) from None
  except OSError as e:
    raise SafetensorsError(f"{path}: cannot be opened ({e.strerror or e})") from None


def _infos(path):
  """name -> TensorInfo of every tensor in the file `path` (header only; no tensor data is read)."""
  handle = _open(path)
  infos = {}
  for name in handle.keys():
    part = handle.get_slice(name)
    infos[name] = TensorInfo(path, part.get_dtype(), tuple(part.get_shape()))
  return infos


def read_header(path):
  """The JSON header of one file, checked by `safetensors`: (dict name -> {dtype, shape, data_offsets}, byte offset
  of the buffer). The `__metadata__` entry is dropped."""
  _open(path)
  header, buffer = _raw_header(path)
  header.pop("__metadata__", None)
  return header, os.path.getsize(path) - buffer


class Tensors(collections.abc.Mapping):
  """name -> numpy array, each read from its safetensors file when it is looked up (one tensor in memory at a time).

  Args:
    infos: name -> TensorInfo (from `read_headers`).
  """

  def __init__(self, infos):
    self._infos = dict(infos)
    self._handles = {}

  def info(self, name):
    """The TensorInfo (file, dtype, shape) of tensor `name`, without reading it."""
    return self._infos[name]

  def __getitem__(self, name):
    info = self._infos[name]
    if info.dtype not in ITEMSIZES:
      raise SafetensorsError(
        f"{info.file}: tensor {name!r} has dtype {info.dtype}; readable dtypes: {sorted(ITEMSIZES)}"
      )
    if info.file not in self._handles:
      self._handles[info.file] = _open(info.file)
    try:
      return self._handles[info.file].get_tensor(name)
    except Exception as e:  # the file changed since its header was read: the Rust reader's errors have no type
      raise SafetensorsError(f"{info.file}: tensor {name!r} cannot be read ({type(e).__name__}: {e})") from None

  def __iter__(self):
    return iter(self._infos)

  def __len__(self):
    return len(self._infos)


def load_file(path):
  """All tensors of one file as a `Tensors` mapping name -> numpy array (read on access)."""
  return Tensors(_infos(path))


def shard_files(directory):
  """The safetensors files of a Hugging Face model directory: the shards named by `model.safetensors.index.json`
  (every `weight_map` value must be a relative `*.safetensors` path inside the directory, without '..'; a shard
  that is a symbolic link, as in the Hugging Face cache, is followed), else every `*.safetensors` file.

  Returns:
    (sorted list of file paths, the index's weight_map dict or None).
  """
  if not os.path.isdir(directory):
    raise SafetensorsError(
      f"{directory}: " + ("is not a directory" if os.path.exists(directory) else "no such directory")
    )
  index = os.path.join(directory, INDEX_FILE)
  if not os.path.exists(index):
    files = sorted(name for name in os.listdir(directory) if name.endswith(".safetensors"))
    if not files:
      raise SafetensorsError(
        f"{directory}: no *.safetensors files (weights stored as pickle/.bin are not read; "
        "convert them to safetensors first)"
      )
    return [os.path.join(directory, name) for name in files], None
  try:
    with open(index) as f:
      weight_map = json.load(f).get("weight_map")
  except (UnicodeDecodeError, json.JSONDecodeError) as e:
    raise SafetensorsError(f"{index}: not valid JSON ({e})") from None
  except AttributeError:
    weight_map = None
  if not isinstance(weight_map, dict) or not weight_map:
    raise SafetensorsError(f"{index}: 'weight_map' must be a non-empty object tensor name -> shard file")
  root = os.path.abspath(directory)
  files = set()
  for tensor, entry in weight_map.items():
    where = f"{index}: weight_map[{tensor!r}] = {entry!r}"
    if not isinstance(entry, str) or not entry.endswith(".safetensors"):
      raise SafetensorsError(f"{where}; allowed: a relative path ending in .safetensors")
    parts = entry.replace("\\", "/").split("/")
    if (
      os.path.isabs(entry) or ".." in parts or not os.path.normpath(os.path.join(root, entry)).startswith(root + os.sep)
    ):
      raise SafetensorsError(
        f"{where} points outside the model directory; allowed: a relative path inside it without '..'"
      )
    path = _shard_path(directory, entry)
    if not os.path.isfile(path):
      raise SafetensorsError(f"{where}: that shard is missing from {directory}")
    files.add(path)
  return sorted(files), weight_map


def _shard_path(directory, entry):
  return os.path.normpath(os.path.join(directory, entry))


def read_headers(directory):
  """name -> TensorInfo of every tensor of a Hugging Face model directory (see `shard_files`), from the headers
  only. Raises SafetensorsError for a malformed file, a tensor stored twice, or a tensor the index places in a shard
  that does not hold it."""
  files, weight_map = shard_files(directory)
  infos = {}
  for path in files:
    for name, info in _infos(path).items():
      if name in infos:
        raise SafetensorsError(f"{directory}: tensor {name!r} is stored twice ({infos[name].file} and {path})")
      infos[name] = info
  if weight_map is not None:
    for name, entry in weight_map.items():
      if name not in infos or infos[name].file != _shard_path(directory, entry):
        raise SafetensorsError(
          f"{os.path.join(directory, INDEX_FILE)}: weight_map places tensor {name!r} in "
          f"{entry}, but " + (f"it is in {infos[name].file}" if name in infos else "no shard holds it")
        )
  return infos


def load_dir(directory):
  """Every tensor of a Hugging Face model directory: `model.safetensors`, or the shards named by
  `model.safetensors.index.json`, or else every `*.safetensors` file. Returns a `Tensors` mapping name -> array
  (headers checked now, data read on access)."""
  return Tensors(read_headers(directory))


def save_file(tensors, path, metadata=None):
  """Write dict name -> numpy array as one safetensors file with `safetensors.numpy.save_file`.

  The file is written as `path.partial` and renamed over `path`, so a failed write leaves `path` as it was and arrays
  still read from an old `path` stay valid.
  """
  arrays = {}
  for name, value in tensors.items():
    array = np.ascontiguousarray(value)
    if array.dtype.name not in _WRITABLE:
      raise SafetensorsError(f"{path}: tensor {name!r} has dtype {array.dtype}; writable dtypes: {sorted(_WRITABLE)}")
    arrays[name] = array
  partial = f"{path}.partial"
  try:
    safetensors.numpy.save_file(
      arrays, partial, metadata={str(k): str(v) for k, v in metadata.items()} if metadata else None
    )
    os.replace(partial, path)
  except BaseException:
    if os.path.exists(partial):
      os.remove(partial)
    raise


_WRITABLE = (
  "float64",
  "float32",
  "float16",
  "bfloat16",
  "int64",
  "int32",
  "int16",
  "int8",
  "uint64",
  "uint32",
  "uint16",
  "uint8",
  "bool",
)
