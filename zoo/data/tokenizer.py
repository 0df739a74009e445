"""Tokenizers for training data and samples: bytes (the default) or a Hugging Face `tokenizer.json`.

`make_tokenizer(spec)`: '' or 'bytes' -> `ByteTokenizer`; 'hf:DIR' (a Hugging Face model directory) or a path to a
`tokenizer.json` -> `HFTokenizer` (the `tokenizers` library, offline). Both give `vocab_size`, `pad_id`, `bos_id`,
`eos_id`, `encode`, `decode` and `encode_with_bytes` (ids and the UTF-8 bytes of text each id stands for, which make
bits per byte right for any tokenizer).

Byte ids (fixed, so that checkpoints stay readable across versions):
  0..255  the byte values of the UTF-8 encoding,
  256     PAD (never a target: the pipeline gives it mask 0),
  257     BOS (begins every document),
  258     EOS (ends every document).
`vocab_size` is 259.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Iterable

import numpy as np


class ByteTokenizer:
  """Encodes text to byte ids and back; see the module docstring for the ids."""

  pad_id = 256
  bos_id = 257
  eos_id = 258
  vocab_size = 259

  def encode(self, text: str | bytes, *, add_bos: bool = True, add_eos: bool = True) -> np.ndarray:
    """Encodes text to ids.

    Args:
      text: a str (encoded as UTF-8) or bytes (taken as they are).
      add_bos: put BOS first.
      add_eos: put EOS last.

    Returns:
      ids: int32 [len(utf-8 bytes) + add_bos + add_eos].
    """
    if isinstance(text, str):
      text = text.encode("utf-8")
    elif not isinstance(text, bytes):
      raise TypeError(f"ByteTokenizer.encode takes str or bytes, got {type(text).__name__}")
    body = np.frombuffer(text, dtype=np.uint8).astype(np.int32)
    head = [self.bos_id] if add_bos else []
    tail = [self.eos_id] if add_eos else []
    return np.concatenate([np.asarray(head, np.int32), body, np.asarray(tail, np.int32)])

  def encode_with_bytes(self, text: str | bytes) -> tuple[np.ndarray, np.ndarray]:
    """(ids int32 [n] with BOS and EOS, bytes float32 [n]: 1 per byte token, 0 for BOS/EOS)."""
    ids = self.encode(text)
    return ids, (ids < 256).astype(np.float32)

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes ids to text, dropping PAD/BOS/EOS.

    Args:
      ids: int [length] with values in [0, vocab_size).

    Returns:
      The UTF-8 text; a byte sequence cut in the middle of a character decodes to U+FFFD.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(
        f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got min {ids.min()} max {ids.max()}"
      )
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class HFTokenizer:
  """A Hugging Face `tokenizer.json` behind the interface of `ByteTokenizer`.

  Args:
    path: 'hf:DIR' or DIR (a model directory with tokenizer.json and, optionally, config.json), or the path of a
      tokenizer.json. bos/eos/pad ids come from DIR's config.json (`bos_token_id`, `eos_token_id`, `pad_token_id`)
      when present, else None; `vocab_size` from config.json, else the tokenizer's size with added tokens.
  """

  def __init__(self, path):
    import tokenizers  # pylint: disable=g-import-not-at-top

    path = str(path)[3:] if str(path).startswith("hf:") else str(path)
    file = path if path.endswith(".json") else os.path.join(path, "tokenizer.json")
    if not os.path.isfile(file):
      raise FileNotFoundError(f"tokenizer {path!r}: no tokenizer.json at {file}")
    try:
      self._tok = tokenizers.Tokenizer.from_file(file)
    except Exception as e:  # the Rust library raises its own exception type
      raise ValueError(f"tokenizer {file} cannot be read ({type(e).__name__}: {str(e)[:200]})") from None
    config_path = os.path.join(os.path.dirname(file), "config.json")
    config = {}
    if os.path.exists(config_path):
      with open(config_path) as f:
        config = json.load(f)

    def first(value):
      return value[0] if isinstance(value, list) else value

    self.bos_id = first(config.get("bos_token_id"))
    self.eos_id = first(config.get("eos_token_id"))
    self.pad_id = first(config.get("pad_token_id"))
    self.vocab_size = int(config.get("vocab_size") or self._tok.get_vocab_size(with_added_tokens=True))
    self.file = file

  @staticmethod
  def available(path):
    """Whether the model directory (or 'hf:DIR') has a tokenizer.json."""
    path = str(path)[3:] if str(path).startswith("hf:") else str(path)
    return os.path.exists(os.path.join(path, "tokenizer.json"))

  def _wrap(self, ids, add_bos, add_eos):
    head = [self.bos_id] if add_bos and self.bos_id is not None else []
    tail = [self.eos_id] if add_eos and self.eos_id is not None else []
    return head + list(ids) + tail

  def encode(self, text, *, add_bos=True, add_eos=True):
    """text (str or UTF-8 bytes) -> int32 ids [length], with BOS/EOS when the model defines them."""
    return self.encode_with_bytes(text, add_bos=add_bos, add_eos=add_eos)[0]

  def encode_with_bytes(self, text, *, add_bos=True, add_eos=True):
    """(ids int32 [n], bytes float32 [n]): each token's bytes are those of the characters its offsets cover that no
    earlier token covered (so pieces of one character are counted once); BOS/EOS have 0."""
    if isinstance(text, bytes):
      text = text.decode("utf-8")
    elif not isinstance(text, str):
      raise TypeError(f"HFTokenizer.encode takes str or bytes, got {type(text).__name__}")
    encoding = self._tok.encode(text, add_special_tokens=False)
    counts, done = [], 0
    for start, end in encoding.offsets:
      start = max(start, done)
      counts.append(len(text[start:end].encode("utf-8")) if end > start else 0)
      done = max(done, end)
    ids = self._wrap(encoding.ids, add_bos, add_eos)
    head = int(add_bos and self.bos_id is not None)
    tail = int(add_eos and self.eos_id is not None)
    return np.asarray(ids, np.int32), np.asarray([0] * head + counts + [0] * tail, np.float32)

  def decode(self, ids):
    """ids [length] -> text, special tokens dropped."""
    return self._tok.decode([int(i) for i in np.asarray(ids).reshape(-1)], skip_special_tokens=True)


@functools.cache
def make_tokenizer(spec: str = ""):
  """'' or 'bytes' -> ByteTokenizer(); 'hf:DIR', DIR or a tokenizer.json path -> HFTokenizer (cached per spec)."""
  if spec in ("", "bytes"):
    return ByteTokenizer()
  return HFTokenizer(spec)
