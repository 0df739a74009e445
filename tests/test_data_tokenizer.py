"""ByteTokenizer: id layout, round trips (including non-ASCII UTF-8), bad input."""

import numpy as np
import pytest
from hypothesis import given, strategies as st

from zoo.data.tokenizer import ByteTokenizer

TOK = ByteTokenizer()


def test_id_layout():
  assert {TOK.pad_id, TOK.bos_id, TOK.eos_id} == {256, 257, 258}
  assert TOK.vocab_size == 259
  ids = TOK.encode("Az")
  assert ids.dtype == np.int32
  assert ids.tolist() == [TOK.bos_id, ord("A"), ord("z"), TOK.eos_id]
  assert TOK.encode("Az", add_bos=False, add_eos=False).tolist() == [ord("A"), ord("z")]


def test_non_ascii_round_trip():
  text = "héllo wörld — 日本語 🙂\n\ttab"
  ids = TOK.encode(text)
  assert len(ids) == len(text.encode("utf-8")) + 2
  assert ids[1:-1].max() < 256
  assert TOK.decode(ids) == text
  assert TOK.decode(TOK.encode(text.encode("utf-8"))) == text


@given(st.text())
def test_round_trip_any_text(text):
  assert TOK.decode(TOK.encode(text)) == text


def test_decode_drops_specials_and_replaces_cut_characters():
  ids = np.concatenate([TOK.encode("ab"), [TOK.pad_id, TOK.pad_id]])
  assert TOK.decode(ids) == "ab"
  cut = TOK.encode("é", add_bos=False, add_eos=False)[:1]  # first of its two UTF-8 bytes
  assert TOK.decode(cut) == "\ufffd"


def test_bad_input():
  with pytest.raises(ValueError, match=r"\[0, 259\)"):
    TOK.decode([1, 259])
  with pytest.raises(TypeError, match="str or bytes"):
    TOK.encode(12)
