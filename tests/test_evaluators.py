"""Evaluators as plug-ins: the plots write PNGs, `config.evals` chooses them, and an evaluator the model cannot serve
is refused at start-up."""

import jax.numpy as jnp
import numpy as np
import pytest

from test_engine import tiny_config
from zoo import routing
from zoo.engine import trainer
from zoo.evaluators import evaluator_names, select
from zoo.evaluators.expert_load import plot_expert_load
from zoo.evaluators.recursion_depth import plot_depth_per_token
from zoo.evaluators.routing_consistency import plot_routing_consistency
from zoo.models import ConfigError, build_model
from zoo.routing import consistency
from zoo.tasks import get_task

PNG = b"\x89PNG\r\n\x1a\n"


def test_plots_write_pngs(tmp_path):
  assert open(plot_expert_load(jnp.full((3, 8), 1 / 8), tmp_path / "load.png"), "rb").read(8) == PNG
  with pytest.raises(ValueError, match=r"\[layers, experts\]"):
    plot_expert_load(jnp.zeros((2, 2, 2)), tmp_path / "bad.png")
  ids = np.broadcast_to(np.array([0, 1]), (1, 2, 32, 2))
  result = consistency.routing_consistency(ids, 4)
  assert plot_routing_consistency(result, tmp_path / "consistency.png").read_bytes()[:8] == PNG
  plot_depth_per_token(list("hello world"), np.arange(11) % 4, 3, str(tmp_path / "depth.png"))
  assert (tmp_path / "depth.png").read_bytes()[:8] == PNG
  with pytest.raises(ValueError, match="depths"):
    plot_depth_per_token(list("ab"), [1], 3, str(tmp_path / "depth.png"))


def test_default_and_chosen_evaluators():
  assert {"sample", "expert_load", "routing_consistency", "recursion_depth"} <= set(evaluator_names())
  dense = build_model(tiny_config().model)
  names = lambda chosen: sorted(type(e).registry_name for e in chosen)
  assert names(select((), dense, get_task("lm"), "lm")) == ["expert_load", "sample"]
  moe = build_model({"name": "moe_lm", "num_experts": 4, "num_experts_per_tok": 2})
  assert names(select((), moe, get_task("lm"), "lm")) == ["expert_load", "routing_consistency", "sample"]
  assert names(select(("sample",), moe, get_task("lm"), "lm")) == ["sample"]
  assert names(select((), moe, get_task("classification"), "classification")) == ["expert_load", "routing_consistency"]
  c = tiny_config()
  c.evals = ("routing_consistency",)
  with pytest.raises(
    ConfigError,
    match=r"'routing_consistency' cannot run here: model DenseLM does not expose "
    r"\['expert_ids'\]",
  ):
    trainer.Experiment(c)
  c.evals = ("nope",)
  with pytest.raises(ConfigError, match="config.evals='nope' is not a known evaluator"):
    trainer.Experiment(c)
  assert routing  # the routing package no longer holds plotting code
  assert not hasattr(routing, "plot_expert_load")
