"""Tokenizers for training data: a Hugging Face tokenizer.json (built offline here) feeds the pipeline, and each
token carries the UTF-8 bytes of text it stands for, so bits per byte are right for any tokenizer."""

import json

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from test_engine import tiny_config
from zoo.data import dataset_info, make_iterator
from zoo.data.tokenizer import ByteTokenizer, HFTokenizer, make_tokenizer

TEXTS = ["def add(a, b):\n    return a + b\n", "Ünïcödé — naïve café ☃ 日本語", "for i in range(10): print(i)"]


def build_tokenizer(directory, vocab_size=300):
  """A byte-level BPE tokenizer.json trained on a few lines (offline), with BOS/EOS/PAD ids in a config.json."""
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer_ = trainers.BpeTrainer(
    vocab_size=vocab_size - 3,
    special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
  )
  tok.train_from_iterator(TEXTS * 20, trainer_)
  directory.mkdir(parents=True, exist_ok=True)
  tok.save(str(directory / "tokenizer.json"))
  config = directory / "config.json"
  existing = json.loads(config.read_text()) if config.exists() else {}
  existing.update(pad_token_id=0, bos_token_id=1, eos_token_id=2)
  config.write_text(json.dumps(existing))
  return directory


@pytest.mark.parametrize("text", TEXTS)
def test_token_bytes_add_up_to_the_text(tmp_path, text):
  hf = HFTokenizer(str(build_tokenizer(tmp_path)))
  for tok in (hf, ByteTokenizer()):
    ids, nbytes = tok.encode_with_bytes(text)
    assert ids.shape == nbytes.shape and nbytes[0] == 0 and nbytes[-1] == 0  # BOS and EOS stand for no text
    assert nbytes.sum() == len(text.encode("utf-8"))
    assert tok.decode(ids) == text
  assert len(hf.encode(text)) < len(ByteTokenizer().encode(text))  # the merges shorten it


def test_the_pipeline_reads_text_with_the_tokenizer(tmp_path):
  directory = build_tokenizer(tmp_path / "tok")
  c = tiny_config()
  c.data.tokenizer = str(directory / "tokenizer.json")
  info = dataset_info(c.data)
  assert info["vocab_size"] == make_tokenizer(c.data.tokenizer).vocab_size and info["pad_id"] == 0
  batch = next(make_iterator(c.data, split="validation", global_batch_size=4, seed=0))
  assert batch["inputs"].max() < info["vocab_size"] and batch["inputs"].max() > 258  # merged tokens occur
  real = batch["mask"] > 0
  assert np.all(batch["target_bytes"][~real] == 0) and batch["target_bytes"][real].mean() > 1.0
  c.data.tokenizer = str(tmp_path / "missing.json")
  with pytest.raises(FileNotFoundError, match="no tokenizer.json"):
    dataset_info(c.data)


def test_bits_per_byte_use_the_bytes_of_the_targets():
  from zoo.tasks import get_task

  task = get_task("lm")
  logits = np.log(np.full((1, 4, 3), 1 / 3, np.float32))  # uniform over 3 tokens: ln 3 nats per target
  batch = {
    "targets": np.array([[0, 1, 2, 0]]),
    "mask": np.array([[1, 1, 1, 0]], np.float32),
    "target_bytes": np.array([[3, 0, 1, 0]], np.float32),
    "weight": np.ones((1,), np.float32),
  }
  sums = task.stats(logits, {}, batch)
  metrics = task.finalize(sums, {})
  np.testing.assert_allclose(metrics["loss"], np.log(3), rtol=1e-6)  # three real targets
  np.testing.assert_allclose(metrics["bits_per_byte"], 3 * np.log(3) / np.log(2) / 4, rtol=1e-6)  # four bytes
