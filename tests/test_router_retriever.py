"""RouterRetriever (`zoo.evaluators.router_retriever`): routing by mean similarity to the pilots and the pilots'
assignment on hand-worked cases; an end-to-end evaluation of a small base with two per-domain LoRA experts, whose
'base' scores are the plain retrieval evaluator's and whose oracle and routed scores come from the experts."""

import numpy as np
import pytest

from test_retrieval import data_dir  # noqa: F401  (the module fixture building stdlib_doc_code)
from zoo.engine import trainer
from zoo.evaluators import router_retriever as rr
from zoo.models import ConfigError


def test_routing_takes_the_expert_of_highest_mean_similarity():
  pilots = [np.array([[1.0, 0.0], [0.6, 0.8]]), np.array([[0.0, 1.0]])]  # means [0.8, 0.4] and [0, 1]
  x = np.array([[1.0, 0.0], [0.0, 1.0], [0.8, 0.6]])
  # x0: 0.8 vs 0 -> 0; x1: 0.4 vs 1 -> 1; x2: 0.64 + 0.24 = 0.88 vs 0.6 -> 0.
  np.testing.assert_array_equal(rr.route(x, pilots), [0, 1, 0])
  np.testing.assert_array_equal(rr.route(x, [pilots[0], np.zeros((0, 2))]), [0, 0, 0])  # an expert without pilots


def test_pilots_go_to_the_expert_that_retrieves_best_ties_to_the_own_domain():
  eye = np.eye(3)
  # Expert 0 ranks every pair's document first; expert 1 ranks pair 0's document last (its query points elsewhere).
  q0, d0 = eye, eye
  q1, d1 = np.array([[0.0, 1.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]]), eye
  # Pair 0: ranks (1, 2): expert 0. Pair 1: ranks (1, 1), own expert 1 wins the tie. Pair 2: (1, 1), own -1: lowest.
  np.testing.assert_array_equal(rr.assign_pilots([q0, q1], [d0, d1], np.array([1, 1, -1])), [0, 1, 0])


@pytest.mark.parametrize(
  "edit, message",
  [
    (dict(expert_runs=("a",)), "expert_runs has 1 runs"),
    (dict(expert_runs=("a", "b"), max_train_pairs=0), "max_train_pairs=0"),
    (dict(pilots=3), "unknown key config.router_retriever.pilots"),
  ],
)
def test_bad_options_fail_with_a_clear_message(edit, message):
  with pytest.raises(ConfigError, match=message):
    rr.options({"router_retriever": edit})


def _small(directory, **train):
  from configs.retrieval_stdlib import get_config

  c = get_config()
  c.data.data_dir = directory
  c.data.seq_len = 32
  c.model.update(num_layers=1, embed_dim=32, num_heads=2, mlp_dim=64)
  c.train.update(steps=8, batch_size=16, log_every_steps=4, eval_every_steps=0, eval_batches=2, **train)
  c.optimizer.update(lr=3e-3, warmup_steps=2)
  c.checkpoint.update(every_steps=0, async_save=False)
  return c


def test_router_retriever_scores_base_routed_and_oracle(data_dir, tmp_path):  # noqa: F811
  base = _small(data_dir)
  trainer.train(base, str(tmp_path / "base"), progress=False)
  runs = []
  for domain in ("gui", "web"):
    c = _small(data_dir)
    c.init_from = str(tmp_path / "base")
    c.data.domains = (domain,)
    c.lora.update(r=4, alpha=8.0)
    c.optimizer.update(lr=2e-2)
    trainer.train(c, str(tmp_path / domain), progress=False)
    runs.append(str(tmp_path / domain))
  base.evals = ("retrieval", "router_retriever")
  base.router_retriever.update(expert_runs=tuple(runs), max_train_pairs=256)
  _, results, _ = trainer.evaluate(base, str(tmp_path / "base"))
  for key in ("ndcg_at_10", "recall_at_1", "ndcg_at_10_gui", "recall_at_10_web"):
    assert results[f"rr_base_{key}"] == results[key]  # the base alone is the plain evaluation
  assert results["rr_pilots_0"] + results["rr_pilots_1"] == 256
  assert 0 <= results["rr_routing_accuracy"] <= 1
  # The gui expert changes the gui queries' embeddings: the oracle's gui scores differ from the base's.
  assert results["rr_oracle_ndcg_at_10_gui"] != results["rr_base_ndcg_at_10_gui"]
  for name in ("routed", "oracle"):
    assert (
      0 <= results[f"rr_{name}_recall_at_1"] <= results[f"rr_{name}_ndcg_at_10"] <= results[f"rr_{name}_recall_at_10"]
    )
  base.router_retriever.update(expert_runs=(runs[0], str(tmp_path / "base")))
  with pytest.raises(ConfigError, match="has no LoRA adapters"):
    trainer.evaluate(base, str(tmp_path / "base"))
