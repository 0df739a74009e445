"""The engine's plug-in contract: a new kind of model is one model file + one task file + one config, with no engine
edit (the fixture below is the whole of it); the shipped sequence-classification task; frozen parameters (no
gradient, no optimizer state, saved once); sub-models composed from several sources by `init_from`."""

import importlib
import textwrap

import jax
import numpy as np
import pytest

from test_engine import tiny_config
from zoo.data import make_iterator
from zoo.data.tokenizer import ByteTokenizer
from zoo.engine import trainer
from zoo.engine.checkpoint import Checkpointer
from zoo.engine.writers import read_metrics
from zoo.models import ConfigError

# A new kind of model (a denoiser of 8x8 digits), its task (which draws its own noise every step) and its config.
MODEL_FILE = """
import flax.linen as nn
import jax.numpy as jnp
from zoo.models import ModelOutput, register_model


@register_model("toy_denoiser")
class ToyDenoiser(nn.Module):
  width: int = 16

  @nn.compact
  def __call__(self, noisy, *, deterministic=True):
    h = nn.relu(nn.Dense(self.width)(noisy.reshape(noisy.shape[0], -1)))
    return nn.Dense(noisy[0].size)(h).reshape(noisy.shape), ModelOutput()
"""
TASK_FILE = """
import dataclasses
import jax
import jax.numpy as jnp
from zoo.tasks import Task, register_task


@register_task("toy_denoising")
@dataclasses.dataclass(frozen=True)
class ToyDenoising(Task):
  sigma: float = 0.5
  formats = ("images",)
  rng_streams = ("noise",)

  def batch_spec(self, info, data_config, batch_size):
    return {"image": jax.ShapeDtypeStruct((batch_size, *info["image_shape"]), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
            "weight": jax.ShapeDtypeStruct((batch_size,), jnp.float32)}

  def prepare(self, batch, rngs):
    noise = self.sigma * jax.random.normal(rngs["noise"], batch["image"].shape)
    return {"noisy": batch["image"] + noise}, {"clean": batch["image"]}

  def stats(self, outputs, targets, batch):
    error = jnp.mean((outputs - targets["clean"]) ** 2, axis=(1, 2, 3))
    return {"loss_sum": jnp.sum(error * batch["weight"]), "weight": jnp.sum(batch["weight"])}

  def finalize(self, sums, info):
    return {"loss": float(sums["loss_sum"]) / max(float(sums["weight"]), 1e-9)}
"""
CONFIG_FILE = """
from configs.base import get_base_config


def get_config():
  config = get_base_config(model={"name": "toy_denoiser", "width": 32}, dataset="digits", task="toy_denoising")
  config.task_options.sigma = 0.3
  config.train.update(steps=40, batch_size=16, eval_every_steps=0, eval_batches=2, log_every_steps=10)
  config.optimizer.update(lr=3e-3, warmup_steps=5)
  config.checkpoint.update(every_steps=0, async_save=False)
  return config
"""


def test_a_new_model_and_task_plug_in_without_an_engine_edit(tmp_path, monkeypatch):
  for name, text in (("toy_model.py", MODEL_FILE), ("toy_task.py", TASK_FILE), ("toy_config.py", CONFIG_FILE)):
    (tmp_path / name).write_text(textwrap.dedent(text))
  monkeypatch.syspath_prepend(str(tmp_path))
  importlib.import_module("toy_model")
  importlib.import_module("toy_task")
  config = importlib.import_module("toy_config").get_config()
  trainer.train(config, str(tmp_path / "run"), progress=False)
  losses = [r["loss"] for r in read_metrics(tmp_path / "run") if "loss" in r]
  assert len(losses) == 4 and losses[-1] < 0.6 * losses[0], losses
  step, results, _ = trainer.evaluate(config, str(tmp_path / "run"))
  again = trainer.evaluate(config, str(tmp_path / "run"))[1]
  assert step == 40 and results["loss"] == again["loss"]  # the evaluation's noise is the same every time
  config.task_options.nope = 1
  with pytest.raises(ConfigError, match="task_options.nope is not an option of task 'toy_denoising'"):
    trainer.Experiment(config)


def test_a_task_must_read_the_dataset_format():
  c = tiny_config()
  c.task = "classification"
  with pytest.raises(
    ConfigError, match="a task that reads format 'text' .* task 'classification' reads \\['images'\\]"
  ):
    trainer.Experiment(c)
  c.task = "nope"
  with pytest.raises(ConfigError, match="config.task='nope' is not a known task; choose one of \\["):
    trainer.Experiment(c)


def _classify_config(steps):
  from configs.text_classify_domains import get_config

  c = get_config()
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64)
  c.data.seq_len = 64
  c.train.update(steps=steps, batch_size=16, eval_every_steps=0, eval_batches=4, log_every_steps=steps)
  c.checkpoint.update(every_steps=0, async_save=False)
  return c


def test_labelled_windows_cover_each_document_once_with_its_label():
  c = _classify_config(1)
  batches = list(
    make_iterator(c.data, split="validation", global_batch_size=8, seed=0, repeat=False, drop_remainder=False)
  )
  inputs = np.concatenate([b["inputs"] for b in batches])
  mask = np.concatenate([b["mask"] for b in batches])
  labels = np.concatenate([b["label"] for b in batches])
  from zoo.data.builders import prepare, stdlib_domains

  source = prepare("pystdlib", c.data.data_dir).as_data_source(split="validation")
  wanted = {stdlib_domains().index(d) for d in ("docs", "modules")}
  docs = [source[i] for i in range(len(source)) if int(source[i]["domain"]) in wanted]
  tok = ByteTokenizer()
  assert int(mask.sum()) == sum(len(tok.encode(d["text"])) for d in docs)
  assert sorted(set(labels.tolist())) == sorted({int(d["domain"]) for d in docs})
  assert np.all(inputs[mask == 0] == tok.pad_id) and np.all(inputs[:, 0][mask[:, 0] > 0] >= 0)


def test_sequence_classification_learns_to_tell_docs_from_code(tmp_path):
  c = _classify_config(60)
  trainer.train(c, str(tmp_path), progress=False)
  records = read_metrics(tmp_path)
  assert records[-1]["eval_accuracy"] > 0.8, records[-1]
  assert 0 <= records[-1]["eval_f1_macro"] <= 1


def test_frozen_parameters_have_no_gradient_no_moments_and_are_saved_once(tmp_path):
  c = tiny_config(steps=4)
  c.model.num_layers = 2
  c.frozen_params = ("^layers_0/",)
  c.optimizer.schedule = "constant"  # the resumed run (train.steps=6) reuses the compiled train step
  exp = trainer.Experiment(c)
  before = jax.device_get(exp.init_state()[0])
  assert "layers_0" not in before.params and set(before.frozen) == {"layers_0"}
  moments = [leaf for leaf in jax.tree_util.tree_leaves_with_path(before.opt_state)]
  assert not any("layers_0" in jax.tree_util.keystr(p) for p, _ in moments)
  state = jax.device_get(trainer.train(c, str(tmp_path), progress=False))
  for x, y in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(state.frozen)):
    np.testing.assert_array_equal(x, y)
  assert all(
    not np.array_equal(x, y)
    for x, y in zip(jax.tree.leaves(before.params["layers_1"]), jax.tree.leaves(state.params["layers_1"]))
  )
  frozen_dir = tmp_path / "checkpoints" / "frozen"
  stamp = sorted((p.name, p.stat().st_mtime_ns) for p in frozen_dir.rglob("*") if p.is_file())
  assert Checkpointer(str(tmp_path / "checkpoints")).all_steps() == [2, 4]
  c.train.steps = 6
  resumed = jax.device_get(trainer.train(c, str(tmp_path), progress=False))  # restores the frozen part
  assert stamp == sorted((p.name, p.stat().st_mtime_ns) for p in frozen_dir.rglob("*") if p.is_file())
  for x, y in zip(jax.tree.leaves(before.frozen), jax.tree.leaves(resumed.frozen)):
    np.testing.assert_array_equal(x, y)
  assert trainer.evaluate(c, str(tmp_path))[0] == 6
  c.frozen_params = ("^nothing_matches/",)
  with pytest.raises(ConfigError, match="frozen_params: pattern '\\^nothing_matches/' matches no parameter"):
    trainer.Experiment(c)


def test_init_from_composes_sub_models_from_several_sources(tmp_path, monkeypatch):
  one = jax.devices()[:1]  # compiles faster than 8 devices; the mesh is tested elsewhere
  small = tiny_config(steps=2)
  trainer.train(small, str(tmp_path / "small"), progress=False, devices=one)
  big = tiny_config(steps=2)
  big.model.update(embed_dim=48, mlp_dim=96)
  trainer.train(big, str(tmp_path / "big"), progress=False, devices=one)
  monkeypatch.syspath_prepend(str(tmp_path))
  (tmp_path / "pair_model.py").write_text(
    textwrap.dedent("""
      import flax.linen as nn
      from zoo.models import ModelOutput, get_model_class, register_model

      def sub_model(config, name):
        config = dict(config)
        return get_model_class(config.pop("name"))(**config, name=name)

      @register_model("test_pair")
      class Pair(nn.Module):
        small: dict
        big: dict

        @nn.compact
        def __call__(self, tokens, *, deterministic=True):
          a, _ = sub_model(self.small, "small")(tokens)
          b, _ = sub_model(self.big, "big")(tokens)
          w = nn.sigmoid(self.param("mix", nn.initializers.zeros, ()))
          return w * a + (1 - w) * b, ModelOutput()
      """)
  )
  importlib.import_module("pair_model")
  c = tiny_config(steps=1)
  c.model = type(c.model)({"name": "test_pair", "small": small.model.to_dict(), "big": big.model.to_dict()})
  c.init_from = {"small": str(tmp_path / "small"), "big": str(tmp_path / "big")}
  c.frozen_params = ("^small/", "^big/")
  c.sample.max_new_tokens = 0
  exp = trainer.Experiment(c)
  state = jax.device_get(trainer.train(c, str(tmp_path / "pair"), progress=False, devices=one))
  assert list(state.params) == ["mix"]
  for part, run in (("small", "small"), ("big", "big")):
    saved = trainer.Experiment(small if part == "small" else big)
    saved_state, _ = Checkpointer(str(tmp_path / run / "checkpoints")).restore(2, saved.abstract_state()[0])
    for x, y in zip(jax.tree.leaves(jax.device_get(saved_state.params)), jax.tree.leaves(state.frozen[part])):
      np.testing.assert_array_equal(x, y)
  c.init_from = {"small": str(tmp_path / "big")}
  with pytest.raises(Exception, match="has shape .* in the checkpoint but .* in the model"):
    trainer.train(c, str(tmp_path / "wrong"), progress=False, devices=one)
  del exp
