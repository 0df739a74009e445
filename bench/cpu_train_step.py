"""CPU train step of the zoo's small LMs against the same model in plain JAX and in transformers + PyTorch, with
per-op time from profiles, in one run.

For each model (`dense`: `configs/dense_lm.py`'s model; `moe`: `configs/moe_mixtral.py`'s), three implementations
start from the SAME weights (the zoo's initial parameters, exported through the zoo's Hugging Face mapping) and train
on the same batch:

- `zoo`: the engine's own train step (`Experiment.compile_train_step`: jitted, state donated) on one CPU device.
- `jax_minimal`: a hand-written pure-JAX Llama / Mixtral step below (no Flax, no engine), the peer that shows what
  plain XLA gives: `optax.chain(clip_by_global_norm, adamw)` with the zoo's optimizer values (at a constant learning
  rate), jitted with the parameters and optimizer state donated. Its MoE layer runs the dispatch the zoo's CPU path
  runs ('capacity': per-expert buffers of `ceil(capacity_factor * tokens * k / E)` slots filled in priority order,
  one batched einsum per projection, overflow dropped), with the zoo's load-balance and z losses.
- `torch`: transformers' `LlamaForCausalLM` / `MixtralForCausalLM` (attn_implementation='sdpa', float32, train
  mode), `torch.optim.AdamW` (weight decay on matrices only, as the zoo) + `clip_grad_norm_`; the Mixtral also adds
  its router load-balance loss at the zoo's coefficient (it has no z-loss). The HF config is the zoo's export mapping
  (`zoo.checkpoints.hf.hf_config_from_model_config`) for the MoE; for the dense LM it is `llama_config` below:
  vocab_size, hidden_size = embed_dim, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
  intermediate_size = mlp_dim, rms_norm_eps = norm_epsilon, rope_theta, tie_word_embeddings = tie_embeddings.

The data are random tokens (one fixed batch of `--batch` x `--seq`), float32 everywhere. Timing: after `--warmup`
rounds, `--steps` interleaved rounds (zoo, jax_minimal, torch train steps, then their forwards); each figure is the
median per-step wall time. Forward = the jitted loss (jax) / a `torch.no_grad()` forward with the loss (torch). The
initial cross-entropy of the three on the same batch is printed as a check that they compute the same model.

`--profile DIR` then profiles a few train steps of each implementation and prints per-op time grouped into the
CATEGORIES below: the two jax steps under `jax.profiler.trace(DIR/<model>_jax)` (the `.xplane.pb` is read back with
`jax.profiler.ProfileData`: XLA's CPU runtime records one event per HLO op), each op put in a category by its opcode
and by the source location XLA keeps in the optimized HLO (written to DIR as `<model>_<impl>.hlo.txt`); torch under
`torch.profiler.profile` (its `key_averages()` table, a chrome trace in DIR, and the same categories from the op
names plus record_function scopes put around the HF RMSNorms, RoPE and MoE blocks; backward ops follow their forward
op's scope through the autograd sequence number). A row of the category table singles out the XLA fusions that both
compute and transpose their result (one loop over the transposed output: every input read with a stride). An HLO
census of the two jax steps (op counts, matmul FLOPs, XLA's cost analysis, donated buffers) comes with it.

  .venv/bin/python bench/cpu_train_step.py [--models dense,moe] [--batch 32] [--seq 128] [--steps 20] [--warmup 3]
      [--profile DIR] [--small]
"""

import argparse
import collections
import contextlib
import dataclasses
import functools
import glob
import json
import math
import os
import re
import statistics
import sys
import tempfile
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import torch
import transformers

from configs.dense_lm import get_config as dense_lm_config
from configs.moe_mixtral import get_config as moe_mixtral_config
from zoo.checkpoints import hf as zoo_hf, hf_spec, safetensors_io, zoo_tree
from zoo.engine import partition, sharding
from zoo.engine.trainer import Experiment
from zoo.models.registry import model_fields

MODELS = {"dense": dense_lm_config, "moe": moe_mixtral_config}
CATEGORIES = (
  "matmul (dot)",
  "attention dots (QK^T, PV)",
  "attention softmax/masking",
  "RoPE",
  "norms",
  "optimizer update",
  "copies/transposes",
  "MoE dispatch (router, gather/scatter/sort)",
  "other (embedding, loss, activations, adds)",
)
MATMUL, ATTN_DOTS, SOFTMAX, ROPE, NORMS, OPTIMIZER, COPIES, DISPATCH, OTHER = CATEGORIES
ATTN_CORE = "attention core"  # a source category only: split into ATTN_DOTS / SOFTMAX by opcode


# --------------------------------------------------------------------------------------------- the minimal JAX model


@dataclasses.dataclass(frozen=True)
class Shape:
  """The model shape and losses, read from the zoo model (`shape_of`)."""

  vocab: int
  layers: int
  embed: int
  heads: int
  kv_heads: int
  head_dim: int
  mlp: int
  rope_theta: float
  eps: float
  tied: bool
  experts: int = 0  # 0 = dense FFN
  top_k: int = 0
  capacity_factor: float = 0.0
  load_balance_coef: float = 0.0
  z_loss_coef: float = 0.0


def shape_of(model):
  """The `Shape` of a zoo `dense_lm` or every-layer-MoE `moe_lm` (softmax top-k, no shared experts); refuses options
  the minimal model and the HF mapping here do not have."""
  unsupported = {
    "attention": model.attention != "gqa",
    "mlp_activation": model.mlp_activation != "swiglu",
    "rope_scaling": model.rope_scaling is not None,
    "sliding_window": model.sliding_window is not None,
    "qk_norm": model.qk_norm,
    "qkv_bias": model.qkv_bias,
  }
  moe = hasattr(model, "num_experts")
  if moe:
    unsupported.update(
      router=model.router != "softmax_topk" or not model.renormalize or model.router_jitter != 0,
      router_options=model.n_group != 1 or model.routed_scaling_factor != 1 or model.per_sequence_balance,
      layout=model.moe_every != 1 or model.first_dense_layers != 0 or model.num_shared_experts != 0,
      dispatch=model.dispatch not in ("auto", "capacity") or jax.default_backend() != "cpu",
    )
  bad = [k for k, v in unsupported.items() if v]
  if bad:
    raise SystemExit(f"cpu_train_step: the model sets {bad}, which this benchmark's minimal model does not have")
  shape = Shape(
    vocab=model.vocab_size,
    layers=model.num_layers,
    embed=model.embed_dim,
    heads=model.num_heads,
    kv_heads=model.resolved_kv_heads,
    head_dim=model.resolved_head_dim,
    mlp=model.mlp_dim,
    rope_theta=float(model.rope_theta),
    eps=float(model.norm_epsilon),
    tied=bool(model.tie_embeddings),
  )
  if not moe:
    return shape
  return dataclasses.replace(
    shape,
    mlp=model.expert_mlp_dim,
    experts=model.num_experts,
    top_k=model.num_experts_per_tok,
    capacity_factor=float(model.capacity_factor),
    load_balance_coef=float(model.load_balance_coef),
    z_loss_coef=float(model.z_loss_coef),
  )


def rms_norm(x, scale, eps):
  return x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps) * scale


def rope_tables(seq, head_dim, theta):
  """sin, cos [seq, 1, head_dim / 2] for positions 0..seq-1."""
  angles = jnp.arange(seq, dtype=jnp.float32)[:, None] / theta ** (jnp.arange(0, head_dim, 2) / head_dim)
  return jnp.sin(angles)[:, None], jnp.cos(angles)[:, None]


def rope(x, sin, cos):
  """x [b, t, heads, d] rotated in half-split pairs (feature i with i + d/2), the Llama layout."""
  x1, x2 = jnp.split(x, 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1)


def causal_softmax(scores):
  t = scores.shape[-1]
  return jax.nn.softmax(jnp.where(jnp.tril(jnp.ones((t, t), bool)), scores, -1e30), axis=-1)


def attention_core(q, k, v):
  """q [b, t, kv, g, d], k/v [b, t, kv, d] -> [b, t, kv, g, d]: grouped-query causal softmax attention."""
  scores = jnp.einsum("btkgd,bskd->bkgts", q, k) / math.sqrt(q.shape[-1])
  return jnp.einsum("bkgts,bskd->btkgd", causal_softmax(scores), v)


def attention(x, p, s, sin, cos):
  b, t, _ = x.shape
  q = rope(jnp.einsum("bte,ehd->bthd", x, p["q"]), sin, cos)
  k = rope(jnp.einsum("bte,ehd->bthd", x, p["k"]), sin, cos)
  v = jnp.einsum("bte,ehd->bthd", x, p["v"])
  out = attention_core(q.reshape(b, t, s.kv_heads, s.heads // s.kv_heads, s.head_dim), k, v)
  return jnp.einsum("bthd,hde->bte", out.reshape(b, t, s.heads, s.head_dim), p["o"])


def swiglu(x, gate, up, down, spec="...e,ef->...f", down_spec="...f,fe->...e"):
  return jnp.einsum(down_spec, jax.nn.silu(jnp.einsum(spec, x, gate)) * jnp.einsum(spec, x, up), down)


def moe_route(x, router, s):
  """Softmax top-k over the router logits, the k weights renormalised (Mixtral); Switch load-balance and z losses."""
  logits = x @ router
  probs = jax.nn.softmax(logits, axis=-1)
  weights, ids = jax.lax.top_k(probs, s.top_k)
  fraction = jnp.mean(jax.nn.one_hot(ids, s.experts), axis=(0, 1))  # of the assignments, per expert
  aux = s.load_balance_coef * s.experts * jnp.sum(jax.lax.stop_gradient(fraction) * jnp.mean(probs, 0))
  aux += s.z_loss_coef * jnp.mean(jax.nn.logsumexp(logits, axis=-1) ** 2)
  return ids, weights / jnp.sum(weights, -1, keepdims=True), aux


def moe_slots(ids, experts, capacity):
  """Buffer slot of each (token, choice) in priority order (every first choice before any second one); slot
  experts * capacity = dropped. Returns (slot [t, k], token of each slot [experts * capacity], t = empty)."""
  t, k = ids.shape
  order = ids.T.reshape(-1)
  position = jnp.cumsum(jax.nn.one_hot(order, experts, dtype=jnp.int32), axis=0)[jnp.arange(t * k), order] - 1
  slot = jnp.where(position < capacity, order * capacity + position, experts * capacity)
  token = jnp.full((experts * capacity,), t, jnp.int32).at[slot].set(jnp.tile(jnp.arange(t), k), mode="drop")
  return slot.reshape(k, t).T, token


def moe_ffn(x, p, s):
  """Capacity-buffered top-k MoE FFN (the zoo's CPU dispatch): gather into [experts, capacity, embed] buffers, one
  batched SwiGLU, weighted gather back."""
  b, t, e = x.shape
  tokens = x.reshape(-1, e)
  ids, weights, aux = moe_route(tokens, p["router"], s)
  capacity = b * t if not s.capacity_factor else min(b * t, math.ceil(s.capacity_factor * b * t * s.top_k / s.experts))
  slot, token = moe_slots(ids, s.experts, capacity)
  padded = jnp.concatenate([tokens, jnp.zeros((1, e), x.dtype)])  # row t: the empty slots' input
  buffers = padded[token].reshape(s.experts, capacity, e)
  out = swiglu(buffers, p["gate"], p["up"], p["down"], "ecd,edf->ecf", "ecf,efd->ecd").reshape(-1, e)
  out = jnp.concatenate([out, jnp.zeros((1, e), x.dtype)])  # row experts * capacity: the dropped assignments
  return jnp.einsum("tk,tke->te", weights, out[slot]).reshape(b, t, e), aux


def minimal_loss(params, inputs, targets, s):
  """(mean next-token cross-entropy + router losses, cross-entropy)."""
  x = params["embed"][inputs]
  sin, cos = rope_tables(inputs.shape[1], s.head_dim, s.rope_theta)
  aux = 0.0
  for p in params["layers"]:
    x = x + attention(rms_norm(x, p["attn_norm"], s.eps), p["attn"], s, sin, cos)
    h = rms_norm(x, p["ffn_norm"], s.eps)
    if s.experts:
      h, layer_aux = moe_ffn(h, p["ffn"], s)
      aux += layer_aux
    else:
      h = swiglu(h, p["ffn"]["gate"], p["ffn"]["up"], p["ffn"]["down"])
    x = x + h
  x = rms_norm(x, params["final_norm"], s.eps)
  logits = x @ (params["embed"].T if s.tied else params["lm_head"])
  ce = jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, targets))
  return ce + aux, ce


class JaxMinimal:
  """The hand-written step: `minimal_loss` + `optax.chain(clip_by_global_norm, adamw)`, donated, jitted."""

  name = "jax_minimal"

  def __init__(self, shape, canon, opt, batch):
    ffn_keys = ("router", "gate", "up", "down") if shape.experts else ("gate", "up", "down")
    layers = [
      {
        "attn_norm": c["attn_norm"],
        "ffn_norm": c["ffn_norm"],
        "attn": {n: c["attn"][n] for n in "qkvo"},
        "ffn": {n: c["ffn"][n] for n in ffn_keys},
      }
      for c in canon["layers"]
    ]
    tree = {"embed": canon["embed"], "final_norm": canon["final_norm"], "layers": layers}
    if not shape.tied:
      tree["lm_head"] = canon["lm_head"]
    self.params = jax.tree.map(jnp.array, tree)
    self.tx = optax.chain(
      optax.clip_by_global_norm(float(opt.grad_clip_norm)),
      optax.adamw(
        float(opt.lr),
        b1=float(opt.b1),
        b2=float(opt.b2),
        eps=float(opt.eps),
        weight_decay=float(opt.weight_decay),
        mask=lambda p: jax.tree.map(lambda x: x.ndim >= 2, p),
      ),
    )
    self.opt_state = self.tx.init(self.params)
    self.inputs, self.targets = jnp.asarray(batch["inputs"]), jnp.asarray(batch["targets"])
    loss = functools.partial(minimal_loss, s=shape)

    def minimal_train_step(params, opt_state, inputs, targets):
      (total, _), grads = jax.value_and_grad(loss, has_aux=True)(params, inputs, targets)
      updates, opt_state = self.tx.update(grads, opt_state, params)
      return optax.apply_updates(params, updates), opt_state, total

    args = (self.params, self.opt_state, self.inputs, self.targets)
    self.compiled = jax.jit(minimal_train_step, donate_argnums=(0, 1)).lower(*args).compile()
    self.forward_fn = jax.jit(loss).lower(self.params, self.inputs, self.targets).compile()
    self.num_params = sum(x.size for x in jax.tree.leaves(self.params))

  def step(self):
    self.params, self.opt_state, loss = self.compiled(self.params, self.opt_state, self.inputs, self.targets)
    jax.block_until_ready((self.params, self.opt_state, loss))

  def forward(self):
    return jax.block_until_ready(self.forward_fn(self.params, self.inputs, self.targets))

  @contextlib.contextmanager
  def context(self):
    yield


# ------------------------------------------------------------------------------------------------- the zoo's own step


class Zoo:
  """The engine's train step on one device (`Experiment.compile_train_step`, state donated) and a jitted loss."""

  name = "zoo"

  def __init__(self, config, batch):
    self.exp = Experiment(config, jax.devices()[:1])
    self.state, shardings = self.exp.init_state()
    self.compiled = self.exp.compile_train_step(shardings, self.exp.abstract_state()[0])
    self.batch = sharding.global_batch(self.exp.pad(batch), self.exp.mesh)
    self.num_params = partition.count(self.state.params) + partition.count(self.state.frozen)
    self.initial_params = jax.device_get(partition.merge(self.state.params, self.state.frozen))
    model, task = self.exp.model, self.exp.task

    def zoo_loss(params, frozen, collections, batch):
      variables = {"params": partition.merge(params, frozen), **collections}
      logits, out = model.apply(variables, **task.prepare(batch, {})[0], deterministic=True)
      stats = task.stats(logits, None, batch)
      ce = stats["loss_sum"] / jnp.maximum(stats["weight"], 1e-9)
      return ce + out.aux_loss, ce

    with self.context():
      self.forward_fn = jax.jit(zoo_loss).lower(*self._loss_args()).compile()

  def _loss_args(self):
    return self.state.params, self.state.frozen, self.state.collections, self.batch

  def context(self):
    return sharding.mesh_context(self.exp.mesh)

  def step(self):
    self.state, metrics = self.compiled(self.state, self.batch)
    jax.block_until_ready((self.state, metrics))

  def forward(self):
    return jax.block_until_ready(self.forward_fn(*self._loss_args()))


# -------------------------------------------------------------------------------------------- transformers + PyTorch


def llama_config(shape):
  """The transformers Llama config.json of the zoo dense LM (mapping in the module docstring)."""
  return {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "vocab_size": shape.vocab,
    "hidden_size": shape.embed,
    "num_hidden_layers": shape.layers,
    "num_attention_heads": shape.heads,
    "num_key_value_heads": shape.kv_heads,
    "head_dim": shape.head_dim,
    "intermediate_size": shape.mlp,
    "rms_norm_eps": shape.eps,
    "rope_parameters": {"rope_theta": shape.rope_theta, "rope_type": "default"},
    "tie_word_embeddings": shape.tied,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "max_position_embeddings": 4096,
    "dtype": "float32",
  }


def export_to_hf(model, name, shape, params, directory):
  """Write the zoo parameters as a Hugging Face directory (Mixtral: the zoo's export of `model`, registered as
  `name`; Llama: `llama_config` and the zoo's canonical -> HF tensor mapping); returns the canonical layout."""
  canon = zoo_tree.variables_to_canonical({"params": params}, shape.layers)
  if shape.experts:
    fields = {k: getattr(model, k) for k in model_fields(type(model))}  # every key, defaults included
    zoo_hf.export_hf(ml_collections.ConfigDict({"name": name, **fields}), {"params": params}, directory, "mixtral")
    return canon
  hf_config = llama_config(shape)
  arch = hf_spec.arch_from_config(hf_config)
  tensors = hf_spec.canonical_to_hf(canon, arch)
  hf_spec.check_tensors(tensors, arch)
  os.makedirs(directory)
  safetensors_io.save_file(tensors, os.path.join(directory, "model.safetensors"), metadata={"format": "pt"})
  with open(os.path.join(directory, "config.json"), "w") as f:
    json.dump(hf_config, f)
  return canon


class Torch:
  """transformers' model of the exported directory, AdamW + clip_grad_norm_, forward + backward + step."""

  name = "torch"

  def __init__(self, directory, shape, opt, batch):
    cls = transformers.MixtralForCausalLM if shape.experts else transformers.LlamaForCausalLM
    self.model = cls.from_pretrained(directory, attn_implementation="sdpa", dtype=torch.float32).train()
    self.aux_coef = shape.load_balance_coef
    self.model.config.output_router_logits = bool(shape.experts)  # Mixtral: returns its load-balance loss
    self.params = [p for p in self.model.parameters() if p.requires_grad]
    groups = [
      {"params": [p for p in self.params if p.ndim >= 2], "weight_decay": float(opt.weight_decay)},
      {"params": [p for p in self.params if p.ndim < 2], "weight_decay": 0.0},
    ]
    self.opt = torch.optim.AdamW(groups, lr=float(opt.lr), betas=(float(opt.b1), float(opt.b2)), eps=float(opt.eps))
    self.clip = float(opt.grad_clip_norm)
    self.inputs = torch.from_numpy(np.asarray(batch["inputs"], np.int64))
    self.targets = torch.from_numpy(np.asarray(batch["targets"], np.int64))
    self.num_params = sum(p.numel() for p in self.params)

  def _loss(self):
    out = self.model(input_ids=self.inputs)
    logits = out.logits
    ce = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), self.targets.reshape(-1))
    aux = getattr(out, "aux_loss", None)
    return (ce if aux is None else ce + self.aux_coef * aux), ce

  def step(self):
    self.opt.zero_grad(set_to_none=True)
    loss, _ = self._loss()
    loss.backward()
    with torch.profiler.record_function("bench::clip_grad_norm"):
      torch.nn.utils.clip_grad_norm_(self.params, self.clip)
    self.opt.step()

  def forward(self):
    with torch.no_grad():
      return tuple(float(v) for v in self._loss())

  @contextlib.contextmanager
  def context(self):
    yield


# ------------------------------------------------------------------------------------------------------ measurement


def random_batch(vocab, batch, seq, seed=0):
  tokens = np.random.default_rng(seed).integers(0, vocab, (batch, seq + 1)).astype(np.int32)
  ones = np.ones((batch, seq), np.float32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:], "mask": ones, "target_bytes": ones}


def build(model_name, args, workdir):
  """(shape, {implementation: object}) for one model, all three from the zoo's initial weights."""
  config = MODELS[model_name]()
  config.train.batch_size = args.batch
  config.data.seq_len = args.seq
  batch = random_batch(config.model.vocab_size, args.batch, args.seq)
  zoo = Zoo(config, batch)
  shape = shape_of(zoo.exp.model)
  directory = os.path.join(workdir, model_name)
  canon = export_to_hf(zoo.exp.model, config.model.name, shape, zoo.initial_params, directory)
  return shape, {
    "zoo": zoo,
    "jax_minimal": JaxMinimal(shape, canon, config.optimizer, batch),
    "torch": Torch(directory, shape, config.optimizer, batch),
  }


def timed(fn):
  start = time.perf_counter()
  fn()
  return time.perf_counter() - start


def measure(impls, steps, warmup):
  """Interleaved rounds (each implementation's train step, then each one's forward); median seconds per step after
  `warmup` rounds. Returns ({name: step seconds}, {name: forward seconds})."""
  step_times, fwd_times = collections.defaultdict(list), collections.defaultdict(list)
  for i in range(warmup + steps):
    for name, impl in impls.items():
      with impl.context():
        t = timed(impl.step)
      if i >= warmup:
        step_times[name].append(t)
    for name, impl in impls.items():
      with impl.context():
        t = timed(impl.forward)
      if i >= warmup:
        fwd_times[name].append(t)
  return {k: statistics.median(v) for k, v in step_times.items()}, {
    k: statistics.median(v) for k, v in fwd_times.items()
  }


def initial_losses(impls):
  """Cross-entropy of every implementation on the batch before any step (same weights: should agree)."""
  out = {}
  for name, impl in impls.items():
    with impl.context():
      out[name] = float(impl.forward()[1])
  return out


def results_table(rows, tokens):
  lines = [
    "| model | implementation | params | fwd+bwd+update ms/step | tokens/s | vs torch | fwd ms | fwd vs torch |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for model, name, params, step, fwd, torch_step, torch_fwd in rows:
    lines.append(
      f"| {model} | {name} | {params:,} | {1e3 * step:.1f} | {tokens / step:,.0f} | {torch_step / step:.2f}x | "
      f"{1e3 * fwd:.1f} | {torch_fwd / fwd:.2f}x |"
    )
  return "\n".join(lines)


# ---------------------------------------------------------------------------------------- optimized HLO: parse, census

_MOVEMENT = {"parameter", "bitcast", "reshape", "constant", "tuple", "get-tuple-element", "broadcast"}
_CONTAINERS = {"while", "conditional", "call"}
_SECTIONS = ("FileNames", "FunctionNames", "FileLocations", "StackFrames")


@dataclasses.dataclass
class Instr:
  name: str
  shape: tuple
  opcode: str
  operands: list
  attrs: str


def _closing(text, start):
  """Index of the parenthesis closing the one at `start`."""
  depth = 0
  for i in range(start, len(text)):
    depth += {"(": 1, ")": -1}.get(text[i], 0)
    if depth == 0:
      return i
  return len(text) - 1


def _parse_instr(line):
  m = re.match(r"\s+(?:ROOT )?%?([^\s=]+) = (.*)$", line)
  if not m:
    return None
  name, rest = m.groups()
  if rest.startswith("("):  # a tuple type
    end = _closing(rest, 0)
    type_, rest = rest[: end + 1], rest[end + 2 :]
  else:
    type_, _, rest = rest.partition(" ")
  if "(" not in rest:
    return None
  opcode = rest[: rest.index("(")]
  end = _closing(rest, len(opcode))
  dims = re.match(r"\w+\[([\d,]*)\]", type_)
  shape = tuple(int(d) for d in dims.group(1).split(",") if d) if dims else ()
  operands = re.findall(r"%([^\s,()]+)", rest[len(opcode) : end + 1])
  return Instr(name, shape, opcode, operands, rest[end + 1 :])


class Hlo:
  """The optimized HLO text of one executable: its instructions (names are unique in a module), computations and
  the stack-frame table XLA keeps for source locations."""

  def __init__(self, text):
    self.text = text
    self.module = re.match(r"HloModule (\S+?),", text).group(1)
    self.instrs, self.computations, self.entry = {}, {}, None
    tables = {s: {} for s in _SECTIONS}
    section, current = None, None
    for line in text.splitlines():
      if line in _SECTIONS:
        section = line
        continue
      if section and re.match(r"\d+ ", line):
        key, value = line.split(" ", 1)
        tables[section][int(key)] = value
        continue
      section = None
      if line and not line[0].isspace() and line.rstrip().endswith("{"):
        words = line.split("(")[0].split()
        current = words[-1].lstrip("%")
        self.computations[current] = []
        if words[0] == "ENTRY":
          self.entry = current
        continue
      instr = _parse_instr(line) if current else None
      if instr:
        self.instrs[instr.name] = instr
        self.computations[current].append(instr)
    self.files = {k: v.strip('"') for k, v in tables["FileNames"].items()}
    self.functions = {k: v.strip('"') for k, v in tables["FunctionNames"].items()}
    self.locations = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["FileLocations"].items()}
    self.frames = {k: dict(re.findall(r"(\w+)=(\d+)", v)) for k, v in tables["StackFrames"].items()}

  def called(self, instr):
    """Every instruction inside the computations `instr` calls (fusions, nested fusions), recursively."""
    out = []
    for name in re.findall(r"calls=\{?%?([^\s,}]+)", instr.attrs):
      for inner in self.computations.get(name, []):
        out.append(inner)
        out.extend(self.called(inner))
    return out

  def stack(self, instr):
    """[(file, function)] of the op's source, innermost first (its own metadata, else its first fused op's). The
    StackFrames table prints parent_frame_id as the parent's number + 1, 1 = no parent (checked on jax 0.10.2)."""
    frame_ids = [re.search(r"stack_frame_id=(\d+)", i.attrs) for i in [instr, *self.called(instr)]]
    frame = next((int(m.group(1)) for m in frame_ids if m), None)
    out, seen = [], set()
    while frame in self.frames and frame not in seen:
      seen.add(frame)
      location = self.locations.get(int(self.frames[frame].get("file_location_id", 0)), {})
      out.append(
        (
          self.files.get(int(location.get("file_name_id", 0)), "?"),
          self.functions.get(int(location.get("function_name_id", 0)), "?"),
        )
      )
      frame = int(self.frames[frame].get("parent_frame_id", 1)) - 1
    return out

  def op_name(self, instr):
    m = re.search(r'op_name="([^"]*)"', instr.attrs)
    return m.group(1) if m else ""

  def dot_flops(self, instr):
    """2 * output elements * contracted size, over `instr` and what it calls."""
    total = 0
    for i in [instr, *self.called(instr)]:
      if i.opcode == "dot" and i.operands and i.operands[0] in self.instrs:
        lhs = self.instrs[i.operands[0]].shape
        contracting = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", i.attrs)
        dims = [int(d) for d in contracting.group(1).split(",") if d] if contracting else []
        total += 2 * math.prod(i.shape) * math.prod(lhs[d] for d in dims if d < len(lhs))
    return total

  def census(self):
    """Counts of op kinds over every instruction (fused ones included), top-level ops, matmul GFLOP."""
    counts = collections.Counter(i.opcode for comp in self.computations.values() for i in comp)
    top = self.computations[self.entry]
    aliased = len(re.findall(r"may-alias|must-alias", self.text.split("\n", 1)[0]))
    return {
      "top-level ops (thunks)": sum(i.opcode not in ("parameter", "constant", "tuple") for i in top),
      "fusions": counts["fusion"],
      "dot": counts["dot"],
      "convolution": counts["convolution"],
      "copy": counts["copy"],
      "transpose": counts["transpose"],
      "gather": counts["gather"],
      "scatter": counts["scatter"],
      "sort": counts["sort"],
      "reduce-window": counts["reduce-window"],
      "custom-call": counts["custom-call"],
      "matmul GFLOP": sum(self.dot_flops(i) for i in top) / 1e9,
      "donated (aliased) outputs": aliased,
    }


# (pattern over 'file:function' of one stack frame, category); frames are tried innermost first.
SOURCE_RULES = (
  (r"/optax/(?!losses/)", OPTIMIZER),
  (r"rope\.py:|:(rope|rope_tables)$", ROPE),
  (r"norms\.py:|:rms_norm$", NORMS),
  (r":(_hidden|swiglu)$", OTHER),  # the FFN / expert activation
  (r"zoo/routing/|:moe_", DISPATCH),
  (r":(dot_product_attention|attention_core)$", ATTN_CORE),
  (r"zoo/layers/attention\.py:|:causal_softmax$", SOFTMAX),
)


def source_category(stack):
  for file, function in stack:
    for pattern, category in SOURCE_RULES:
      if re.search(pattern, f"{file}:{function}"):
        return category
  return OTHER


def fused_transpose(hlo, instr):
  """Whether `instr` is a fusion that both computes and transposes (XLA CPU emits these as one loop over the
  transposed output, reading its inputs with a stride)."""
  ops = {i.opcode for i in hlo.called(instr)}
  return "transpose" in ops and bool(ops - _MOVEMENT - {"copy", "transpose", "fusion"})


def hlo_category(hlo, instr):
  """The category of a top-level op: a matmul if it holds a dot, a copy/transpose if it only moves data, else by its
  source location."""
  ops = {i.opcode for i in [instr, *hlo.called(instr)]} - {"fusion"}
  source = source_category(hlo.stack(instr))
  if ops & {"dot", "convolution"}:
    return ATTN_DOTS if source == ATTN_CORE else MATMUL
  if ops & {"copy", "transpose"} and ops <= _MOVEMENT | {"copy", "transpose"}:
    return COPIES
  return SOFTMAX if source == ATTN_CORE else source


# ------------------------------------------------------------------------------------------------------ profiling


@dataclasses.dataclass
class OpTime:
  """One op's share of the profiled steps."""

  name: str
  category: str
  seconds: float  # total over the profiled steps
  calls: int
  flops: float = 0.0  # total
  where: str = ""
  fused_transpose: bool = False  # a fusion that computes (not only moves) and transposes its result


def jax_op_times(xplane, hlo):
  """[OpTime] of the ops of `hlo`'s module in the trace (XLA CPU: one event per executed HLO op)."""
  from jax.profiler import ProfileData

  seconds, calls = collections.Counter(), collections.Counter()
  for plane in ProfileData.from_file(xplane).planes:
    for line in plane.lines:
      for event in line.events:
        stats = dict(event.stats)
        if stats.get("hlo_module") == hlo.module and "hlo_op" in stats and not event.name.startswith("end: "):
          seconds[stats["hlo_op"]] += event.duration_ns * 1e-9
          calls[stats["hlo_op"]] += 1
  out = []
  for name, total in seconds.items():
    instr = hlo.instrs.get(name)
    if instr is None or instr.opcode in _CONTAINERS:  # a while/call's body ops are events of their own
      continue
    stack = hlo.stack(instr)
    where = f"{os.path.basename(stack[0][0])}:{stack[0][1]}" if stack else hlo.op_name(instr)[-60:]
    flops = hlo.dot_flops(instr) * calls[name]
    out.append(OpTime(name, hlo_category(hlo, instr), total, calls[name], flops, where, fused_transpose(hlo, instr)))
  return out


TORCH_MATMUL = {"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::_grouped_mm", "aten::mv", "aten::addmv"}
TORCH_COPIES = {"aten::copy_", "aten::clone", "aten::_to_copy", "aten::transpose", "aten::permute", "aten::cat"}
TORCH_SCOPES = {"bench::rope": ROPE, "bench::norm": NORMS, "bench::moe": DISPATCH, "bench::clip_grad_norm": OPTIMIZER}


@contextlib.contextmanager
def torch_scopes(model):
  """record_function scopes around the parts op names do not tell apart: the HF RMSNorms, RoPE (the rotary
  embedding module and `apply_rotary_pos_emb`) and the sparse MoE blocks. Undone on exit."""
  patched = []

  def wrap(owner, attr, label, instance):
    original = getattr(owner, attr)

    @functools.wraps(original)
    def scoped(*args, **kwargs):
      with torch.profiler.record_function(label):
        return original(*args, **kwargs)

    setattr(owner, attr, scoped)
    patched.append((owner, attr, original, instance))

  labels = {"RMSNorm": "bench::norm", "RotaryEmbedding": "bench::rope", "SparseMoeBlock": "bench::moe"}
  for module in model.modules():
    for suffix, label in labels.items():
      if type(module).__name__.endswith(suffix):
        wrap(module, "forward", label, instance=True)
  modeling = sys.modules[type(model).__module__]
  if hasattr(modeling, "apply_rotary_pos_emb"):
    wrap(modeling, "apply_rotary_pos_emb", "bench::rope", instance=False)
  try:
    yield
  finally:
    for owner, attr, original, instance in reversed(patched):
      if instance:
        delattr(owner, attr)
      else:
        setattr(owner, attr, original)


def _torch_scope(event):
  """The bench/optimizer scope an event runs in, and the autograd node (sequence number) it runs under."""
  scope, sequence = None, None
  while event is not None:
    name = event.name
    if scope is None and (name in TORCH_SCOPES or name.startswith("Optimizer.")):
      scope = name
    if sequence is None and name.startswith("autograd::engine::evaluate_function") and event.sequence_nr >= 0:
      sequence = event.sequence_nr
    event = event.cpu_parent
  return scope, sequence


def torch_category(name, scope):
  """An op's category from its name and scope (sdpa is one fused kernel, its QK^T and PV dots included)."""
  category = OPTIMIZER if (scope or "").startswith("Optimizer.") else TORCH_SCOPES.get(scope)
  if name in TORCH_MATMUL:
    return MATMUL
  if "scaled_dot_product" in name:
    return SOFTMAX
  if category in (OPTIMIZER, ROPE, NORMS):
    return category
  if name in TORCH_COPIES:
    return COPIES
  return DISPATCH if category == DISPATCH and "silu" not in name else OTHER


def torch_flops(event):
  """The profiler's FLOPs of an op; a `_grouped_mm` that does not run as `mm`s on CPU (which the profiler counts)
  gets 2 * |a| * b's last dim."""
  if event.name == "aten::_grouped_mm" and not any(c.name == "aten::mm" for c in event.cpu_children):
    shapes = event.input_shapes
    return 2 * math.prod(shapes[0]) * shapes[1][-1] if len(shapes) >= 2 and shapes[1] else 0
  return event.flops or 0


def torch_op_times(events):
  """[OpTime] per op name and category, from the self CPU time of every event; backward ops take the scope of their
  forward op (same autograd sequence number)."""
  forward_scope, placed = {}, []
  for event in events:
    scope, sequence = _torch_scope(event)
    if sequence is None and scope is not None and event.sequence_nr >= 0:
      forward_scope.setdefault(event.sequence_nr, scope)
    placed.append((event, scope, sequence))
  seconds, calls, flops = collections.Counter(), collections.Counter(), collections.Counter()
  for event, scope, sequence in placed:
    if scope is None and sequence is not None:
      scope = forward_scope.get(sequence)
    key = (event.name, torch_category(event.name, scope))
    seconds[key] += event.self_cpu_time_total * 1e-6
    calls[key] += 1
    flops[key] += torch_flops(event)
  return [OpTime(*key, s, calls[key], flops[key]) for key, s in seconds.items()]


def category_table(per_impl, steps, walls):
  """Per category: ms/step and share of the op time, per implementation; then the op time against the step wall
  time and the matmul rate."""
  names = list(per_impl)
  header = "| category | " + " | ".join(f"{n} ms/step | {n} %" for n in names) + " |"
  lines = [header, "|---|" + "---|---|" * len(names)]
  totals = {n: sum(o.seconds for o in ops) for n, ops in per_impl.items()}
  for category in CATEGORIES:
    cells = []
    for n, ops in per_impl.items():
      s = sum(o.seconds for o in ops if o.category == category)
      cells.append(f"{1e3 * s / steps[n]:.1f} | {100 * s / max(totals[n], 1e-12):.0f}%")
    lines.append(f"| {category} | " + " | ".join(cells) + " |")
  cells = []
  for n, ops in per_impl.items():
    s = sum(o.seconds for o in ops if o.fused_transpose)
    cells.append(f"{1e3 * s / steps[n]:.1f} | {100 * s / max(totals[n], 1e-12):.0f}%" if n != "torch" else "n/a | n/a")
  lines.append("| (of the above: fusions that compute and transpose) | " + " | ".join(cells) + " |")
  cells = [f"{1e3 * totals[n] / steps[n]:.1f} | {totals[n] / steps[n] / walls[n]:.2f}x wall" for n in names]
  lines.append("| **all ops (sum of op times)** | " + " | ".join(cells) + " |")
  cells = []
  for n, ops in per_impl.items():
    matmul = [o for o in ops if o.category in (MATMUL, ATTN_DOTS)]
    seconds, flops = sum(o.seconds for o in matmul), sum(o.flops for o in matmul)
    cells.append(f"{flops / 1e9 / steps[n]:.2f} GFLOP/step | {flops / max(seconds, 1e-12) / 1e9:.1f} GFLOP/s")
  lines.append("| matmuls (incl. attention dots): rate | " + " | ".join(cells) + " |")
  return "\n".join(lines)


def top_ops_table(ops, steps, rows=12):
  lines = ["| op | category | ms/step | calls/step | where |", "|---|---|---|---|---|"]
  for o in sorted(ops, key=lambda o: -o.seconds)[:rows]:
    where = o.where + (" (fused transpose)" if o.fused_transpose else "")
    lines.append(f"| {o.name} | {o.category} | {1e3 * o.seconds / steps:.2f} | {o.calls / steps:g} | {where} |")
  return "\n".join(lines)


def census_table(hlos):
  censuses = {name: hlo.census() for name, hlo in hlos.items()}
  lines = ["| optimized HLO | " + " | ".join(censuses) + " |", "|---|" + "---|" * len(censuses)]
  for key in next(iter(censuses.values())):
    lines.append(
      f"| {key} | "
      + " | ".join(f"{c[key]:.2f}" if isinstance(c[key], float) else str(c[key]) for c in censuses.values())
      + " |"
    )
  return "\n".join(lines)


def cost_line(name, compiled):
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost or {}
  return (
    f"{name}: XLA cost analysis {cost.get('flops', float('nan')) / 1e9:.2f} GFLOP, "
    f"{cost.get('bytes accessed', float('nan')) / 2**20:.0f} MiB accessed per step"
  )


def profile(model_name, impls, step_times, directory, steps):
  """Trace `steps` train steps of each implementation and print the per-op summaries."""
  os.makedirs(directory, exist_ok=True)
  hlos = {}
  for name in ("zoo", "jax_minimal"):
    hlos[name] = Hlo(impls[name].compiled.as_text())
    with open(os.path.join(directory, f"{model_name}_{name}.hlo.txt"), "w") as f:
      f.write(hlos[name].text)
  if hlos["zoo"].module == hlos["jax_minimal"].module:
    raise RuntimeError(f"both jax steps are named {hlos['zoo'].module}; their trace events would mix")
  trace_dir = os.path.join(directory, f"{model_name}_jax")
  with jax.profiler.trace(trace_dir):
    for name in ("zoo", "jax_minimal"):
      with impls[name].context():
        for _ in range(steps):
          impls[name].step()
  xplane = max(glob.glob(os.path.join(trace_dir, "**", "*.xplane.pb"), recursive=True), key=os.path.getmtime)
  per_impl = {name: jax_op_times(xplane, hlos[name]) for name in hlos}

  from torch.profiler import ProfilerActivity, profile as torch_profile

  model = impls["torch"]
  with (
    torch_scopes(model.model),
    torch_profile(activities=[ProfilerActivity.CPU], with_flops=True, record_shapes=True) as prof,
  ):
    for _ in range(steps):
      model.step()
  prof.export_chrome_trace(os.path.join(directory, f"{model_name}_torch_trace.json"))
  per_impl["torch"] = torch_op_times(prof.events())

  print(f"\n### Profile: {model_name}, {steps} train steps of each (trace: {xplane}; HLO: {directory})\n")
  print(
    "Time per op category (sums of op times; XLA may run independent ops side by side, torch's self CPU time leaves"
  )
  print("out Python between ops, so a sum is not the wall time; 'x wall' compares it with the measured step):\n")
  print(category_table(per_impl, {n: steps for n in per_impl}, step_times))
  for name, ops in per_impl.items():
    print(f"\nTop ops, {name} ({'HLO op' if name != 'torch' else 'aten op by self CPU time'}):\n")
    print(top_ops_table(ops, steps))
  print(f"\ntorch.profiler key_averages (self CPU time, {steps} steps):\n")
  print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=15))
  print("\nHLO census of the compiled train steps (counts over every instruction, fused ones included):\n")
  print(census_table(hlos))
  for name in hlos:
    print(cost_line(name, impls[name].compiled))


# ------------------------------------------------------------------------------------------------------------- main


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--models", default="dense,moe", help="comma-separated: " + ",".join(MODELS))
  parser.add_argument("--batch", type=int, default=32)
  parser.add_argument("--seq", type=int, default=128)
  parser.add_argument("--steps", type=int, default=20, help="measured rounds")
  parser.add_argument("--warmup", type=int, default=3, help="rounds before measuring")
  parser.add_argument("--threads", type=int, default=len(os.sched_getaffinity(0)), help="torch.set_num_threads")
  parser.add_argument("--profile", metavar="DIR", help="profile the train steps, write traces and HLO to DIR")
  parser.add_argument("--profile-steps", type=int, default=3)
  parser.add_argument("--small", action="store_true", help="batch 2, seq 16, 2 steps, 1 warmup, 1 profiled step")
  args = parser.parse_args(argv)
  if args.small:
    args.batch, args.seq, args.steps, args.warmup, args.profile_steps = 2, 16, 2, 1, 1
  models = [m.strip() for m in args.models.split(",") if m.strip()]
  unknown = sorted(set(models) - set(MODELS))
  if unknown or not models:
    parser.error(f"--models {args.models!r}: unknown {unknown}; choose from {sorted(MODELS)}")
  torch.set_num_threads(args.threads)
  flags = os.environ.get("XLA_FLAGS", "")
  print(
    f"CPU train step, batch {args.batch} x {args.seq} tokens (random tokens, one fixed batch), float32; "
    f"{args.warmup} warm-up + {args.steps} measured interleaved rounds, medians.\n"
    f"jax {jax.__version__} ({jax.default_backend()}, {len(jax.devices())} device(s), the step on 1; XLA's CPU "
    f"thread pool: all {len(os.sched_getaffinity(0))} schedulable cores; default matmul precision "
    f"{jax.config.jax_default_matmul_precision or 'DEFAULT (float32 on CPU)'}; XLA_FLAGS={flags!r}); "
    f"torch {torch.__version__} ({torch.get_num_threads()} threads, float32 matmul precision "
    f"{torch.get_float32_matmul_precision()!r}), transformers {transformers.__version__}; "
    f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores."
  )
  if "optimization_level=0" in flags:
    print("warning: XLA_FLAGS turns XLA's backend optimisation off: jax times are not representative")
  if os.getloadavg()[0] > 0.5 * len(os.sched_getaffinity(0)):
    print(
      "warning: the machine is busy: multi-threaded steps slow down unevenly under contention (an OpenMP region of "
      "torch waits at its barrier for a descheduled thread); the ratios are unreliable (try --threads 1 for torch)"
    )
  rows = []
  with tempfile.TemporaryDirectory() as workdir:
    for model_name in models:
      shape, impls = build(model_name, args, workdir)
      losses = initial_losses(impls)
      print(
        f"\n{model_name}: initial cross-entropy on the batch (same weights): "
        + ", ".join(f"{k} {v:.6f}" for k, v in losses.items())
        + (
          " (zoo and jax_minimal drop assignments past the expert capacity, torch drops none)" if shape.experts else ""
        )
      )
      if len({impl.num_params for impl in impls.values()}) != 1:
        print(f"warning: parameter counts differ: { {k: v.num_params for k, v in impls.items()} }")
      step_times, fwd_times = measure(impls, args.steps, args.warmup)
      for name, impl in impls.items():
        rows.append(
          (
            model_name,
            name,
            impl.num_params,
            step_times[name],
            fwd_times[name],
            step_times["torch"],
            fwd_times["torch"],
          )
        )
      if args.profile:
        profile(model_name, impls, step_times, args.profile, args.profile_steps)
      del impls
  print(f"\n## Train step: zoo vs plain JAX vs transformers + PyTorch ({args.batch} x {args.seq} tokens)\n")
  print("'vs torch' = torch's time / this one's (above 1: faster than torch).\n")
  print(results_table(rows, args.batch * args.seq))


if __name__ == "__main__":
  main()
