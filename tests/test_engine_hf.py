"""init_from='hf:DIR': train.py fine-tunes and evaluate.py scores a tiny random Hugging Face Llama (needs the `hf`
extra: torch and transformers)."""

import json
import os
import subprocess
import sys

import jax
import numpy as np

from test_engine import tiny_config
from zoo.engine import trainer
from zoo.engine.writers import read_metrics

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_fine_tune_and_evaluate_a_hugging_face_model(tmp_path):
  import torch

  from zoo.checkpoints import hf_testing, load_hf_checkpoint

  hf_dir = tmp_path / "hf"
  hf = hf_testing.build("llama", str(hf_dir), vocab_size=264)  # covers the 259 byte ids, splits over 8 devices
  c = tiny_config(steps=2)
  c.init_from = f"hf:{hf_dir}"
  c.data.seq_len = 16
  c.train.update(batch_size=8, eval_batches=1, eval_every_steps=2)
  c.optimizer.update(lr=1e-9, warmup_steps=0)  # the params stay the converted ones to ~1e-9
  c.sample.max_new_tokens = 0
  state = trainer.train(c, str(tmp_path / "run"), progress=False)
  assert c.model.vocab_size == 264 and c.model.rope_scaling is not None  # config.model came from config.json
  _, converted = load_hf_checkpoint(str(hf_dir))
  for x, y in zip(jax.tree.leaves(state.params), jax.tree.leaves(converted["params"])):
    np.testing.assert_allclose(x, y, atol=1e-6)

  batch = next(trainer.Experiment(c).make_iterator(c.data.eval_split, repeat=False))
  with torch.no_grad():
    logits = hf(torch.tensor(batch["inputs"], dtype=torch.long)).logits.double().numpy()
  logp = torch.log_softmax(torch.tensor(logits), -1).numpy()
  nll = -np.take_along_axis(logp, batch["targets"][..., None], -1)[..., 0]
  hf_loss = float((nll * batch["mask"]).sum() / batch["mask"].sum())
  first = read_metrics(tmp_path / "run")[0]
  assert first["step"] == 0
  np.testing.assert_allclose(first["eval_loss"], hf_loss, rtol=1e-5)

  result = subprocess.run(
    [
      sys.executable,
      "evaluate.py",
      "--config=configs/dense_lm.py",
      f"--workdir={tmp_path}/eval",
      f"--config.init_from=hf:{hf_dir}",
      "--config.data.seq_len=16",
      "--config.train.batch_size=8",
      "--config.train.eval_batches=1",
      "--config.sample.max_new_tokens=4",
    ],
    cwd=ROOT,
    capture_output=True,
    text=True,
    timeout=600,
  )
  assert result.returncode == 0, result.stderr[-3000:]
  assert "checkpoint step 0" in result.stdout
  last = json.loads(result.stdout.strip().splitlines()[-1])
  np.testing.assert_allclose(last["loss"], hf_loss, rtol=1e-5)
  assert isinstance(last["sample"], str)


def test_fine_tune_on_the_directory_tokenizer(tmp_path):
  from test_tokenizers import build_tokenizer
  from zoo.checkpoints import hf_testing

  hf_dir = tmp_path / "hf"
  hf_testing.build("llama", str(hf_dir), vocab_size=264)
  build_tokenizer(hf_dir, vocab_size=264)  # beside the weights, as a Hugging Face directory has it
  c = tiny_config(steps=2)
  c.init_from = f"hf:{hf_dir}"
  c.train.update(batch_size=8, eval_batches=1, eval_every_steps=0)
  c.sample.max_new_tokens = 4
  trainer.train(c, str(tmp_path / "run"), progress=False)
  assert c.data.tokenizer == f"hf:{hf_dir}"  # set from the directory: the model's own token ids
  batch = next(trainer.Experiment(c).make_iterator(c.data.eval_split, repeat=False))
  assert batch["inputs"].max() > 258  # merged tokens, not bytes
  assert np.isfinite(read_metrics(tmp_path / "run")[-1]["eval_bits_per_byte"])
  _, results, sample = trainer.evaluate(c, str(tmp_path / "run"))
  assert isinstance(sample, str) and results["bits_per_byte"] > 0
