"""Continuous depth-wise batching: a decoding engine for Mixture-of-Recursions (papers.md A1) and its baselines.

Bae et al., 2025, "Mixture-of-Recursions", Sec. 2.1 (continuous depth-wise batching) and its throughput evaluation.
With cycle / middle-cycle parameter sharing every recursion runs the same layers, so one call of the shared block can
mix tokens of different sequences at different depths. The engine serves a queue of requests (prompts of any
length, each with its number of new tokens) through a pool of `num_slots` sequence slots:

- admission: a free slot takes the next request; the prompt is prefilled with the model's own cached forward (the
  admitted prompts of one step in one padded call), the cache rows are copied into the slot, the first token is
  sampled from the prefill logits, and the same call runs that token's prelude (and depth-0 routing), so a newly
  admitted sequence goes straight to the block (or, routed past every recursion, to the boundary) and never takes a
  place in a boundary step whose coda it does not need.
- two kinds of engine step, each a jitted call on a fixed batch of `batch_size` jobs (padded with masked ones):
  the *block* step runs the shared block once on pending (slot, depth r) jobs of any depths, combines, and routes:
  a job either continues at depth r + 1 or exits; the *boundary* step runs, for exited tokens, the coda (the unshared
  last layer, final norm, output projection) and samples the next token, then, for every sampled token that goes on,
  the prelude (embedding, unshared first layer) and the depth-0 routing.
  Each step serves the kind with more pending jobs (first come, first served within it), so both run full batches
  while enough sequences are in flight; a sequence has one token in flight at a time.
- a finished sequence frees its slot, which the next request refills at once (`EngineStats.slot_reuses`).
- end of sequence: a sequence that samples `eos_id` stops there (the EOS is its last output token) and frees its
  slot, so its output is shorter than `max_new_tokens`; `zoo.engine.generate.generate` instead keeps its fixed-size
  batch and pads a finished row with EOS up to the full length. The outputs agree up to and including the first EOS.
- timing: `EngineStats` keeps the wall time of the prefill calls apart from the rest (the engine steps and the host
  loop), so prefill and decoding throughput are reported separately.

KV caches, per slot (the engine's store, a dict of arrays): the unshared layers' keys/values [S, L, kv_heads,
head_dim]; the shared layers' [R, S, L, kv_heads, head_dim], R = N_r for recursion-wise caching, 1 for KV sharing.
A job at depth r attends to its own slot's cache of depth r (gathered per job), and its new key/value is scattered
back at (r, slot, position). Under KV sharing only depth 0 writes, so a block step whose jobs are all deeper runs a
variant without key/value projections (the attention reads the store, as `zoo.models.mor` does with its read-only
`SharedKV` at recursions > 0); a step that mixes depth 0 with deeper jobs projects for all of them, since one batched
matmul serves them. A token that exits after depth r has no keys/values at the deeper depths; nothing is
copied from its last depth. This follows the authors' code (github raymin0223/mixture_of_recursions):
- recursion-wise caching: a depth's cache holds only the tokens that ran it. Each recursion is its own layer of their
  `DynamicCache`, which appends only the keys/values of the tokens selected at that recursion
  (`model/kv_caches/cache_utils.py`, `DynamicCache.update`), and a recursion's attention mask is restricted to the
  selected tokens (`model/mor_model/expert_choice_router.py`, lines 244-263, "STEP 4"). The engine keeps an `active`
  [N_r, S, L] mask: a query at depth r attends only to the earlier tokens of its sequence that ran depth r.
- recursive KV sharing: every token runs recursion 0, and the deeper recursions read recursion 0's keys/values
  (`RecursiveDynamicCache.update` returns the first recursion's cache for the later ones, cache_utils.py lines
  553-560), so an exited token's keys/values are there at every depth.
The released code has no depth-wise batching engine, and its decoding does not exit early: with one new token,
`top_k = max(1, int(capacity * 1)) = 1` (expert_choice_router.py line 144), so every token runs every recursion. The
exit rule here is the per-token one of the zoo's cached decoding (`zoo.models.mor`), which the engine matches:
greedy decoding through the engine equals `zoo.engine.generate.generate` per sequence (tests/test_mor_batching.py).

The same engine serves the vanilla dense LM (`dense_lm`: one depth, the block is all its layers, the coda its output
projection, the prelude its embedding) and the Recursive Transformer (`mor` with router 'none': every token runs
every depth), so throughput is compared like for like (bench/mor_decode.py).

Routing at decoding is per token: expert-choice uses the causal rule (the decision logit >= 0, every active token
where the capacity is 1), token-choice the depth its router picks at the prelude.
"""

import dataclasses
import functools
import time
from typing import Any

import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from zoo.engine.generate import sample_logits
from zoo.routing import depth as depth_routing

FREE, BLOCK, BOUNDARY = 0, 1, 2


@flax.struct.dataclass
class JobKV:
  """The attention cache of one batch of jobs (the `zoo.layers.Attention` cache protocol).

  k, v: [jobs, L, kv_heads, head_dim], each job's own slot and depth, gathered from the store; valid: [jobs, L] bool,
  keys that exist; write: [jobs] bool, whether the job's new key/value is written (and attended) at its position.
  After the attention ran, new_k/new_v hold the new keys/values [jobs, 1, kv_heads, head_dim] for the store.
  """

  k: Any
  v: Any
  valid: Any
  write: Any
  new_k: Any = None
  new_v: Any = None

  read_only = False

  def update(self, k, v, positions):
    rows = jnp.arange(k.shape[0])
    pos = jnp.where(self.write, positions[:, 0], self.k.shape[1])
    return JobKV(
      self.k.at[rows, pos].set(k[:, 0].astype(self.k.dtype), mode="drop"),
      self.v.at[rows, pos].set(v[:, 0].astype(self.v.dtype), mode="drop"),
      self.valid.at[rows, pos].set(True, mode="drop"),
      self.write,
      k,
      v,
    )

  def read(self):
    slots = jnp.broadcast_to(jnp.arange(self.k.shape[1], dtype=jnp.int32), self.valid.shape)
    return self.k, self.v, slots, self.valid


@flax.struct.dataclass
class ReadOnlyJobKV(JobKV):
  """A JobKV that is only read: the attention projects no keys/values (KV sharing at depths > 0)."""

  read_only = True


def _job_kv(store_kv, rows, valid, write, read_only=False):
  """A JobKV over `store_kv` = (k, v) [..., L, kvh, hd] gathered at `rows` (a tuple of index arrays [jobs])."""
  k, v = store_kv
  return (ReadOnlyJobKV if read_only else JobKV)(k[rows], v[rows], valid, write)


def _scatter_kv(store_kv, rows, positions, write, job_kv, after):
  """Writes the jobs' new keys/values into `store_kv` at (rows..., position) where `write`.

  `after` is an output computed from the gathered keys/values (the attention's): the values written are made to
  depend on it (`+ 0 * sum(after)`), so XLA orders the gather before the in-place scatter instead of copying the
  whole store to keep the gather's input intact.
  """
  k, v = store_kv
  pos = jnp.where(write, positions, k.shape[-3])
  idx = (*rows, pos)
  tie = 0.0 * jnp.sum(after.astype(jnp.float32))
  return (
    k.at[idx].set((job_kv.new_k[:, 0] + tie).astype(k.dtype), mode="drop"),
    v.at[idx].set((job_kv.new_v[:, 0] + tie).astype(v.dtype), mode="drop"),
  )


def _empty_kv(shape, dtype):
  return (jnp.zeros(shape, dtype), jnp.zeros(shape, dtype))


class _DenseParts(nn.Module):
  """The dense LM's own pieces (`layer_block`, `embed_tokens`, `output_logits`), applied with its parameters.

  `DenseLM` builds them inline in its compact call, so they are called here, unbound, from a compact context whose
  parameter tree is the model's (`fields`: the model's dataclass fields).
  """

  cls: Any
  fields: tuple

  @nn.compact
  def __call__(self, what, *args):
    dense = self.cls(**dict(self.fields), parent=None)
    if what == "layer":
      i, x, positions, cache = args
      return self.cls.layer_block.__wrapped__(dense, i)(x, positions, cache, None, True)[:2]
    tokens, x = args
    embed, e, _ = self.cls.embed_tokens.__wrapped__(dense, tokens, None, None, True)
    if what == "embed":
      return e
    return self.cls.output_logits.__wrapped__(dense, embed, x)  # 'logits'


class DenseStages:
  """The vanilla dense LM as a one-depth model: the block is all its layers."""

  def __init__(self, model):
    if getattr(model, "attention", "gqa") != "gqa" or getattr(model, "sliding_window", None):
      raise ValueError("the depth-wise batching engine serves dense_lm with attention='gqa' and no sliding window")
    self.model = model
    fields = tuple(
      (f.name, getattr(model, f.name)) for f in dataclasses.fields(model) if f.init and f.name not in ("parent", "name")
    )
    self.parts = _DenseParts(type(model), fields)
    self.num_depths = 1
    self.share = False
    self.kv_shape = (model.resolved_kv_heads, model.resolved_head_dim)

  def init_store(self, num_slots, max_length):
    dtype = jnp.dtype(self.model.dtype)
    shape = (1, num_slots, max_length, *self.kv_shape)
    return {"rec": tuple(_empty_kv(shape, dtype) for _ in range(self.model.num_layers))}

  def init_buffers(self, num_slots):
    return {"h": jnp.zeros((num_slots, self.model.embed_dim), jnp.dtype(self.model.dtype))}

  def prefill_rows(self, cache):
    """The model's prefill cache -> {store key: rows} with the slot axis where the store has it."""
    return {"rec": tuple((c.k[None], c.v[None]) for c in cache)}

  def coda(self, variables, store, jobs, h):
    tokens = jnp.zeros((h.shape[0], 1), jnp.int32)
    logits = self.parts.apply({"params": variables["params"]}, "logits", tokens, h[:, None])
    return store, logits[:, 0]

  def prelude(self, variables, store, bufs, jobs, tokens):
    x = self.parts.apply({"params": variables["params"]}, "embed", tokens[:, None], None)[:, 0]
    return store, bufs, x, jnp.ones(tokens.shape, bool)

  def block(self, variables, store, bufs, jobs, h, project_kv=True):
    slot, pos, valid = jobs["slot"], jobs["pos"], jobs["valid"]
    zeros = jnp.zeros_like(slot)
    x = h[:, None]
    rec = list(store["rec"])
    key_valid = jnp.ones((slot.shape[0], rec[0][0].shape[2]), bool)
    for i in range(self.model.num_layers):
      kv = _job_kv(rec[i], (zeros, slot), key_valid, valid)
      x, kv = self.parts.apply({"params": variables["params"]}, "layer", i, x, pos[:, None], kv)
      rec[i] = _scatter_kv(rec[i], (zeros, slot), pos, valid, kv, x)
    return {**store, "rec": tuple(rec)}, bufs, x[:, 0], jnp.zeros(slot.shape, bool)


class MoRStages:
  """`zoo.models.mor.MoRLM` split at its recursion boundaries: prelude (embedding, unshared first layer, depth-0
  routing), one recursion of the shared block at a per-job depth (with routing to the next depth), coda (unshared last
  layer, final norm, output projection). The pieces are the model's own submodules and combine rule, applied with its
  variables."""

  def __init__(self, model):
    from zoo.models.mor import layer_schedule

    _, self.first_id, schedule, self.last_id = layer_schedule(model.sharing, model.num_layers, model.num_recursions)
    if any(s != schedule[0] for s in schedule):
      raise ValueError(
        f"sharing={model.sharing!r} runs different layers at different recursions, so tokens of different depths "
        "cannot share one call; the depth-wise batching engine needs 'cycle' or 'middle_cycle' sharing"
      )
    self.model = model
    self.layer_ids = schedule[0]
    self.num_depths = model.num_recursions
    self.share = model.kv_mode == "share"
    self.kv_shape = (model.num_kv_heads or model.num_heads, model.head_dim)

  def init_store(self, num_slots, max_length):
    dtype = jnp.dtype(self.model.dtype)
    one = (num_slots, max_length, *self.kv_shape)
    r = 1 if self.share else self.num_depths
    store = {"rec": tuple(_empty_kv((r, *one), dtype) for _ in self.layer_ids)}
    if self.first_id is not None:
      store["first"], store["last"] = _empty_kv(one, dtype), _empty_kv(one, dtype)
    if not self.share:
      store["active"] = jnp.zeros((self.num_depths, num_slots, max_length), bool)
    return store

  def init_buffers(self, num_slots):
    d, dtype = self.model.embed_dim, jnp.dtype(self.model.dtype)
    bufs = {"h": jnp.zeros((num_slots, d), dtype)}
    if self.model.router == "token":
      bufs.update(
        h0=jnp.zeros((num_slots, d), dtype),
        depth=jnp.zeros((num_slots,), jnp.int32),
        weight=jnp.zeros((num_slots,), jnp.float32),
      )
    return bufs

  def prefill_rows(self, cache):
    rows, rec = {}, []
    for j in range(len(self.layer_ids)):
      ks = jnp.stack([cache["recursions"][r][j].k for r in range(len(cache["recursions"]))])
      vs = jnp.stack([cache["recursions"][r][j].v for r in range(len(cache["recursions"]))])
      rec.append((ks, vs))
    rows["rec"] = tuple(rec)
    if self.first_id is not None:
      rows["first"] = (cache["first"].k, cache["first"].v)
      rows["last"] = (cache["last"].k, cache["last"].v)
    if not self.share:
      rows["active"] = cache["active"]
    return rows

  def _apply(self, variables, fn, *args):
    return self.model.apply(variables, *args, method=fn)

  def coda(self, variables, store, jobs, h):
    slot, pos, write = jobs["slot"], jobs["pos"], jobs["valid"]
    last_id = self.last_id

    def run(m, h, kv):
      x = h[:, None]
      if last_id is not None:
        x, kv, _ = m.layers[last_id](x, pos[:, None], cache=kv)
      x = m.final_norm(x)
      return (m.embed.attend(x) if m.tie_embeddings else m.lm_head(x))[:, 0].astype(jnp.float32), kv

    kv = None
    if last_id is not None:
      kv = _job_kv(store["last"], (slot,), jnp.ones((slot.shape[0], store["last"][0].shape[1]), bool), write)
    logits, kv = self._apply(variables, run, h, kv)
    if last_id is not None:
      store = {**store, "last": _scatter_kv(store["last"], (slot,), pos, write, kv, logits)}
    return store, logits

  def prelude(self, variables, store, bufs, jobs, tokens):
    slot, pos, write = jobs["slot"], jobs["entry_pos"], jobs["valid"] & jobs["enter"]
    first_id, router, caps = self.first_id, self.model.router, self.model.caps

    def run(m, tokens, kv):
      h = m.embed(tokens[:, None])
      if first_id is not None:
        h, kv, _ = m.layers[first_id](h, pos[:, None], cache=kv)
      h = h[:, 0]
      if router == "expert":
        chosen = jnp.ones(tokens.shape, bool) if caps[0] >= 1.0 else _expert_decision(m, 0, h) >= 0
        route = (chosen, None, None)
      elif router == "token":
        bias = m.depth_bias.value if m.balance_bias_rate > 0 else None
        depth, weight, _ = depth_routing.token_choice_route(m.depth_router(h), m.token_func, bias)
        route = (jnp.ones(tokens.shape, bool), depth, weight)
      else:
        route = (jnp.ones(tokens.shape, bool), None, None)
      return h, kv, route

    kv = None
    if first_id is not None:
      kv = _job_kv(store["first"], (slot,), jnp.ones((slot.shape[0], store["first"][0].shape[1]), bool), write)
    h, kv, (chosen, depth, weight) = self._apply(variables, run, tokens, kv)
    if first_id is not None:
      store = {**store, "first": _scatter_kv(store["first"], (slot,), pos, write, kv, h)}
    if router == "token":
      at = jnp.where(write, slot, bufs["h0"].shape[0])
      bufs = {
        **bufs,
        "h0": bufs["h0"].at[at].set(h, mode="drop"),
        "depth": bufs["depth"].at[at].set(depth, mode="drop"),
        "weight": bufs["weight"].at[at].set(weight, mode="drop"),
      }
    return store, bufs, h, chosen

  def block(self, variables, store, bufs, jobs, h, project_kv=True):
    """One recursion of the shared block at each job's depth; `project_kv` False (KV sharing, no job at depth 0):
    the attention reads the store and projects no keys/values."""
    slot, pos, depth, valid = jobs["slot"], jobs["pos"], jobs["depth"], jobs["valid"]
    model, layer_ids, n_r = self.model, self.layer_ids, self.num_depths
    rec_depth = jnp.zeros_like(depth) if self.share else depth
    write = valid & (depth == 0) if self.share else valid
    length = store["rec"][0][0].shape[2]
    if self.share:
      key_valid = jnp.ones((slot.shape[0], length), bool)
      active = None
    else:
      active = store["active"].at[depth, slot, jnp.where(valid, pos, length)].set(True, mode="drop")
      key_valid = active[depth, slot]
    read_only = self.share and not project_kv
    kvs = tuple(_job_kv(store["rec"][j], (rec_depth, slot), key_valid, write, read_only) for j in range(len(layer_ids)))
    token_route = None
    if model.router == "token":
      token_route = (bufs["depth"][slot], bufs["weight"][slot], bufs["h0"][slot])

    def run(m, h, kvs):
      x, out = h[:, None], []
      for j, layer_id in enumerate(layer_ids):
        x, kv, _ = m.layers[layer_id](x, pos[:, None], cache=kvs[j])
        out.append(kv)
      y = x[:, 0]
      if m.router == "expert":
        gate = _per_depth(depth, [m.gate_scale * jax.nn.sigmoid(m.step_routers[r](h)[..., 0]) for r in range(n_r)])
        h_new = m._combine(h, y, gate, None, None)
        nxt = jnp.minimum(depth + 1, n_r - 1)
        decision = _per_depth(nxt, [_expert_decision(m, r, h_new) for r in range(n_r)])
        caps_one = jnp.asarray([c >= 1.0 for c in m.caps])[nxt]
        go_on = (depth + 1 < n_r) & (caps_one | (decision >= 0))
      elif m.router == "token":
        route_depth, weight, h0 = token_route
        h_new = m._combine(h, y, weight, route_depth == depth, h0)
        go_on = route_depth > depth
      else:
        h_new = m._combine(h, y, None, None, None)
        go_on = depth + 1 < n_r
      return h_new, tuple(out), go_on

    h_new, out, go_on = self._apply(variables, run, h, kvs)
    if not read_only:
      rec = tuple(
        _scatter_kv(store["rec"][j], (rec_depth, slot), pos, write, out[j], h_new) for j in range(len(layer_ids))
      )
      store = {**store, "rec": rec}
    if active is not None:
      store["active"] = active
    return store, bufs, h_new, go_on & valid


def _per_depth(depth, values):
  """values[depth[i]][i] for each job i; values: a list of [jobs] arrays, one per depth."""
  return jnp.take_along_axis(jnp.stack(values, axis=-1), depth[:, None], axis=-1)[:, 0]


def _expert_decision(m, r, h):
  """The causal decision logit of expert-choice step r (its router's own, or the auxiliary router's)."""
  if m.causal_router == "aux_router":
    return m.aux_routers[r](h)[..., 0]
  return m.step_routers[r](h)[..., 0]


def make_stages(model):
  """The engine's view of `model`: MoRStages for `mor`, DenseStages for a dense LM."""
  if hasattr(model, "num_recursions"):
    return MoRStages(model)
  if hasattr(model, "layer_block") and hasattr(model, "output_logits"):
    return DenseStages(model)
  raise ValueError(f"the depth-wise batching engine serves 'mor' and 'dense_lm' models, not {type(model).__name__}")


@dataclasses.dataclass
class EngineStats:
  """What a run did.

  steps: engine steps by kind ('block', 'boundary'); jobs: jobs they ran (the rest of each batch was padding);
  prefill_calls: prefill calls; admissions: requests admitted; slot_reuses: admissions into a slot that an earlier
  sequence of the run had used (a slot freed by a finished sequence refilled); occupancy: per engine step, the
  number of sequences at each depth (pending or running) and at the boundary, [steps, num_depths + 1] int; kinds:
  per engine step 0 = block, 1 = boundary; depth_counts: recursions run per generated token, histogram [num_depths
  + 1]; mixed_depth_steps: block steps whose jobs were at more than one depth; read_only_block_steps: block steps
  that projected no keys/values (KV sharing, no job at depth 0); prompt_tokens / generated_tokens: tokens prefilled
  / generated (the first token of each request is sampled in its prefill call); prefill_seconds: wall time of the
  prefill calls (each also runs the prelude of its requests' first tokens); decode_seconds: the rest of the run.
  """

  steps: dict
  jobs: dict
  prefill_calls: int
  admissions: int
  slot_reuses: int
  occupancy: np.ndarray
  kinds: np.ndarray
  depth_counts: np.ndarray
  mixed_depth_steps: int
  batch_size: int
  num_slots: int
  read_only_block_steps: int = 0
  prompt_tokens: int = 0
  generated_tokens: int = 0
  prefill_seconds: float = 0.0
  decode_seconds: float = 0.0

  def fill(self, kind):
    """Mean fraction of the batch that held real jobs in steps of `kind`."""
    return self.jobs[kind] / max(1, self.steps[kind] * self.batch_size)

  def prefill_tokens_per_s(self):
    """Prompt tokens per second of prefill time."""
    return self.prompt_tokens / max(self.prefill_seconds, 1e-9)

  def decode_tokens_per_s(self):
    """Tokens generated by the engine steps (all but each request's first) per second of decoding time."""
    return (self.generated_tokens - self.admissions) / max(self.decode_seconds, 1e-9)

  def tokens_per_s(self):
    """Generated tokens per second of the whole run (prefills included)."""
    return self.generated_tokens / max(self.prefill_seconds + self.decode_seconds, 1e-9)


class DepthBatchingEngine:
  """Serves requests with continuous depth-wise batching (see the module docstring).

  Args:
    model, variables: a `mor` model (cycle or middle-cycle sharing) or a `dense_lm`, and its variables.
    batch_size: jobs per engine step.
    num_slots: sequences in flight (default 2 * batch_size, so both kinds of step find full batches).
    max_length: the longest prompt + new tokens a request may have (the caches' length).
    temperature, top_k: sampling (`zoo.engine.generate.sample_logits`); 0 = greedy. Sampling keys are per request
      and position, so the output does not depend on the schedule.
    eos_id: a sequence that samples it stops there: its output ends with that EOS and is shorter than its
      max_new_tokens (`zoo.engine.generate.generate` pads such a row with EOS to the full length instead).
    rng: PRNG key for sampling.
  """

  def __init__(
    self,
    model,
    variables,
    *,
    batch_size,
    max_length,
    num_slots=None,
    temperature=0.0,
    top_k=0,
    eos_id=None,
    rng=None,
  ):
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1")
    self.stages = make_stages(model)
    self.model, self.variables = model, nn.meta.unbox(variables)
    self.batch_size = batch_size
    self.num_slots = num_slots or 2 * batch_size
    if self.num_slots < 1:
      raise ValueError(f"num_slots={num_slots} must be >= 1")
    self.max_length = max_length
    self.eos_id = eos_id
    self.rng = jax.random.key(0) if rng is None else rng
    sample = functools.partial(sample_logits, temperature=temperature, top_k=top_k)
    self._sample = sample
    self._block = jax.jit(self._block_step, donate_argnums=(1, 2), static_argnums=(4,))
    self._boundary = jax.jit(self._boundary_step, donate_argnums=(1, 2))
    self._prefill = jax.jit(self._prefill_step, donate_argnums=(1, 2))

  # Device steps -------------------------------------------------------------------------------------------------

  def _sample_jobs(self, logits, request, position):
    def one(lg, r, p):
      return self._sample(lg[None], jax.random.fold_in(jax.random.fold_in(self.rng, r), p))[0]

    return jax.vmap(one)(logits, request, position)

  def _block_step(self, variables, store, bufs, jobs, project_kv):
    slot = jobs["slot"]
    h = bufs["h"][slot]
    store, bufs, h_new, go_on = self.stages.block(variables, store, bufs, jobs, h, project_kv)
    at = jnp.where(jobs["valid"], slot, bufs["h"].shape[0])
    bufs = {**bufs, "h": bufs["h"].at[at].set(h_new.astype(bufs["h"].dtype), mode="drop")}
    return store, bufs, go_on

  def _enter(self, variables, store, bufs, jobs, tokens):
    """The prelude and depth-0 routing of `tokens` at jobs['entry_pos'] for the jobs that go on (jobs['enter'], and
    not an EOS); their hidden states go to the slots' buffer. Returns (store, bufs, chosen: [jobs] bool, runs
    depth 0)."""
    if self.eos_id is not None:
      jobs = {**jobs, "enter": jobs["enter"] & (tokens != self.eos_id)}
    store, bufs, h, chosen = self.stages.prelude(variables, store, bufs, jobs, tokens)
    at = jnp.where(jobs["valid"] & jobs["enter"], jobs["slot"], bufs["h"].shape[0])
    bufs = {**bufs, "h": bufs["h"].at[at].set(h.astype(bufs["h"].dtype), mode="drop")}
    return store, bufs, chosen

  def _boundary_step(self, variables, store, bufs, jobs):
    """Coda and sampling for exited tokens, then the prelude of the sampled tokens that go on."""
    slot = jobs["slot"]
    store, logits = self.stages.coda(variables, store, jobs, bufs["h"][slot])
    tokens = self._sample_jobs(logits, jobs["request"], jobs["pos"] + 1)
    store, bufs, chosen = self._enter(variables, store, bufs, jobs, tokens)
    return store, bufs, tokens, chosen

  def _prefill_step(self, variables, store, bufs, tokens, lengths, slots, requests, enter):
    """Prefills `tokens` [rows, width] (prompts of `lengths`, right-padded), copies their caches into `slots` (rows
    past the real ones carry slot S and are dropped), samples each request's first token and runs its prelude where
    `enter` (the request wants more tokens). Returns (store, bufs, first tokens [rows], chosen [rows])."""
    max_length = self.max_length
    batch = tokens.shape[0]
    cache = self.model.apply(variables, batch, max_length, method="init_cache")
    positions = jnp.broadcast_to(jnp.arange(tokens.shape[1], dtype=jnp.int32), tokens.shape)
    logits, out = self.model.apply(variables, tokens, positions=positions, cache=cache)
    last = jnp.take_along_axis(logits, (lengths - 1)[:, None, None], axis=1)[:, 0]
    rows = self.stages.prefill_rows(out.cache)
    if "active" in rows:  # keys past a prompt are padding: no depth holds them
      rows["active"] = rows["active"] & (jnp.arange(max_length)[None, None, :] < lengths[None, :, None])
    store = self._insert_rows(store, rows, slots)
    first = self._sample_jobs(last, requests, lengths)
    valid = slots < self.num_slots
    jobs = {"slot": jnp.minimum(slots, self.num_slots - 1), "valid": valid, "enter": enter, "entry_pos": lengths}
    store, bufs, chosen = self._enter(variables, store, bufs, jobs, first)
    return store, bufs, first, chosen

  @staticmethod
  def _insert_rows(store, rows, slots):
    def put_rows(dst, src):  # [S, ...] arrays: the unshared layers
      return dst.at[slots].set(src.astype(dst.dtype), mode="drop")

    def put_depths(dst, src):  # [R, S, ...] arrays: the shared layers and the activity mask
      return dst.at[:, slots].set(src.astype(dst.dtype), mode="drop")

    out = dict(store)
    for key, value in rows.items():
      out[key] = jax.tree.map(put_depths if key in ("rec", "active") else put_rows, store[key], value)
    return out

  # Host loop ----------------------------------------------------------------------------------------------------

  def run(self, prompts, max_new_tokens):
    """Generate for every request.

    Args:
      prompts: a list of 1-D int sequences (token ids), each at least one token.
      max_new_tokens: an int or a list of ints, the tokens to generate for each request (>= 1).

    Returns:
      (outputs: a list of int32 arrays, request i's generated tokens in order: max_new_tokens of them, or fewer
      ending with the EOS when eos_id is set and sampled; EngineStats).
    """
    start = time.perf_counter()
    n = len(prompts)
    prompts = [np.asarray(p, np.int32).reshape(-1) for p in prompts]
    news = [int(max_new_tokens)] * n if np.isscalar(max_new_tokens) else [int(m) for m in max_new_tokens]
    if len(news) != n:
      raise ValueError(f"max_new_tokens has {len(news)} entries for {n} prompts")
    for i, (p, m) in enumerate(zip(prompts, news)):
      if len(p) < 1 or m < 1:
        raise ValueError(f"request {i}: the prompt ({len(p)} tokens) and max_new_tokens ({m}) must be >= 1")
      if len(p) + m > self.max_length:
        raise ValueError(f"request {i}: {len(p)} prompt + {m} new tokens exceed max_length={self.max_length}")
    s, b, depths = self.num_slots, self.batch_size, self.stages.num_depths
    store = self.stages.init_store(s, self.max_length)
    bufs = self.stages.init_buffers(s)
    outputs = [[] for _ in range(n)]
    request = np.full(s, -1, np.int64)
    kind = np.full(s, FREE, np.int8)
    depth = np.zeros(s, np.int32)
    pos = np.zeros(s, np.int32)  # the in-flight token's position (block) / the exited token's (boundary)
    ready = np.zeros(s, np.int64)  # the step at which the job became pending (first come, first served)
    used = np.zeros(s, bool)
    ran = np.zeros(s, np.int32)  # recursions the in-flight token ran
    queue = list(range(n))
    steps, jobs_run = {"block": 0, "boundary": 0}, {"block": 0, "boundary": 0}
    prefill_calls = admissions = reuses = mixed = read_only = prompt_tokens = 0
    prefill_seconds = 0.0
    occupancy, kinds, depth_counts = [], [], np.zeros(depths + 1, np.int64)
    step = 0

    def finish(i):
      kind[i], request[i] = FREE, -1

    def is_eos(t):
      return self.eos_id is not None and t == self.eos_id

    while queue or (kind != FREE).any():
      free = np.flatnonzero(kind == FREE)
      if queue and len(free):
        take = [queue.pop(0) for _ in range(min(len(free), len(queue)))]
        slots = free[: len(take)]
        admissions += len(take)
        reuses += int(used[slots].sum())
        used[slots] = True
        tick = time.perf_counter()
        store, bufs, first_tokens, first_chosen = self._prefill_batch(
          store, bufs, [prompts[r] for r in take], slots, take, [news[r] > 1 for r in take]
        )
        prefill_seconds += time.perf_counter() - tick
        prefill_calls += 1
        prompt_tokens += sum(len(prompts[r]) for r in take)
        for i, r, t, c in zip(slots, take, first_tokens, first_chosen):
          outputs[r].append(int(t))
          request[i], ready[i], ran[i], pos[i] = r, step, 0, len(prompts[r])
          if news[r] == 1 or is_eos(t):
            finish(i)
          elif c:
            kind[i], depth[i] = BLOCK, 0
          else:  # routed past every recursion: straight to the boundary
            kind[i] = BOUNDARY
      pending_block = np.flatnonzero(kind == BLOCK)
      pending_boundary = np.flatnonzero(kind == BOUNDARY)
      if not len(pending_block) and not len(pending_boundary):
        continue
      counts = np.bincount(depth[pending_block], minlength=depths)
      occupancy.append(np.append(counts, len(pending_boundary)))
      if len(pending_boundary) >= len(pending_block):
        chosen = pending_boundary[np.argsort(ready[pending_boundary], kind="stable")[:b]]
        kinds.append(1)
        steps["boundary"] += 1
        jobs_run["boundary"] += len(chosen)
        last = np.array([len(outputs[request[i]]) + 1 >= news[request[i]] for i in chosen], bool)
        jobs = self._jobs(chosen, pos=pos[chosen], request=request[chosen], enter=~last, entry_pos=pos[chosen] + 1)
        store, bufs, tokens, go = self._boundary(self.variables, store, bufs, jobs)
        tokens, go = np.asarray(tokens), np.asarray(go)
        for j, i in enumerate(chosen):
          depth_counts[ran[i]] += 1
          t = int(tokens[j])
          outputs[request[i]].append(t)
          if last[j] or is_eos(t):
            finish(i)
            continue
          pos[i] += 1
          ran[i] = 0
          ready[i] = step
          if go[j]:
            kind[i], depth[i] = BLOCK, 0
      else:
        chosen = pending_block[np.argsort(ready[pending_block], kind="stable")[:b]]
        kinds.append(0)
        steps["block"] += 1
        jobs_run["block"] += len(chosen)
        mixed += int(len(np.unique(depth[chosen])) > 1)
        project_kv = not self.stages.share or bool((depth[chosen] == 0).any())
        read_only += int(not project_kv)
        jobs = self._jobs(chosen, pos=pos[chosen], depth=depth[chosen])
        store, bufs, go = self._block(self.variables, store, bufs, jobs, project_kv)
        go = np.asarray(go)
        for j, i in enumerate(chosen):
          ran[i] += 1
          ready[i] = step
          if go[j]:
            depth[i] += 1
          else:
            kind[i] = BOUNDARY
      step += 1
    stats = EngineStats(
      steps=steps,
      jobs=jobs_run,
      prefill_calls=prefill_calls,
      admissions=admissions,
      slot_reuses=reuses,
      occupancy=np.asarray(occupancy, np.int32).reshape(-1, depths + 1),
      kinds=np.asarray(kinds, np.int8),
      depth_counts=depth_counts,
      mixed_depth_steps=mixed,
      batch_size=b,
      num_slots=s,
      read_only_block_steps=read_only,
      prompt_tokens=prompt_tokens,
      generated_tokens=sum(len(o) for o in outputs),
      prefill_seconds=prefill_seconds,
      decode_seconds=time.perf_counter() - start - prefill_seconds,
    )
    return [np.asarray(o, np.int32) for o in outputs], stats

  def _jobs(self, chosen, **fields):
    """The padded job arrays of one step: `chosen` slots first, then masked padding jobs."""
    b, k = self.batch_size, len(chosen)
    jobs = {"slot": np.zeros(b, np.int32), "valid": np.zeros(b, bool)}
    jobs["slot"][:k], jobs["valid"][:k] = chosen, True
    for name, value in fields.items():
      value = np.asarray(value)
      arr = np.zeros(b, np.int32 if value.dtype == np.int64 else value.dtype)
      arr[:k] = value
      jobs[name] = arr
    return jobs

  def _prefill_batch(self, store, bufs, prompts, slots, requests, enter):
    """Prefills `prompts` (padded to a bucket), copies their caches into `slots` and runs the prelude of the first
    tokens where `enter`; returns (store, bufs, first tokens, whether each runs depth 0)."""
    k = len(prompts)
    rows = 1 << (k - 1).bit_length()
    width = max(len(p) for p in prompts)
    width = min(self.max_length, max(8, 1 << (width - 1).bit_length()))
    tokens = np.zeros((rows, width), np.int32)
    lengths = np.ones(rows, np.int32)
    for i, p in enumerate(prompts):
      tokens[i, : len(p)] = p
      lengths[i] = len(p)
    target = np.full(rows, self.num_slots, np.int32)
    target[:k] = slots
    req = np.zeros(rows, np.int32)
    req[:k] = requests
    go = np.zeros(rows, bool)
    go[:k] = enter
    store, bufs, first, chosen = self._prefill(self.variables, store, bufs, tokens, lengths, target, req, go)
    return store, bufs, np.asarray(first)[:k], np.asarray(chosen)[:k]
