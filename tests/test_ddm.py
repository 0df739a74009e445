"""Decentralized Diffusion Models on the 8x8 digits (papers.md D1): the k-means data partition (`zoo.data.partition`,
`config.data.clusters` / `cluster`), the flow_matching and flow_router tasks, and the whole recipe through train.py
and evaluate.py: experts trained on their clusters, a router, and the 'ddm_ensemble' evaluation with the errors it
gives for expert runs that do not fit the router. The 2-D identities of the ensemble are in test_flow_matching.py."""

import functools
import json
import os
import re
import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import ddm_digits, dense_lm, text_classify_domains
from conftest import train_config
from zoo.data import dataset_info, make_iterator, partition
from zoo.data.config import resolve_data_config
from zoo.engine import config as engine_config, trainer, writers
from zoo.evaluators import ddm_ensemble
from zoo.models import ConfigError, build_model
from zoo.tasks import get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device, as on a user's machine (the suite forces 8): the subprocesses compile and run in less time.
ENV = {**os.environ, "XLA_FLAGS": re.sub(r"device_count=\d+", "device_count=1", os.environ["XLA_FLAGS"])}
TRAIN_EXAMPLES, TEST_EXAMPLES = 1500, 297  # the embedded digits' splits
SAMPLE_STEPS = 2
DATA = resolve_data_config({"name": "digits"})
TINY = [
  "--config.model.embed_dim=16",
  "--config.model.num_layers=1",
  "--config.model.num_heads=2",
  "--config.model.frequency_dim=16",
  "--config.train.steps=4",
  "--config.train.batch_size=16",
  "--config.train.eval_every_steps=0",
  "--config.train.log_every_steps=2",
  "--config.checkpoint.every_steps=0",
  "--config.optimizer.warmup_steps=1",
  "--config.flow_eval.samples=20",
  f"--config.flow_eval.steps={SAMPLE_STEPS}",
  "--config.flow_eval.classifier_run=",
]
ROUTER = ["--config=configs/ddm_digits.py", *TINY, "--config.data.clusters=2", "--config.model.num_experts=2"]


def _expert(cluster):
  return [
    "--config=configs/ddm_digits.py:expert",
    *TINY,
    "--config.data.clusters=2",
    f"--config.data.cluster={cluster}",
  ]


def _start(script, *args):
  return subprocess.Popen(
    [sys.executable, script, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _finish(processes):
  """{name: (returncode, stdout, stderr)} of the started processes, waited for together."""
  out = {}
  for name, p in processes.items():
    stdout, stderr = p.communicate(timeout=600)
    out[name] = (p.returncode, stdout, stderr)
  return out


def _one_error_line(result):
  returncode, _, stderr = result
  lines = [line for line in stderr.splitlines() if line.strip()]
  assert returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  return lines[0]


def _read(split, clusters=4, cluster=-1):
  """Every example of `split` of the digits (unshuffled, in record order) as one dict of arrays."""
  data = {"name": "digits", "clusters": clusters, "cluster": cluster, "shuffle": False}
  batches = list(make_iterator(data, split=split, global_batch_size=2048, seed=0, repeat=False, drop_remainder=False))
  return {k: np.concatenate([b[k] for b in batches]) for k in batches[0]}


def _rows(images):
  """The images [N, H, W, C] as rows sorted lexicographically (a multiset of examples, order-free)."""
  flat = images.reshape(len(images), -1)
  return flat[np.lexsort(flat.T[::-1])]


# --- the partition -------------------------------------------------------------------------------------------------


@functools.cache
def _train_features_and_centroids():
  """(features [N, 64] of the train split in record order, k-means centroids [4, 64] fit on them here)."""
  whole = _read("train")
  features = partition.flat_images([{"image": x} for x in whole["image"]], range(len(whole["image"])))
  return features, partition.fit(features, 4)


def test_kmeans_partition_is_deterministic_disjoint_and_covers_the_train_split():
  whole = _read("train")
  assert set(whole) == {"image", "label", "cluster"}
  n = len(whole["image"])
  assert n == TRAIN_EXAMPLES
  features, centroids = _train_features_and_centroids()
  assert features.shape == (n, 64) and 0.0 <= features.min() and features.max() <= 1.0
  # Seeded k-means: this fit and the pipeline's (cached per process; a fresh fit if the key differs) are equal, so
  # every expert's process computes the same partition.
  key = (DATA["name"], DATA["data_dir"], DATA["train_split"])
  np.testing.assert_array_equal(partition.centroids(key, 4, lambda: features), centroids)
  assignment = partition.assign(features, centroids)
  np.testing.assert_array_equal(partition.assign(features, centroids), assignment)
  np.testing.assert_array_equal(whole["cluster"], assignment)  # the pipeline's ids are this partition
  # Nearest centroid: no example is closer to another centroid than to its own.
  distances = np.sum((features[:, None] - centroids[None]) ** 2, axis=-1)
  np.testing.assert_allclose(distances[np.arange(n), assignment], distances.min(1), rtol=1e-5, atol=1e-5)
  counts = np.bincount(assignment, minlength=4)
  assert len(counts) == 4 and counts.min() > 0 and counts.sum() == n, counts

  parts = [_read("train", cluster=k) for k in range(4)]
  for k, part in enumerate(parts):
    np.testing.assert_array_equal(part["cluster"], k)
    assert len(part["image"]) == counts[k]
    np.testing.assert_array_equal(_rows(part["image"]), _rows(whole["image"][assignment == k]))
  # The clusters together are the split, each example in exactly one of them.
  assert sum(len(p["image"]) for p in parts) == n
  np.testing.assert_array_equal(_rows(np.concatenate([p["image"] for p in parts])), _rows(whole["image"]))
  assert "cluster" not in _read("train", clusters=0)  # without a partition the batches have no cluster


def test_test_split_examples_carry_the_nearest_train_centroid():
  _, centroids = _train_features_and_centroids()  # fit on the train split only
  test = _read("test")
  assert len(test["image"]) == TEST_EXAMPLES
  test_features = partition.flat_images([{"image": x} for x in test["image"]], range(TEST_EXAMPLES))
  expected = partition.assign(test_features, centroids)
  np.testing.assert_array_equal(test["cluster"], expected)
  counts = np.bincount(expected, minlength=4)
  assert counts.min() > 0, counts
  for k in range(4):  # an expert evaluates on its own cluster of the test split
    part = _read("test", cluster=k)
    np.testing.assert_array_equal(part["cluster"], k)
    assert len(part["image"]) == counts[k]


@pytest.mark.parametrize(
  "data, message",
  [
    ({"clusters": 1}, re.escape("clusters=1; allowed: 0 (no partition) or an int >= 2")),
    ({"clusters": -2}, "clusters=-2; allowed"),
    ({"clusters": True}, "clusters=True; allowed"),
    ({"clusters": 4, "cluster": 4}, r"cluster=4; allowed: -1 \(all\) or an int in \[0, clusters=4\)"),
    ({"clusters": 4, "cluster": -2}, r"cluster=-2; allowed"),
    ({"clusters": 0, "cluster": 0}, r"cluster=0; allowed: -1 \(all\) or an int in \[0, clusters=0\)"),
  ],
)
def test_bad_cluster_config_is_a_config_error_naming_the_key(data, message):
  config = ddm_digits.get_config("expert")
  config.data.update(data)
  with pytest.raises(ConfigError, match=r"^config\.data: data config: " + message):
    engine_config.validate_config(config)
  # The pipeline itself refuses it too (a plain ValueError there).
  with pytest.raises(ValueError, match=message):
    make_iterator({"name": "digits", **data}, split="train", global_batch_size=4, seed=0)


@pytest.mark.parametrize(
  "get_config, fmt",
  [(dense_lm.get_config, "text"), (text_classify_domains.get_config, "labelled_text")],
  ids=["text", "labelled_text"],
)
def test_clusters_of_a_text_dataset_are_a_config_error_before_any_data_is_read(get_config, fmt):
  config = get_config()  # pystdlib: packed text (lm), domain-labelled text (sequence_classification)
  engine_config.validate_config(config)  # without clusters it is a valid config
  config.data.clusters = 2
  message = re.escape(f"data config: clusters=2 partitions image datasets; dataset 'pystdlib' has format '{fmt}'")
  # Already in dataset_info (what validate_config and every tool reads first), not only once an iterator is built.
  with pytest.raises(ValueError, match=message):
    dataset_info(config.data)
  with pytest.raises(ConfigError, match=r"^config\.data: " + message):
    engine_config.validate_config(config)
  with pytest.raises(ValueError, match=message):
    make_iterator(config.data, split="train", global_batch_size=4, seed=0)


# --- the tasks -----------------------------------------------------------------------------------------------------


def test_flow_matching_num_classes_must_match_the_dataset():
  config = ddm_digits.get_config("expert")
  config.task_options.num_classes = 5
  with pytest.raises(ConfigError, match=r"config.task_options.num_classes=5 but the dataset has 10 classes"):
    trainer.Experiment(config, jax.devices()[:1])
  info = {"format": "images", "num_classes": 10, "image_shape": (8, 8, 1)}
  with pytest.raises(ConfigError, match=r"class_dropout=1.0; allowed: \[0, 1\)"):
    get_task("flow_matching", {"num_classes": 10, "class_dropout": 1.0}).batch_spec(info, None, 4)
  spec = get_task("flow_matching", {"num_classes": 10}).batch_spec({**info, "clusters": 2}, None, 4)
  assert set(spec) == {"image", "label", "weight", "cluster"} and spec["cluster"].shape == (4,)
  assert "cluster" not in get_task("flow_matching", {"num_classes": 0}).batch_spec(info, None, 4)


@pytest.mark.parametrize("dropout", [0.1, 0.5])
def test_flow_matching_drops_labels_to_the_null_class_at_class_dropout(dropout):
  n = 20_000
  labels = jnp.arange(n, dtype=jnp.int32) % 10
  task = get_task("flow_matching", {"num_classes": 10, "class_dropout": dropout})
  seen = np.asarray(task.labels({"label": labels}, {"guidance": jax.random.key(0)}))
  dropped = seen == 10
  # Binomial(n, p): the standard deviation of the rate is sqrt(p (1 - p) / n) <= 0.0036; 0.02 is > 5 of them.
  assert abs(dropped.mean() - dropout) < 0.02, dropped.mean()
  np.testing.assert_array_equal(seen[~dropped], np.asarray(labels)[~dropped])  # the others keep their class
  assert seen.dtype == np.int32
  # Dropped independently of the class, and drawn from the 'guidance' key.
  per_class = [dropped[np.asarray(labels) == c].mean() for c in range(10)]
  np.testing.assert_allclose(per_class, dropout, atol=0.05)
  other = np.asarray(task.labels({"label": labels}, {"guidance": jax.random.key(1)})) == 10
  assert not np.array_equal(other, dropped)
  # prepare() feeds the model these labels.
  batch = {"image": jnp.zeros((n, 8, 8, 1)), "label": labels}
  rngs = {"noise": jax.random.key(2), "time": jax.random.key(3), "guidance": jax.random.key(0)}
  inputs, targets = task.prepare(batch, rngs)
  np.testing.assert_array_equal(inputs["labels"], seen)
  assert inputs["images"].shape == targets["velocity"].shape == (n, 8, 8, 1)


def test_flow_matching_never_drops_without_class_dropout():
  labels = jnp.arange(5000, dtype=jnp.int32) % 10
  never = get_task("flow_matching", {"num_classes": 10, "class_dropout": 0.0})
  np.testing.assert_array_equal(never.labels({"label": labels}, {"guidance": jax.random.key(0)}), labels)
  unconditional = get_task("flow_matching", {"num_classes": 0})
  np.testing.assert_array_equal(unconditional.labels({"label": labels}, {"guidance": jax.random.key(0)}), 0)


def test_flow_router_on_data_without_clusters_is_one_clear_error():
  config = ddm_digits.get_config()
  config.data.clusters = 0
  with pytest.raises(ConfigError) as e:
    trainer.Experiment(config, jax.devices()[:1])
  message = str(e.value)
  assert "\n" not in message
  assert "task 'flow_router'" in message and "config.data.clusters" in message, message
  config.data.clusters = 4  # the same config with clusters builds, with a cluster label in its batches
  assert trainer.Experiment(config, jax.devices()[:1]).batch_spec["cluster"].shape == (64,)


def test_flow_router_num_experts_must_be_the_data_clusters():
  config = ddm_digits.get_config()
  assert config.data.clusters == config.model.num_experts == 4
  for num_experts in (3, 5):
    config.model.num_experts = num_experts
    message = rf"^config\.model\.num_experts={num_experts} is invalid; allowed: config\.data\.clusters=4 "
    with pytest.raises(ConfigError, match=message):
      engine_config.validate_config(config)
    with pytest.raises(ConfigError, match=message):  # train.py / evaluate.py build an Experiment
      trainer.Experiment(config, jax.devices()[:1])
  config.data.clusters = 5  # equal again: valid
  assert engine_config.validate_config(config)["clusters"] == 5


def test_an_unconditional_dit_of_a_labelled_dataset_is_a_valid_config():
  config = ddm_digits.get_config("expert")  # digits: 10 classes
  config.model.num_classes = 5  # a conditional model with fewer classes than the dataset is still refused
  with pytest.raises(ConfigError, match=r"^config\.model\.num_classes=5 is invalid; allowed: >= 10, the num_classes"):
    engine_config.validate_config(config)
  # --config.model.num_classes=0 --config.task_options.num_classes=0: an unconditional DiT on the digits.
  config.model.num_classes = config.task_options.num_classes = 0
  assert engine_config.validate_config(config)["num_classes"] == 10
  exp = trainer.Experiment(config, jax.devices()[:1])
  assert exp.task.num_classes == 0
  params = exp.abstract_state()[0].params
  assert "class_embed" not in params and "output" in params, sorted(params)  # no label embedding


# --- train.py / evaluate.py ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """The workdirs of two tiny experts (clusters 0 and 1 of 2) and a tiny router, trained by train.py's `train` on
  the configs its command lines give, plus
  'unconditional_1': expert_1's run whose config.json says it was trained unconditionally (task_options.num_classes=0;
  the evaluator compares the runs' configs before it reads a checkpoint, so no third expert is trained)."""
  root = tmp_path_factory.mktemp("ddm")
  dirs = {name: root / name for name in ("expert_0", "expert_1", "router", "unconditional_1")}
  commands = {"expert_0": _expert(0), "expert_1": _expert(1), "router": ROUTER}
  for name, args in commands.items():  # train.py's train() in this process, on one device as in the subprocesses
    trainer.train(train_config(*args), str(dirs[name]), devices=jax.devices()[:1], progress=False)
  shutil.copytree(dirs["expert_1"], dirs["unconditional_1"])
  config = json.loads((dirs["unconditional_1"] / "config.json").read_text())
  assert config["task_options"]["num_classes"] == 10
  config["task_options"]["num_classes"] = 0
  (dirs["unconditional_1"] / "config.json").write_text(json.dumps(config))
  return dirs


def _expert_runs(*paths):
  return f"--config.flow_eval.expert_runs={tuple(str(p) for p in paths)!r}"


def _evaluate(runs, *paths):
  router = runs["router"]
  args = [*ROUTER, f"--workdir={router}", "--config.evals=('ddm_ensemble',)", _expert_runs(*paths)]
  return _start("evaluate.py", *args)


def test_trained_runs_read_their_clusters(runs):
  for name, cluster in (("expert_0", 0), ("expert_1", 1), ("router", -1)):
    config = writers.read_config(runs[name])
    assert (config.data.clusters, config.data.cluster) == (2, cluster), name
    records = writers.read_metrics(runs[name])
    assert records[-1]["step"] == 4 and np.isfinite(records[-1]["eval_loss"]), records
  assert "eval_accuracy" in writers.read_metrics(runs["router"])[-1]  # the router classifies the cluster


def test_ddm_ensemble_samples_with_both_modes(runs):
  returncode, stdout, stderr = _finish({"eval": _evaluate(runs, runs["expert_0"], runs["expert_1"])})["eval"]
  assert returncode == 0, stderr[-3000:]
  last = json.loads(stdout.strip().splitlines()[-1])
  router = runs["router"]
  assert last["step"] == 4
  assert json.loads((router / "eval_4.json").read_text()) == last
  for mode in ddm_ensemble.MODES:
    grid = last[f"ddm_{mode}"]
    assert grid == str(router / f"ddm_{mode}_4.png")
    with open(grid, "rb") as f:
      assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert f"ddm_{mode}_fd" not in last  # no classifier_run: no distance
  # FLOPs: the velocity evaluations of one expert per sample (top-1) or all 2 (mixture), plus the router once per step.
  top1, mixture = last["ddm_top1_flops_per_sample"], last["ddm_mixture_flops_per_sample"]
  assert mixture > top1 > 0
  expert = build_model(writers.read_config(runs["expert_0"]).model).flops_per_sample()
  router_flops = build_model(writers.read_config(router).model).flops_per_sample()
  evaluations = SAMPLE_STEPS * 2  # euler steps x 2 for classifier-free guidance (scale 2, 10 classes)
  assert top1 == pytest.approx(expert * evaluations + router_flops * SAMPLE_STEPS)
  assert mixture == pytest.approx(2 * expert * evaluations + router_flops * SAMPLE_STEPS)


def test_expert_runs_that_do_not_fit_the_router_are_one_line(runs):
  results = _finish(
    {
      "one_run": _evaluate(runs, runs["expert_0"]),
      "conditioning": _evaluate(runs, runs["expert_0"], runs["unconditional_1"]),
    }
  )
  line = _one_error_line(results["one_run"])
  assert "config.flow_eval.expert_runs names 1 runs" in line and "config.data.clusters=2" in line, line
  line = _one_error_line(results["conditioning"])
  assert str(runs["unconditional_1"]) in line and "conditioning" in line, line


def test_load_experts_names_the_run_that_does_not_fit(runs, tmp_path):
  exp = trainer.Experiment(writers.read_config(runs["router"]), jax.devices()[:1])
  e0, e1, router = runs["expert_0"], runs["expert_1"], runs["router"]
  missing = tmp_path / "missing"
  cases = [
    ((e0, e1, e1), r"names 3 runs but the router routes between config.data.clusters=2 clusters"),
    ((e1, e0), rf"{re.escape(str(e1))} was trained on cluster 1, listed as expert 0"),
    ((e0, e0), rf"{re.escape(str(e0))} was trained on cluster 0, listed as expert 1"),
    ((e0, router), rf"{re.escape(str(router))} trains task 'flow_router', not flow_matching"),
    ((e0, missing), rf"no config.json in {re.escape(str(missing))}"),
    ((e0, runs["unconditional_1"]), rf"{re.escape(str(runs['unconditional_1']))} differs from {re.escape(str(e0))}"),
  ]
  for expert_runs, message in cases:
    with pytest.raises(ConfigError, match=r"config.flow_eval.expert_runs.*" + message):
      ddm_ensemble.load_experts(exp, expert_runs, 2)

  # An expert of another architecture (its config.json says so) is refused before its checkpoint is read.
  wider = tmp_path / "wider"
  shutil.copytree(e1, wider)
  config = json.loads((wider / "config.json").read_text())
  config["model"]["embed_dim"] = 32
  (wider / "config.json").write_text(json.dumps(config))
  with pytest.raises(ConfigError, match=rf"{re.escape(str(wider))} differs from .* model or task options"):
    ddm_ensemble.load_experts(exp, (e0, wider), 2)

  # Experts that make images of another shape than the router sees (here: a router of 16x16 images).
  exp.info = {**exp.info, "image_shape": (16, 16, 1)}
  with pytest.raises(ConfigError, match=rf"{re.escape(str(e0))} makes images of shape \(8, 8, 1\), the router sees"):
    ddm_ensemble.load_experts(exp, (e0, e1), 2)


def _with_config(run, path, edit):
  """`path`: a run directory holding `run`'s config.json edited by `edit(config dict)` and no checkpoint: the
  evaluator checks an expert's config before it reads its checkpoint (listed first, no run's checkpoint is read)."""
  config = json.loads((run / "config.json").read_text())
  edit(config)
  path.mkdir()
  (path / "config.json").write_text(json.dumps(config))
  return path


def test_load_experts_refuses_an_expert_of_another_partition(runs, tmp_path):
  exp = trainer.Experiment(writers.read_config(runs["router"]), jax.devices()[:1])
  e0, e1 = runs["expert_0"], runs["expert_1"]
  router_partition = re.escape("the router's is {'name': 'digits', 'data_dir': None, 'train_split': 'train'} into 2")
  cases = {  # expert_0's run, trained on cluster 0 of ...
    "four_clusters": (
      {"clusters": 4},
      re.escape("{'name': 'digits', 'data_dir': None, 'train_split': 'train'} into 4 clusters"),
    ),
    "half_split": (
      {"train_split": "train[:50%]"},
      re.escape("{'name': 'digits', 'data_dir': None, 'train_split': 'train[:50%]'} into 2"),
    ),
    "other_dataset": (
      {"name": "mnist"},
      re.escape("{'name': 'mnist', 'data_dir': None, 'train_split': 'train'} into 2 clusters"),
    ),
  }
  for name, (data, partition_text) in cases.items():
    run = _with_config(e0, tmp_path / name, lambda c, data=data: c["data"].update(data))
    message = rf"^config\.flow_eval\.expert_runs: {re.escape(str(run))} was trained on a partition of {partition_text}"
    with pytest.raises(ConfigError, match=message + ".*" + router_partition):
      ddm_ensemble.load_experts(exp, (run, e1), 2)

  # An expert trained on the whole split (no partition) fits any cluster of the router's partition.
  whole = tmp_path / "whole"
  shutil.copytree(e1, whole)
  config = json.loads((whole / "config.json").read_text())
  config["data"].update(clusters=0, cluster=-1)
  (whole / "config.json").write_text(json.dumps(config))
  experts, stacked = ddm_ensemble.load_experts(exp, (e0, whole), 2)
  assert experts.config.data.cluster == 0 and {x.shape[0] for x in jax.tree.leaves(stacked)} == {2}


@pytest.mark.parametrize(
  "edit, error",
  [
    (lambda c: c["task_options"].update(num_classes=5), r"config\.task_options\.num_classes=5 but the dataset has 10"),
    (lambda c: c["model"].update(num_classes=5), r"config\.model\.num_classes=5 is invalid; allowed: >= 10"),
    (lambda c: c["model"].update(name="simplenet"), r"config\.model\.channels is not a field of model 'simplenet'"),
  ],
  ids=["task_num_classes", "model_num_classes", "model_name"],
)
def test_load_experts_names_the_run_whose_config_does_not_build(runs, tmp_path, edit, error):
  exp = trainer.Experiment(writers.read_config(runs["router"]), jax.devices()[:1])
  run = _with_config(runs["expert_0"], tmp_path / "bad", edit)
  with pytest.raises(ConfigError, match=rf"^config\.flow_eval\.expert_runs: {re.escape(str(run))}: {error}"):
    ddm_ensemble.load_experts(exp, (run, runs["expert_1"]), 2)


def test_load_experts_compares_an_unconditional_dit_expert(runs, tmp_path):
  # model.num_classes = 0 (no class embedding) builds now, so the expert reaches the ensemble's architecture check.
  exp = trainer.Experiment(writers.read_config(runs["router"]), jax.devices()[:1])
  e0 = runs["expert_0"]

  def unconditional(config):
    config["model"]["num_classes"] = config["task_options"]["num_classes"] = 0

  run = _with_config(runs["expert_1"], tmp_path / "unconditional_dit", unconditional)
  message = rf"^config\.flow_eval\.expert_runs: {re.escape(str(run))} differs from {re.escape(str(e0))} .*conditioning"
  with pytest.raises(ConfigError, match=message):
    ddm_ensemble.load_experts(exp, (e0, run), 2)


def test_load_experts_stacks_the_runs_in_cluster_order(runs):
  exp = trainer.Experiment(writers.read_config(runs["router"]), jax.devices()[:1])
  experts, stacked = ddm_ensemble.load_experts(exp, (runs["expert_0"], runs["expert_1"]), 2)
  assert experts.task.num_classes == 10
  for k in range(2):
    one = trainer.Experiment(writers.read_config(runs[f"expert_{k}"]), jax.devices()[:1])
    _, state, _ = trainer.restore_run(one, runs[f"expert_{k}"])
    for a, b in zip(jax.tree.leaves(jax.device_get(state.variables())), jax.tree.leaves(stacked), strict=True):
      np.testing.assert_array_equal(b[k], a)
  differs = [not np.array_equal(x[0], x[1]) for x in jax.tree.leaves(stacked)]
  assert any(differs)  # two runs on two clusters, not one run twice
