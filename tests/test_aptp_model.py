"""APTP on the flow-matching DiT (papers.md D2): the 'aptp' model (`zoo.models.aptp`: the gate layout, the student
against a plain DiT and the teacher, evaluation / fine-tuning gates, what the gradients reach), the 'aptp' task
(`zoo.tasks.aptp`: captions, prompt embeddings, strokes, loss) and the recipe of `configs/aptp_digits.py` through
train.py and evaluate.py (prune from a tiny flow_digits run, fine-tune, sample). The router's own pieces (Sinkhorn,
Gumbel-sigmoid, losses) are in test_aptp.py."""

import contextlib
import io
import json
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import train_config
from zoo.engine import trainer, writers
from zoo.flow import aptp as aptp_flow
from zoo.layers import count_params
from zoo.models import ConfigError, build_model
from zoo.models.dit import DiT
from zoo.tasks import aptp as aptp_task, get_task

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# One CPU device, as on a user's machine (the suite forces 8): the subprocesses compile and run in less time.
ENV = {**os.environ, "XLA_FLAGS": re.sub(r"device_count=\d+", "device_count=1", os.environ["XLA_FLAGS"])}

SIZES = dict(embed_dim=16, num_layers=2, num_heads=2, frequency_dim=16)
L, H, M = SIZES["num_layers"], SIZES["num_heads"], 4 * SIZES["embed_dim"]  # mlp_ratio 4: 64 units per layer
TINY_DIT = dict(SIZES, image_size=8, channels=1, patch_size=2, num_classes=10)
TINY_APTP = dict(TINY_DIT, name="aptp")
PROMPT_DIM = len(aptp_task.VOCABULARY)
BATCH = 8
INK = (0.288, 0.321)  # the task's default ink_thresholds


def _inputs(batch=BATCH):
  images = jax.random.uniform(jax.random.key(0), (batch, 8, 8, 1))
  labels = jnp.arange(batch, dtype=jnp.int32) % 10
  prompts = aptp_task.prompt_embedding(labels, jnp.arange(batch, dtype=jnp.int32) % 3)
  return {"images": 2.0 * images - 1.0, "t": jnp.linspace(0.1, 0.9, batch), "labels": labels, "prompts": prompts}


def _perturb(tree, seed, scale=0.3):
  """Every leaf plus Gaussian noise: the zero-initialised modulations and output layer then matter."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


def _router_output(model, variables, inputs, **kw):
  """(model outputs, ModelOutput, the PromptRouter's output dict) of one apply."""
  (outputs, out), state = model.apply(
    variables, **inputs, **kw, capture_intermediates=lambda m, _: isinstance(m, aptp_flow.PromptRouter)
  )
  return outputs, out, state["intermediates"]["router"]["__call__"][0]


@pytest.fixture(scope="module")
def tiny():
  """(model, variables): the tiny APTP at its initialisation (student, teacher and router), with the student and
  the teacher perturbed apart (so their velocities are not the zero of adaLN-Zero and differ from each other)."""
  model = build_model(TINY_APTP)
  variables = model.init({"params": jax.random.key(1), "dropout": jax.random.key(2)}, **_inputs(), distill=True)
  params = dict(nn.meta.unbox(variables["params"]))
  params["student"] = _perturb(params["student"], 3)
  params["teacher"] = _perturb(params["teacher"], 4)
  return model, {"params": params}


# --- the model ------------------------------------------------------------------------------------------------------


def test_layer_gates_follow_the_router_layout(tiny):
  model, _ = tiny
  assert model.mlp_dim == M and model.width_groups == (H,) * L + (M,) * L
  assert model.num_gates == L * (H + M) + L  # + one depth (block) gate per layer, the router's trailing gates
  flat = jnp.arange(model.num_gates, dtype=jnp.float32)[None] + 1000.0 * jnp.arange(2, dtype=jnp.float32)[:, None]
  per_layer = model.layer_gates(flat)
  assert len(per_layer) == L
  for i, g in enumerate(per_layer):
    assert set(g) == {"heads", "mlp", "block"}
    for b in range(2):
      np.testing.assert_array_equal(g["heads"][b], 1000 * b + i * H + np.arange(H))
      np.testing.assert_array_equal(g["mlp"][b], 1000 * b + L * H + i * M + np.arange(M))
      assert float(g["block"][b]) == 1000 * b + L * (H + M) + i


def test_open_gates_give_the_plain_dit_and_the_teacher(tiny):
  model, variables = tiny
  inputs = _inputs()
  outputs, out, route = _router_output(model, variables, inputs, distill=True)
  # Offset 3: at initialisation every gate of every code is open (evaluation gates, no noise).
  np.testing.assert_array_equal(route["gates"], 1.0)
  np.testing.assert_array_equal(route["code_gates"], 1.0)
  np.testing.assert_array_equal(outputs["flops_ratio"], 1.0)
  assert float(out.metrics["flops_ratio"]) == 1.0
  assert outputs["code"].shape == (BATCH,) and outputs["code"].dtype == jnp.int32
  plain = DiT(**TINY_DIT)
  student, _ = plain.apply(
    {"params": variables["params"]["student"]}, inputs["images"], t=inputs["t"], labels=inputs["labels"]
  )
  assert float(jnp.abs(student).max()) > 0.1
  np.testing.assert_allclose(outputs["velocity"], student, rtol=1e-5, atol=1e-6)
  # The teacher output is the unpruned DiT on the teacher's parameters (here different from the student's) ...
  teacher, _ = plain.apply(
    {"params": variables["params"]["teacher"]}, inputs["images"], t=inputs["t"], labels=inputs["labels"]
  )
  np.testing.assert_allclose(outputs["teacher"], teacher, rtol=1e-5, atol=1e-6)
  assert not np.allclose(outputs["teacher"], outputs["velocity"], atol=1e-3)
  # ... and with the student's parameters as the teacher's, the open student is the teacher.
  same = {"params": {**variables["params"], "teacher": variables["params"]["student"]}}
  outputs, _ = model.apply(same, **inputs, distill=True)
  np.testing.assert_allclose(outputs["velocity"], outputs["teacher"], rtol=1e-5, atol=1e-6)
  # With gates the flat vector of ones, the DiT itself is unchanged.
  ones = model.layer_gates(jnp.ones((BATCH, model.num_gates)))
  gated, _ = plain.apply(
    {"params": variables["params"]["student"]}, inputs["images"], t=inputs["t"], labels=inputs["labels"], gates=ones
  )
  np.testing.assert_allclose(gated, student, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(model.flops_ratio(jnp.ones((BATCH, model.num_gates))), 1.0, rtol=1e-6)


def test_closed_gates_shrink_the_flops_ratio_by_their_share(tiny):
  model, _ = tiny
  flops = DiT(**TINY_DIT).flops_per_sample()
  assert model.flops_per_sample() == flops
  gates = np.ones((3, model.num_gates), np.float32)
  gates[1, L * (H + M)] = 0.0  # block 0 removed
  gates[2, L * H : L * H + M // 2] = 0.0  # half the MLP units of layer 0
  ratio = np.asarray(model.flops_ratio(jnp.asarray(gates)))
  e, n = SIZES["embed_dim"], 16  # 16 tokens of 2x2 pixels; FLOPs = 2 x multiply-adds, the MLP's two matmuls
  block = 2 * (6 * e * e + 4 * n * e * e + 2 * n * n * e + 2 * n * e * M)
  np.testing.assert_allclose(ratio, [1.0, 1.0 - block / flops, 1.0 - 4 * n * e * (M // 2) / flops], rtol=1e-6)


def test_distill_false_has_no_teacher_output(tiny):
  model, variables = tiny
  outputs, out = model.apply(variables, **_inputs())
  assert set(outputs) == {"velocity", "code", "flops_ratio"}
  assert outputs["velocity"].shape == (BATCH, 8, 8, 1)
  assert set(out.metrics) == {"resource_loss", "contrastive_loss", "flops_ratio", "codes_used"}
  assert "teacher" in model.apply(variables, **_inputs(), distill=True)[0]


@pytest.mark.parametrize("shape", [(BATCH, PROMPT_DIM - 1), (BATCH + 1, PROMPT_DIM), (BATCH * PROMPT_DIM,)])
def test_prompts_of_the_wrong_shape_are_a_value_error(tiny, shape):
  model, variables = tiny
  inputs = {**_inputs(), "prompts": jnp.ones(shape)}
  with pytest.raises(ValueError, match=rf"prompts must be \[batch, prompt_dim\] = \[{BATCH}, {PROMPT_DIM}\]"):
    model.apply(variables, **inputs)


def test_frozen_architecture_trains_under_the_evaluation_gates(tiny):
  _, variables = tiny
  # Offset 0: the gates of the codes differ and the Gumbel noise flips some, so training gates are not evaluation's.
  loose = build_model(dict(TINY_APTP, offset=0.0))
  frozen = build_model(dict(TINY_APTP, offset=0.0, freeze_architecture=True))
  inputs = _inputs()
  rngs = {"dropout": jax.random.key(5)}
  evaluation, _, eval_route = _router_output(loose, variables, inputs)
  assert 0.0 < float(jnp.mean(eval_route["gates"])) < 1.0
  train, _, train_route = _router_output(loose, variables, inputs, deterministic=False, rngs=rngs)
  assert not np.array_equal(train_route["gates"], eval_route["gates"])  # the control: training gates differ
  for deterministic in (True, False):
    outputs, out, route = _router_output(frozen, variables, inputs, deterministic=deterministic, rngs=rngs)
    np.testing.assert_array_equal(outputs["code"], evaluation["code"])
    np.testing.assert_array_equal(route["gates"], eval_route["gates"])
    np.testing.assert_array_equal(outputs["flops_ratio"], evaluation["flops_ratio"])
    np.testing.assert_allclose(outputs["velocity"], evaluation["velocity"], rtol=1e-6, atol=1e-6)
    assert float(out.aux_loss) == 0.0
  assert float(loose.apply(variables, **inputs, deterministic=False, rngs=rngs)[1].aux_loss) > 0.0


def test_training_gradients_reach_the_router_but_not_through_the_teacher(tiny):
  _, variables = tiny
  # Offset 0, so that the codes' gates and the samples' FLOPs ratios differ.
  model = build_model(dict(TINY_APTP, offset=0.0))
  inputs = _inputs()
  rngs = {"dropout": jax.random.key(6)}

  def aux(p):
    return model.apply({"params": p}, **inputs, deterministic=False, rngs=rngs)[1].aux_loss

  def output(p, key):
    return jnp.sum(model.apply({"params": p}, **inputs, distill=True, deterministic=False, rngs=rngs)[0][key] ** 2)

  value, g_aux = jax.jit(jax.value_and_grad(aux))(variables["params"])
  assert np.isfinite(float(value)) and float(value) > 0
  for name in ("codes", "predictor"):  # the resource loss through the codes' gates, the contrastive loss through both
    for leaf in jax.tree.leaves(g_aux["router"][name]):
      assert np.all(np.isfinite(leaf)) and float(jnp.abs(leaf).max()) > 0, name
  for leaf in jax.tree.leaves({k: g_aux[k] for k in ("student", "teacher")}):
    np.testing.assert_array_equal(leaf, 0.0)
  # The teacher's output is a stop_gradient: a loss on it reaches no parameter (the student's, the teacher's own or
  # the router's); the same loss on the student's velocity reaches the student.
  g_teacher = jax.jit(jax.grad(lambda p: output(p, "teacher")))(variables["params"])
  for leaf in jax.tree.leaves(g_teacher):
    np.testing.assert_array_equal(leaf, 0.0)
  g_student = jax.jit(jax.grad(lambda p: output(p, "velocity")))(variables["params"])
  assert float(jnp.abs(g_student["student"]["output"]["kernel"]).max()) > 0


def test_training_gradient_at_initialisation_is_finite(tiny):
  """At initialisation (offset 3) every gate is open and every sample's FLOPs ratio is 1: the std term of the
  resource loss must still give a finite gradient (sqrt'(0) is infinite)."""
  model, variables = tiny
  inputs = _inputs()

  def aux(p):
    return model.apply({"params": p}, **inputs, deterministic=False, rngs={"dropout": jax.random.key(6)})[1].aux_loss

  value, g = jax.jit(jax.value_and_grad(aux))(variables["params"])
  assert np.isfinite(float(value))
  for leaf in jax.tree.leaves(g["router"]):
    assert np.all(np.isfinite(leaf))


# --- the task -------------------------------------------------------------------------------------------------------


def test_prompt_embedding_is_the_bag_of_words_of_the_caption():
  labels, stroke_ids = np.meshgrid(np.arange(10), np.arange(3), indexing="ij")
  labels, stroke_ids = labels.reshape(-1).astype(np.int32), stroke_ids.reshape(-1).astype(np.int32)
  embedded = np.asarray(aptp_task.prompt_embedding(jnp.asarray(labels), jnp.asarray(stroke_ids)))
  assert embedded.shape == (30, PROMPT_DIM) and embedded.dtype == np.float32
  captions = [aptp_task.caption(label, stroke) for label, stroke in zip(labels, stroke_ids)]
  assert captions[3 * 7 + 2] == "a bold handwritten seven" and captions[0] == "a thin handwritten zero"
  assert len(set(captions)) == 30
  np.testing.assert_allclose(embedded, np.stack([aptp_task.bag_of_words(c) for c in captions]), rtol=1e-6)
  np.testing.assert_allclose(np.linalg.norm(embedded, axis=1), 1.0, rtol=1e-6)
  with pytest.raises(ValueError, match="'blue'"):
    aptp_task.bag_of_words("a blue handwritten seven")


def test_strokes_threshold_the_mean_ink():
  def image(ink):  # mean ink `ink`: half the pixels at 2 * ink, half at 0
    return np.concatenate([np.full((32,), 2 * ink), np.zeros((32,))]).reshape(8, 8, 1)

  inks = [0.0, 0.2, 0.28, 0.30, 0.32, 0.33, 0.45]
  images = jnp.asarray(np.stack([image(x) for x in inks]), jnp.float32)
  np.testing.assert_array_equal(aptp_task.strokes(images, INK), [0, 0, 0, 1, 1, 2, 2])
  np.testing.assert_array_equal(aptp_task.strokes(images, (0.1, 0.31)), [0, 1, 1, 1, 2, 2, 2])
  assert aptp_task.strokes(images, INK).dtype == jnp.int32


def test_batch_spec_refuses_bad_options():
  info = {"format": "images", "num_classes": 10, "image_shape": (8, 8, 1)}
  spec = get_task("aptp", {"num_classes": 10}).batch_spec(info, None, 4)
  assert {"image", "label", "weight"} <= set(spec)
  cases = [
    ({"distill_weight": -0.1}, r"config\.task_options\.distill_weight=-0\.1; allowed: >= 0"),
    ({"ink_thresholds": (0.3,)}, r"config\.task_options\.ink_thresholds=\(0\.3,\); allowed: 2 increasing numbers"),
    ({"ink_thresholds": (0.1, 0.2, 0.3)}, r"config\.task_options\.ink_thresholds=\(0\.1, 0\.2, 0\.3\); allowed: 2"),
    ({"ink_thresholds": (0.3, 0.2)}, r"config\.task_options\.ink_thresholds=\(0\.3, 0\.2\); allowed: 2 increasing"),
  ]
  for options, message in cases:
    with pytest.raises(ConfigError, match=message):
      get_task("aptp", {"num_classes": 10, **options}).batch_spec(info, None, 4)
  with pytest.raises(ConfigError, match="captions the 10 digits; the dataset has 5 classes"):
    get_task("aptp", {"num_classes": 5}).batch_spec({**info, "num_classes": 5}, None, 4)


def test_prepare_feeds_the_captions_and_asks_for_the_teacher():
  task = get_task("aptp", {"num_classes": 10, "class_dropout": 0.0})
  images = jax.random.uniform(jax.random.key(0), (6, 8, 8, 1)) * jnp.linspace(0.2, 1.0, 6)[:, None, None, None]
  batch = {"image": images, "label": jnp.arange(6, dtype=jnp.int32)}
  rngs = {"noise": jax.random.key(1), "time": jax.random.key(2), "guidance": jax.random.key(3)}
  inputs, targets = task.prepare(batch, rngs)
  assert inputs["distill"] is True
  expected = aptp_task.prompt_embedding(batch["label"], aptp_task.strokes(images, INK))
  np.testing.assert_array_equal(inputs["prompts"], expected)
  assert len(set(np.asarray(aptp_task.strokes(images, INK)).tolist())) > 1  # the batch has several stroke words
  np.testing.assert_array_equal(inputs["labels"], batch["label"])
  assert targets["velocity"].shape == images.shape


def test_stats_and_finalize_add_the_weighted_distillation():
  task = get_task("aptp", {"num_classes": 10, "distill_weight": 0.5})
  rng = np.random.default_rng(0)
  velocity, target, teacher = (rng.normal(size=(3, 8, 8, 1)).astype(np.float32) for _ in range(3))
  outputs = {"velocity": velocity, "teacher": teacher, "flops_ratio": np.array([0.5, 0.7, 0.1], np.float32)}
  weight = np.array([1.0, 1.0, 0.0], np.float32)  # the last row is padding
  sums = task.stats(outputs, {"velocity": target}, {"weight": weight})
  result = task.finalize(jax.device_get(sums), {})
  flow = np.mean((velocity - target) ** 2, axis=(1, 2, 3))[:2].mean()
  distill = np.mean((velocity - teacher) ** 2, axis=(1, 2, 3))[:2].mean()
  assert result["flow_loss"] == pytest.approx(flow, rel=1e-5)
  assert result["distill_loss"] == pytest.approx(distill, rel=1e-5)
  assert result["loss"] == pytest.approx(flow + 0.5 * distill, rel=1e-5)
  assert result["flops_ratio"] == pytest.approx(0.6, rel=1e-6)


# --- train.py / evaluate.py -----------------------------------------------------------------------------------------

SAMPLE_STEPS = 2
TINY_RUN = [
  *(f"--config.model.{k}={v}" for k, v in SIZES.items()),
  "--config.train.batch_size=16",
  "--config.train.eval_batches=2",
  "--config.train.eval_every_steps=0",
  "--config.train.log_every_steps=2",
  "--config.checkpoint.every_steps=0",
  "--config.optimizer.warmup_steps=1",
  "--config.flow_eval.samples=20",
  f"--config.flow_eval.steps={SAMPLE_STEPS}",
  "--config.flow_eval.classifier_run=",
]
# Offset 0 instead of the configs' 3, so that after a few steps the pruned architectures differ from the unpruned one.
APTP_RUN = [*TINY_RUN, "--config.model.offset=0.0"]


def _start(script, *args):
  return subprocess.Popen(
    [sys.executable, script, *args], cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
  )


def _finish(process):
  stdout, stderr = process.communicate(timeout=600)
  return process.returncode, stdout, stderr


def _train_here(*args, workdir):
  """train.py's `train` of `train_config(*args)` in this process, on one device as in the subprocesses; its stdout."""
  out = io.StringIO()
  with contextlib.redirect_stdout(out):
    trainer.train(train_config(*args), str(workdir), devices=jax.devices()[:1], progress=False)
  return out.getvalue()


def _trained(result, name):
  returncode, stdout, stderr = result
  assert returncode == 0, f"{name}: {stderr[-3000:]}"
  return stdout


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  """{name: workdir} of a tiny flow_digits run (4 steps), the APTP prune run from it (4 steps), the fine-tuning run
  from that (2 steps), plus {name + '_stdout'} of each and 'bad_codes': the (returncode, stdout, stderr) of a
  fine-tuning run with 3 codes from the 8-code prune run."""
  root = tmp_path_factory.mktemp("aptp")
  dirs = {name: root / name for name in ("flow", "prune", "finetune", "bad_codes")}
  out = dict(dirs)
  # The flow and fine-tuning runs train in this process (a train.py subprocess re-imports jax and torch); the prune
  # run (its init_from a dict override), the refused fine-tuning run and evaluate.py run as a user runs them.
  flow = ["--config=configs/flow_digits.py", *TINY_RUN, "--config.train.steps=4"]
  out["flow_stdout"] = _train_here(*flow, workdir=dirs["flow"])
  init = repr({"student": str(dirs["flow"]), "teacher": str(dirs["flow"])})
  prune = _start(
    "train.py",
    "--config=configs/aptp_digits.py:prune",
    *APTP_RUN,
    "--config.train.steps=4",
    f"--config.init_from={init}",
    f"--workdir={dirs['prune']}",
  )
  out["prune_stdout"] = _trained(_finish(prune), "prune")
  finetune = [
    "--config=configs/aptp_digits.py:finetune",
    *APTP_RUN,
    "--config.train.steps=2",
    f"--config.init_from={dirs['prune']}",
  ]
  bad = _start("train.py", *finetune, "--config.model.num_codes=3", f"--workdir={dirs['bad_codes']}")
  out["finetune_stdout"] = _train_here(*finetune, workdir=dirs["finetune"])
  out["bad_codes"] = _finish(bad)
  out["finetune_args"] = finetune
  return out


def _parameters_line(stdout):
  """(trainable, frozen) of train.py's 'parameters: N trainable (...), M frozen (...)' line."""
  match = re.search(r"^parameters: (\d+) trainable \(.*\), (\d+) frozen \(", stdout, re.M)
  assert match, stdout
  return int(match.group(1)), int(match.group(2))


def _variables(run):
  exp = trainer.Experiment(writers.read_config(run), jax.devices()[:1])
  step, state, _ = trainer.restore_run(exp, run)
  return step, nn.meta.unbox(jax.device_get(state.variables()))["params"]


def _same(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True))


def test_prune_trains_the_router_and_finetune_the_student(runs, tiny):
  _, variables = tiny
  counts = {k: count_params(v) for k, v in variables["params"].items()}  # the same sizes as the runs
  assert counts["student"] == counts["teacher"] == DiT(**TINY_DIT).num_params()
  assert f"initialised {counts['student']} values of student from {runs['flow']}" in runs["prune_stdout"]
  assert f"initialised {counts['teacher']} values of teacher from {runs['flow']}" in runs["prune_stdout"]
  assert _parameters_line(runs["prune_stdout"]) == (counts["router"], counts["student"] + counts["teacher"])
  assert _parameters_line(runs["finetune_stdout"]) == (counts["student"], counts["router"] + counts["teacher"])
  # The checkpoints: prune kept the flow run's DiT as student and teacher, fine-tuning kept the router and the
  # teacher of the prune run and changed the student.
  flow_step, flow = _variables(runs["flow"])
  prune_step, prune = _variables(runs["prune"])
  finetune_step, finetune = _variables(runs["finetune"])
  assert (flow_step, prune_step, finetune_step) == (4, 4, 2)
  assert _same(prune["student"], flow) and _same(prune["teacher"], flow)
  assert _same(finetune["router"], prune["router"]) and _same(finetune["teacher"], flow)
  assert not _same(finetune["student"], flow)
  records = writers.read_metrics(runs["prune"])
  assert records[-1]["step"] == 4 and np.isfinite(records[-1]["loss"]) and np.isfinite(records[-1]["eval_loss"])


def test_evaluate_samples_the_finetuned_run(runs):
  workdir = runs["finetune"]
  returncode, stdout, stderr = _finish(_start("evaluate.py", *runs["finetune_args"], f"--workdir={workdir}"))
  assert returncode == 0, stderr[-3000:]
  last = json.loads(stdout.strip().splitlines()[-1])
  assert last["step"] == 2
  assert json.loads((workdir / "eval_2.json").read_text()) == last
  assert last["aptp_samples"] == str(workdir / "aptp_samples_2.png")
  with open(last["aptp_samples"], "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  assert "fd" not in last  # no classifier_run: no distance
  assert 0.0 < last["samples_flops_ratio"] <= 1.0 and 0.0 < last["flops_ratio"] <= 1.0 and last["codes_used"] >= 1
  assert np.isfinite(last["loss"]) and np.isfinite(last["distill_loss"])
  evaluations = SAMPLE_STEPS * 2  # euler steps x 2 for classifier-free guidance (scale 2, 10 classes)
  flops = build_model(writers.read_config(workdir).model).flops_per_sample()
  assert flops == DiT(**TINY_DIT).flops_per_sample()
  assert last["flops_per_sample"] == pytest.approx(last["samples_flops_ratio"] * flops * evaluations, rel=1e-6)
  strokes = [last[f"samples_flops_ratio_{w}"] for w in aptp_task.STROKES if f"samples_flops_ratio_{w}" in last]
  assert strokes and all(0.0 < r <= 1.0 for r in strokes)


def test_finetune_from_a_prune_run_with_other_codes_is_one_line(runs):
  returncode, _, stderr = runs["bad_codes"]
  lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith("train:")]
  assert returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), stderr[-3000:]
  assert "Traceback" not in stderr
  assert "router.codes" in lines[0] and "(8, " in lines[0] and "(3, " in lines[0], lines[0]
