"""Byte-level tokenizer: UTF-8 bytes are the tokens, plus three reserved ids.

Id layout (fixed, so that checkpoints stay readable across versions):
  0..255  the byte values of the UTF-8 encoding,
  256     PAD (never a target: the pipeline gives it mask 0),
  257     BOS (begins every document),
  258     EOS (ends every document).
`vocab_size` is 259.
"""
from __future__ import annotations

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

  def decode(self, ids: Iterable[int] | np.ndarray) -> str:
    """Decodes ids to text, dropping PAD/BOS/EOS.

    Args:
      ids: int [length] with values in [0, vocab_size).

    Returns:
      The UTF-8 text; a byte sequence cut in the middle of a character decodes to U+FFFD.
    """
    ids = np.asarray(ids).reshape(-1)
    if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
      raise ValueError(f"ByteTokenizer.decode: ids must lie in [0, {self.vocab_size}), got min {ids.min()} "
                       f"max {ids.max()}")
    return ids[ids < 256].astype(np.uint8).tobytes().decode("utf-8", errors="replace")
