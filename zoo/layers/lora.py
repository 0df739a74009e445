"""LoRA: low-rank adapters on the `DenseGeneral` layers of any zoo model, chosen by module-path patterns.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models", section 4.1, eq. 3: `h = x W + (alpha / r) x A B`
with `A` [*contracted, r] drawn as PEFT draws it (Kaiming-uniform, bound 1 / sqrt(fan_in)), `B` [r, *features]
initialised to zero (so the adapted model starts as the base model) and dropout on the adapter's input only (PEFT's
`lora_dropout`).

`with_lora(model, spec)` returns the model with every `DenseGeneral` whose module path ('/'-joined, e.g.
'layers_0/attention/query') matches one of `spec.target_modules` (regular expressions, `re.search`) adapted: its
`lora_a` and `lora_b` parameters live beside its `kernel` (`layers_0/attention/query/lora_a`). No model file is
edited: the adapters are added by a Flax method interceptor around the model's `init` and `apply`, so every
parameter path of the base model is unchanged and a base checkpoint (`config.init_from`, a zoo checkpoint or
'hf:DIR') loads as it is; the adapters, which no source has, keep their initialisation. The adapted model's
`trainable_params` hook (the engine's trainable/frozen split, `zoo.engine.partition`) trains the adapters and the
base parameters `spec.trainable_params` names, and freezes the rest: the base gets no gradient buffers and no
optimizer state.

The stacked expert weights of a `zoo.routing.moe.MoEFFN` ([E, in, out], e.g. 'layers_1/ffn/up') are adapted too when
a pattern matches their parameter path: one adapter per expert (`ExpertLoRA`, at 'layers_1/ffn/up_lora'), added to
the weight as PEFT adapts `target_parameters`, so every dispatch path runs the adapted experts. Embeddings and other
experts' weights are not adapted: a pattern that matches them is refused (`check_targets`).

QLoRA (Dettmers et al. 2023, sec. 3-4, papers.md B5): with `spec.quantize='nf4'` the frozen base kernels of the
adapted layers are stored as NF4 with double-quantised block scales (`zoo.layers.nf4`, 4.127 bits per parameter)
through the adapted model's `frozen_storage` hook, which the engine applies to the frozen part of the train state;
`DenseGeneral` dequantises such a kernel to its compute dtype inside the matmul: `y = x deq(W) + (alpha / r) x A B`.
Only frozen kernels are quantised (one that trains stays as it is).

Mixtures of LoRA experts (papers.md B1-B2): with `spec.experts = E >= 2` every adapted layer holds E adapters
(`lora_a` [E, *contracted, r], `lora_b` [E, r, *features]) and a router `lora_router` [*contracted, E] (N(0, 0.02),
MoE-PEFT's `router_init_range`); per token `y = x W + (alpha / r) sum_e w_e x A_e B_e` with the weights of
`spec.router` (`zoo.routing.lora_routers`): 'topk' (softmax top-k, renormalised, Switch load balance), 'lora_mixer'
(LoRA-Mixer: the same plus the routing-entropy term), 'dynmole' (DynMoLE: top-p with keep-top-k, all experts above
the Tsallis-entropy threshold) or 'glider' (GLIDER, papers.md B3: the router's columns are gate vectors on the
layer-normed input, plus `spec.glider_scale` times a global bias, the cosine of the query's embedding with each
expert's task embedding, the same in every layer; `glider_bias`, `glider_task_embeddings`). The experts run
through `zoo.layers.lora_dispatch`: `spec.dispatch='sparse'` computes only the selected (token, expert) pairs with
the grouped-matmul kernels, 'dense' (the default: 5-38x faster on CPU, bench/RESULTS.md) every expert masked. Each
layer's router loss is averaged over the adapted layers and added to the model's `aux_loss`; its unweighted terms
and the mean active experts per token go to the metrics (`lora_<name>`).

`merge(params, spec)` folds the adapters into the kernels (`W + (alpha / r) A B`, the adapters dropped: the base
model runs the result); `unmerge(merged, adapters, spec)` takes them out again.
"""

import contextlib
import dataclasses
import math
import re
import threading
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax import traverse_util

from zoo.layers import lora_dispatch, nf4
from zoo.layers.linear import DenseGeneral, _as_tuple
from zoo.registry import ConfigError
from zoo.routing import lora_routers
from zoo.routing.moe import MoEFFN

TASK_EMBEDDINGS = "lora_task_embeddings"  # GLIDER's per-expert task embeddings [E, embed], a top-level frozen leaf
ADAPTER_LEAVES = ("lora_a", "lora_b", "lora_router", TASK_EMBEDDINGS)
ROUTERS = ("topk", "lora_mixer", "dynmole", "glider")  # routers of a mixture of LoRA experts (`spec.experts` >= 2)
DISPATCHES = ("dense", "sparse")  # dense is faster on CPU (bench/RESULTS.md, lora_dispatch)
ROUTING_COLLECTION = "lora_routing"  # where each adapted layer sows its router's losses and metrics
# The default targets: the q/k/v/o projections of every attention layer (GQA's query/key/value/out).
DEFAULT_TARGETS = (r"attention/(query|key|value|out)$",)
EXPERT_SUFFIX = "_lora"  # the adapter of a MoE's stacked expert weight `.../ffn/up` lives at `.../ffn/up_lora`
QUANTIZATIONS = ("", "nf4")  # storage of the adapted layers' frozen base kernels: as they are, or NF4 (QLoRA)


@dataclasses.dataclass(frozen=True)
class LoRASpec:
  """Where the adapters go and how they are scaled (`config.lora`).

  Attributes:
    r: rank of every adapter (>= 1).
    alpha: scale numerator; the adapter's output is multiplied by `alpha / r`.
    dropout: dropout rate on the adapter's input while training, in [0, 1).
    target_modules: regular expressions (`re.search`) over '/'-joined module paths of `DenseGeneral` layers.
    trainable_params: regular expressions over '/'-joined parameter paths of base parameters that train along with
      the adapters (e.g. the norms); every other base parameter is frozen.
    quantize: '' (the frozen base kernels as they are) or 'nf4' (QLoRA: the adapted layers' frozen kernels in NF4).
    experts: 0 (one adapter per layer) or E >= 2 (a mixture of E LoRA experts of rank r per layer).
    router: the mixture's router, one of ROUTERS.
    top_k: experts per token of 'topk' and 'lora_mixer'; DynMoLE's keep_top_k.
    dispatch: 'dense' (every expert, masked; faster on CPU, where the grouped matmul is XLA's ragged_dot) or
      'sparse' (grouped matmuls over the selected experts, the Pallas kernels on GPU/TPU).
    expert_adapters: zoo run directories, one per expert, each trained with one adapter (experts=0) of this rank on
      these layers of the same base: the mixture's experts start as those adapters (LoRA-Mixer's second regime).
    freeze_experts: the experts do not train (only the routers and `trainable_params` do).
    glider_scale: GLIDER's scale s of the global task bias (100 on held-in tasks, 3 on held-out ones, 0: the local
      routers alone).
  """

  r: int = 8
  alpha: float = 16.0
  dropout: float = 0.0
  target_modules: tuple[str, ...] = DEFAULT_TARGETS
  trainable_params: tuple[str, ...] = ()
  quantize: str = ""
  experts: int = 0
  router: str = "lora_mixer"
  top_k: int = 2
  dispatch: str = "dense"
  expert_adapters: tuple[str, ...] = ()
  freeze_experts: bool = False
  glider_scale: float = lora_routers.GLIDER_SCALE_HELD_IN

  def __post_init__(self):
    for key in ("target_modules", "trainable_params", "expert_adapters"):
      object.__setattr__(self, key, tuple(getattr(self, key)))
    if isinstance(self.r, bool) or not isinstance(self.r, int) or self.r < 1:
      raise ConfigError(f"config.lora.r={self.r!r} is invalid; allowed: an integer >= 1")
    if isinstance(self.alpha, bool) or not isinstance(self.alpha, (int, float)) or not self.alpha > 0:
      raise ConfigError(f"config.lora.alpha={self.alpha!r} is invalid; allowed: a number > 0")
    if isinstance(self.dropout, bool) or not isinstance(self.dropout, (int, float)) or not 0 <= self.dropout < 1:
      raise ConfigError(f"config.lora.dropout={self.dropout!r} is invalid; allowed: [0, 1)")
    if isinstance(self.experts, bool) or not isinstance(self.experts, int) or self.experts < 0 or self.experts == 1:
      raise ConfigError(f"config.lora.experts={self.experts!r} is invalid; allowed: 0 (one adapter) or an integer >= 2")
    if self.router not in ROUTERS:
      raise ConfigError(f"config.lora.router={self.router!r} is invalid; allowed: {ROUTERS}")
    if self.dispatch not in DISPATCHES:
      raise ConfigError(f"config.lora.dispatch={self.dispatch!r} is invalid; allowed: {DISPATCHES}")
    if self.experts and not 1 <= self.top_k <= self.experts:
      raise ConfigError(f"config.lora.top_k={self.top_k!r} is invalid; allowed: 1 <= top_k <= experts={self.experts}")
    if self.expert_adapters and len(self.expert_adapters) != self.experts:
      raise ConfigError(
        f"config.lora.expert_adapters names {len(self.expert_adapters)} runs but config.lora.experts={self.experts}; "
        "allowed: one run per expert"
      )
    if self.freeze_experts and not self.experts:
      raise ConfigError("config.lora.freeze_experts=True needs a mixture (config.lora.experts >= 2)")
    scale = self.glider_scale
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not scale >= 0:
      raise ConfigError(f"config.lora.glider_scale={scale!r} is invalid; allowed: a number >= 0")
    if self.quantize not in QUANTIZATIONS:
      raise ConfigError(f"config.lora.quantize={self.quantize!r} is invalid; allowed: {QUANTIZATIONS}")
    if not self.target_modules:
      raise ConfigError("config.lora.target_modules is empty; allowed: regular expressions over module paths")
    for key in ("target_modules", "trainable_params"):
      for pattern in getattr(self, key):
        if not isinstance(pattern, str):
          raise ConfigError(f"config.lora.{key}: {pattern!r} is not a string (a regular expression)")
        try:
          re.compile(pattern)
        except re.error as e:
          raise ConfigError(f"config.lora.{key}: {pattern!r} is not a regular expression ({e})") from None

  @property
  def scale(self):
    return self.alpha / self.r

  def targets(self, module_path):
    """Whether the `DenseGeneral` at `module_path` ('/'-joined) is adapted."""
    return any(re.search(p, module_path) for p in self.target_modules)


# ------------------------------------------------------------------------------------------------------- forward


def lora_delta(x, lora_a, lora_b, scale, dtype):
  """`scale * x . A . B`: x [..., *contracted], lora_a [*contracted, r], lora_b [r, *features] -> [..., *features]."""
  n_in = lora_a.ndim - 1
  x, lora_a, lora_b = nn.dtypes.promote_dtype(x, lora_a, lora_b, dtype=dtype)
  contract = tuple(range(x.ndim - n_in, x.ndim))
  h = jax.lax.dot_general(x, lora_a, ((contract, tuple(range(n_in))), ((), ())))
  return scale * jax.lax.dot_general(h, lora_b, (((h.ndim - 1,), (0,)), ((), ())))


def _interceptor(spec, deterministic, task_bias=None):
  """A Flax method interceptor adding the adapter to every targeted `DenseGeneral.__call__` (`task_bias`: GLIDER's
  global bias [tokens, E] of this forward, the same in every layer)."""

  def intercept(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "expert_weight" and isinstance(module, MoEFFN):
      weight = next_fun(*args, **kwargs)
      name = args[0] if args else kwargs["name"]
      if not spec.targets("/".join((*module.path, name))):
        return weight
      if spec.experts:
        raise ConfigError(
          f"config.lora.target_modules adapts the MoE expert weight {'/'.join((*module.path, name))}: a mixture of "
          "LoRA experts (config.lora.experts > 0) adapts DenseGeneral layers only; allowed: experts=0 there"
        )
      return ExpertLoRA(spec.r, spec.scale, module.param_dtype, name=name + EXPERT_SUFFIX, parent=module)(weight)
    if context.method_name != "__call__" or not isinstance(module, DenseGeneral):
      return next_fun(*args, **kwargs)
    if not spec.targets("/".join(module.path)):
      return next_fun(*args, **kwargs)
    y = next_fun(*args, **kwargs)
    (x,) = args
    n_in = len(_as_tuple(module.axis))
    features = _as_tuple(module.features)
    in_shape = x.shape[x.ndim - n_in :]
    in_axes, out_axes = tuple(module.kernel_axes[:n_in]), tuple(module.kernel_axes[n_in:])
    if spec.dropout and not deterministic:
      keep = jax.random.bernoulli(module.make_rng("dropout"), 1.0 - spec.dropout, x.shape)
      x_adapter = jnp.where(keep, x / (1.0 - spec.dropout), 0).astype(x.dtype)
    else:
      x_adapter = x
    if spec.experts:
      delta = _mixture(module, spec, x, x_adapter, in_shape, features, in_axes, out_axes, task_bias)
      return y + delta.astype(y.dtype)
    init_a = nn.initializers.variance_scaling(
      1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(n_in)), out_axis=(n_in,)
    )  # PEFT: kaiming_uniform_(a=sqrt(5)) on [r, in], i.e. U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    lora_a = module.param(
      "lora_a", nn.with_logical_partitioning(init_a, (*in_axes, None)), (*in_shape, spec.r), module.param_dtype
    )
    lora_b = module.param(
      "lora_b",
      nn.with_logical_partitioning(nn.initializers.zeros, (None, *out_axes)),
      (spec.r, *features),
      module.param_dtype,
    )
    return y + lora_delta(x_adapter, lora_a, lora_b, spec.scale, module.dtype).astype(y.dtype)

  return intercept


class ExpertLoRA(nn.Module):
  """One LoRA adapter per expert on a MoE's stacked expert weight (`MoEFFN.expert_weight`): `W_e + scale * A_e B_e`,
  added to the weight itself (as PEFT adapts `target_parameters`), so every dispatch path (dense, dropless, expert
  parallel, the kernels) runs the adapted experts unchanged. No adapter dropout: it is a weight, not an input, that
  changes.

  Attributes: r (rank), scale (alpha / r), param_dtype. Call: weight [E, in, out] -> [E, in, out] in its dtype."""

  r: int
  scale: float
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, weight):
    experts, d_in, d_out = weight.shape
    init_a = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform", in_axis=1, out_axis=2, batch_axis=0)
    lora_a = self.param(
      "lora_a", nn.with_logical_partitioning(init_a, ("expert", None, None)), (experts, d_in, self.r), self.param_dtype
    )
    lora_b = self.param(
      "lora_b",
      nn.with_logical_partitioning(nn.initializers.zeros, ("expert", None, None)),
      (experts, self.r, d_out),
      self.param_dtype,
    )
    lora_a, lora_b = jnp.asarray(lora_a, jnp.float32), jnp.asarray(lora_b, jnp.float32)
    return (weight + self.scale * jnp.einsum("eir,ero->eio", lora_a, lora_b)).astype(weight.dtype)


def route(spec, logits, task_bias=None):
  """The `zoo.routing.lora_routers` routing of `spec.router` for logits [tokens, E] (the authors' coefficients);
  GLIDER's `logits` are its local router's and `task_bias` [tokens, E] (None: 0) the global bias."""
  if spec.router == "glider":
    bias = jnp.zeros_like(logits) if task_bias is None else task_bias
    return lora_routers.glider(logits, bias, spec.glider_scale, k=spec.top_k)
  if spec.router == "dynmole":
    return lora_routers.dynmole(logits, keep_top_k=spec.top_k)
  return lora_routers.lora_mixer(logits, spec.top_k, entropy_coef=0.01 if spec.router == "lora_mixer" else 0.0)


def _mixture(module, spec, x, x_adapter, in_shape, features, in_axes, out_axes, task_bias=None):
  """The routed update `scale * sum_e w_e x A_e B_e` of one adapted layer ([..., *features]); sows the router's
  losses and metrics into ROUTING_COLLECTION."""
  n_in, experts = len(in_shape), spec.experts
  d_in, d_out = math.prod(in_shape), math.prod(features)
  init_a = nn.initializers.variance_scaling(
    1.0 / 3.0, "fan_in", "uniform", in_axis=tuple(range(1, n_in + 1)), out_axis=(n_in + 1,), batch_axis=(0,)
  )  # each expert as one PEFT adapter
  lora_a = module.param(
    "lora_a",
    nn.with_logical_partitioning(init_a, (None, *in_axes, None)),
    (experts, *in_shape, spec.r),
    module.param_dtype,
  )
  lora_b = module.param(
    "lora_b",
    nn.with_logical_partitioning(nn.initializers.zeros, (None, None, *out_axes)),
    (experts, spec.r, *features),
    module.param_dtype,
  )
  router = module.param(
    "lora_router",
    nn.with_logical_partitioning(nn.initializers.normal(0.02), (*in_axes, None)),
    (*in_shape, experts),
    jnp.float32,
  )
  batch_shape = x.shape[: x.ndim - n_in]
  if spec.router == "glider":  # the gate vectors on the layer-normed input (GLIDER's local router)
    logits = lora_routers.glider_local_logits(x.reshape(-1, d_in), router.reshape(d_in, experts))
    if task_bias is not None and task_bias.shape[0] != logits.shape[0]:
      raise ValueError(
        f"GLIDER: the layer {'/'.join(module.path)} sees {logits.shape[0]} tokens but the task bias has "
        f"{task_bias.shape[0]} (the model's token ids); GLIDER needs layers applied once per input token"
      )
  else:
    logits = jnp.asarray(x, jnp.float32).reshape(-1, d_in) @ router.reshape(d_in, experts)
  routing = route(spec, logits, task_bias)
  xs, a, b = nn.dtypes.promote_dtype(x_adapter.reshape(-1, d_in), lora_a, lora_b, dtype=module.dtype)
  a, b = a.reshape(experts, d_in, spec.r), b.reshape(experts, spec.r, d_out)
  if spec.dispatch == "sparse":
    delta = lora_dispatch.sparse_lora_experts(xs, a, b, routing.expert_ids, routing.weights, spec.scale)
  else:
    delta = lora_dispatch.dense_lora_experts(xs, a, b, routing.weights, spec.scale)
  active = jnp.mean(jnp.sum(routing.expert_ids >= 0, axis=-1).astype(jnp.float32))
  for name, value in {"aux_loss": routing.aux_loss, "active_experts": active, **routing.aux}.items():
    module.sow(ROUTING_COLLECTION, name, value)
  return delta.reshape(*batch_shape, *features)


def single_adapter_spec(spec):
  """The spec of one expert of the mixture `spec`: one adapter of the same rank, scale and targets."""
  return dataclasses.replace(
    spec, experts=0, expert_adapters=(), freeze_experts=False, router=LoRASpec.router, glider_scale=0.0
  )


def stack_experts(adapter_trees):
  """The mixture's expert leaves from E single-adapter trees: {'.../lora_a': [E, *in, r], '.../lora_b': [E, r, *out]}
  (nested dicts). Every tree must adapt the same layers with the same shapes."""
  flats = [traverse_util.flatten_dict(nn.unbox(t)) for t in adapter_trees]
  flats = [{p: v for p, v in f.items() if p[-1] in ("lora_a", "lora_b")} for f in flats]
  return traverse_util.unflatten_dict({p: jnp.stack([f[p] for f in flats]) for p in flats[0]})


def _without_routing(variables):
  """Variables less what the mixture's layers sowed while initialising (the router losses are outputs, not state)."""
  return {k: v for k, v in variables.items() if k != ROUTING_COLLECTION}


def _with_routing_losses(out, sown):
  """(outputs, ModelOutput) with the adapted layers' sown router losses (mean over layers) added to aux_loss and
  their terms to the metrics as `lora_<name>`."""
  outputs, model_out = out
  values = {}
  for path, value in traverse_util.flatten_dict(sown).items():
    values.setdefault(path[-1], []).extend(value)
  if not values:
    return out
  means = {name: jnp.mean(jnp.stack(v)) for name, v in values.items()}
  metrics = {**model_out.metrics, **{f"lora_{k}": v for k, v in means.items() if k != "aux_loss"}}
  return outputs, model_out.replace(aux_loss=model_out.aux_loss + means["aux_loss"], metrics=metrics)


def embedding_table(params):
  """The model's token embedding table [vocab, embed] (`params['embed']['embedding']`)."""
  table = nn.unbox(params.get("embed", {})).get("embedding") if isinstance(params.get("embed"), dict) else None
  if table is None:
    raise ConfigError(
      "config.lora.router='glider' embeds the input with the model's token embedding params['embed']['embedding'], "
      "which this model does not have; allowed: the zoo's language models"
    )
  return table


def glider_query_embeddings(table, tokens):
  """The query embedding of GLIDER's global router at each position: the mean input embedding of the tokens so far
  (causal) [guess: the zoo's stand-in for the embedded, LLM-written task instruction of papers.md B3].

  Args: table [vocab, d]; tokens [..., T] int. Returns: [..., T, d] float32.
  """
  emb = jnp.take(jnp.asarray(table, jnp.float32), tokens, axis=0)
  count = jnp.arange(1, tokens.shape[-1] + 1, dtype=jnp.float32)[:, None]
  return jnp.cumsum(emb, axis=-2) / count


def glider_bias(params, tokens):
  """GLIDER's global bias [tokens, E] (`lora_routers.glider_task_bias`) of each position's query embedding against
  the experts' task embeddings (`params[TASK_EMBEDDINGS]`, all zero until `glider_task_embeddings` fills them: then
  the bias is 0). With a KV cache the query is the tokens of the call (the cache does not keep their sum)."""
  task = jnp.asarray(nn.unbox(params[TASK_EMBEDDINGS]), jnp.float32)
  query = glider_query_embeddings(embedding_table(params), tokens)
  return lora_routers.glider_task_bias(task, query.reshape(-1, query.shape[-1]))


def glider_task_embeddings(table, batches):
  """One expert's task embedding [d]: the mean over its training sequences of `glider_query_embeddings` at their last
  position (the mean input embedding of each sequence) [guess, as `glider_query_embeddings`].

  Args: table [vocab, d]; batches: iterable of token arrays [B, T]."""
  total, count = 0.0, 0
  for tokens in batches:
    tokens = jnp.asarray(tokens)
    total = total + jnp.sum(glider_query_embeddings(table, tokens)[..., -1, :].reshape(-1, table.shape[-1]), axis=0)
    count += math.prod(tokens.shape[:-1])
  if not count:
    raise ValueError("glider_task_embeddings: no batches")
  return total / count


def _with_task_embeddings(spec, variables):
  """GLIDER's mixtures get the experts' task embeddings [E, embed] (zeros; frozen) as a top-level parameter."""
  if spec.router != "glider" or not spec.experts:
    return variables
  table = embedding_table(variables["params"])
  task = nn.LogicallyPartitioned(jnp.zeros((spec.experts, table.shape[-1]), jnp.float32), names=(None, "embed"))
  return {**variables, "params": {**variables["params"], TASK_EMBEDDINGS: task}}


_ACTIVE = threading.local()


@contextlib.contextmanager
def _adapted(spec, deterministic, task_bias=None):
  """The interceptor installed once (an `init` that calls `init_with_output` does not add the adapters twice)."""
  if getattr(_ACTIVE, "on", False):
    yield
    return
  _ACTIVE.on = True
  try:
    with nn.intercept_methods(_interceptor(spec, deterministic, task_bias)):
      yield
  finally:
    _ACTIVE.on = False


_CLASSES = {}


def _lora_class(base):
  """The subclass of model class `base` whose `init` / `apply` add the adapters (one per base class)."""
  if base in _CLASSES:
    return _CLASSES[base]

  class Adapted(base):
    lora: LoRASpec | None = None

    @nn.nowrap
    def init(self, *args, **kwargs):
      with _adapted(self.lora, True):
        return _with_task_embeddings(self.lora, _without_routing(super().init(*args, **kwargs)))

    @nn.nowrap
    def init_with_output(self, *args, **kwargs):
      with _adapted(self.lora, True):
        out, variables = super().init_with_output(*args, **kwargs)
        return out, _with_task_embeddings(self.lora, _without_routing(variables))

    @nn.nowrap
    def apply(self, *args, **kwargs):
      task_bias = None
      if self.lora.router == "glider" and self.lora.experts and kwargs.get("method") is None:
        tokens = kwargs["tokens"] if "tokens" in kwargs else args[1]
        task_bias = glider_bias(args[0]["params"], tokens)
      with _adapted(self.lora, kwargs.get("deterministic", True), task_bias):
        if not self.lora.experts or kwargs.get("method") is not None:
          return super().apply(*args, **kwargs)
        mutable = kwargs.pop("mutable", False)  # the mixture's router losses come back through ROUTING_COLLECTION
        extra = (
          True if mutable is True else [*([mutable] if isinstance(mutable, str) else mutable or ()), ROUTING_COLLECTION]
        )
        out, updated = super().apply(*args, mutable=extra, **kwargs)
        updated = dict(updated)
        out = _with_routing_losses(out, updated.pop(ROUTING_COLLECTION, {}))
        return (out, updated) if mutable is not False else out

    @nn.nowrap
    def trainable_params(self, params):
      """The adapters and the base parameters `lora.trainable_params` names train (and the base model's own
      `trainable_params` hook still freezes what it freezes); every other parameter is frozen."""
      base_params, _ = split_adapters(params)
      flags = {}
      hook = getattr(super(), "trainable_params", None)
      if hook is not None:
        flags = traverse_util.flatten_dict(hook(base_params))
      out = {}
      for path in traverse_util.flatten_dict(params):
        name = "/".join(str(p) for p in path)
        if path[-1] == TASK_EMBEDDINGS:  # fixed embeddings of the experts' data (`glider_task_embeddings`)
          out[path] = False
        elif path[-1] in ADAPTER_LEAVES:
          out[path] = not (self.lora.freeze_experts and path[-1] != "lora_router")
        else:
          out[path] = any(re.search(p, name) for p in self.lora.trainable_params) and flags.get(path, True)
      return traverse_util.unflatten_dict(out)

    @nn.nowrap
    def frozen_storage(self, frozen):
      """The frozen parameters as the train state stores them: with `lora.quantize='nf4'` the kernels of the adapted
      layers become `nf4.NF4Tensor`s (already quantised ones are kept); everything else as it is."""
      return quantize_frozen(frozen, self.lora)

  Adapted.__name__ = Adapted.__qualname__ = f"LoRA{base.__name__}"
  _CLASSES[base] = Adapted
  return Adapted


def with_lora(model, spec):
  """`model` (a zoo model) with LoRA adapters on the `DenseGeneral` layers `spec` targets.

  The result has the model's fields, class attributes and methods (`exposes`, `init_cache`, `num_params`, ...); its
  params hold the base parameters at their usual paths plus `lora_a` / `lora_b` beside each adapted kernel.
  """
  if not isinstance(spec, LoRASpec):
    raise TypeError(f"with_lora: spec must be a LoRASpec, got {type(spec).__name__}")
  if getattr(model, "lora", None) is not None:
    raise ConfigError(f"{type(model).__name__} already has LoRA adapters")
  skip = ("parent", "name")
  fields = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init and f.name not in skip}
  return _lora_class(type(model))(**fields, lora=spec)


# ------------------------------------------------------------------------------------------------- checks, trees


def _name(path):
  return "/".join(str(p) for p in path)


def split_adapters(params):
  """(base params, adapters): nested dicts of the non-LoRA leaves and of the `lora_a` / `lora_b` leaves."""
  flat = traverse_util.flatten_dict(params, is_leaf=lambda _, x: isinstance(x, nn.Partitioned))
  base = {p: v for p, v in flat.items() if p[-1] not in ADAPTER_LEAVES}
  adapters = {p: v for p, v in flat.items() if p[-1] in ADAPTER_LEAVES}
  return traverse_util.unflatten_dict(base), traverse_util.unflatten_dict(adapters)


def adapted_modules(params):
  """The '/'-joined module paths that hold adapters, sorted."""
  flat = traverse_util.flatten_dict(nn.unbox(params))
  return sorted({_name(p[:-1]) for p in flat if p[-1] == "lora_a"})


def check_targets(spec, params):
  """Every pattern of `spec` adapts at least one `DenseGeneral` and hits nothing LoRA cannot adapt.

  Args:
    spec: the LoRASpec.
    params: the adapted model's params (arrays or ShapeDtypeStructs, boxed or not).

  Raises:
    ConfigError naming the pattern: one that matches a weight matrix that is not a `DenseGeneral` kernel (the
      stacked expert weights of `zoo.routing`, an embedding table), or one that matches no `DenseGeneral` layer; and
      a `trainable_params` pattern that matches no base parameter.
  """
  flat = traverse_util.flatten_dict(nn.unbox(params))
  adapted = adapted_modules(params)
  targets = [m[: -len(EXPERT_SUFFIX)] if m.endswith(EXPERT_SUFFIX) else m for m in adapted]  # expert weights by name
  dense = sorted({_name(p[:-1]) for p in flat if p[-1] == "kernel"})
  others = [
    _name(p)
    for p, v in flat.items()
    if p[-1] not in ("kernel", *ADAPTER_LEAVES) and len(v.shape) >= 2 and _name(p) not in targets
  ]
  for pattern in spec.target_modules:
    hits = [n for n in others if re.search(pattern, n)]
    if hits:
      raise ConfigError(
        f"config.lora.target_modules: pattern {pattern!r} matches {len(hits)} weight(s) that are neither "
        f"DenseGeneral layers nor MoEFFN expert weights, e.g. {hits[:3]} (embeddings, other experts); anchor the "
        "pattern to the layers to adapt, e.g. 'attention/(query|value)$'"
      )
    if not any(re.search(pattern, m) for m in targets):
      raise ConfigError(
        f"config.lora.target_modules: pattern {pattern!r} matches no DenseGeneral layer or MoE expert weight; "
        f"module paths look like {dense[:6]} ({len(dense)} layers)"
      )
  base_names = [_name(p) for p in flat if p[-1] not in ADAPTER_LEAVES]
  for pattern in spec.trainable_params:
    if not any(re.search(pattern, n) for n in base_names):
      raise ConfigError(
        f"config.lora.trainable_params: pattern {pattern!r} matches no base parameter; parameter paths look like "
        f"{base_names[:4]}"
      )
  return adapted


def quantize_frozen(frozen, spec):
  """`frozen` (nested dict, leaves boxed or not) with the adapted layers' kernels in NF4 when `spec.quantize` says so.

  Raises:
    ConfigError naming the layer: a kernel whose size is not a multiple of the NF4 block (64).
  """
  if spec.quantize != "nf4" or not frozen:
    return frozen
  is_leaf = lambda _, x: isinstance(x, (nn.Partitioned, nf4.NF4Tensor))
  flat = traverse_util.flatten_dict(frozen, is_leaf=is_leaf)
  for path, value in flat.items():
    if path[-1] != "kernel" or isinstance(value, nf4.NF4Tensor) or not spec.targets(_name(path[:-1])):
      continue
    kernel = nn.unbox(value)
    if kernel.size % nf4.BLOCK_SIZE:
      raise ConfigError(
        f"config.lora.quantize='nf4': the kernel of {_name(path[:-1])} has {kernel.size} values, not a multiple of "
        f"the NF4 block ({nf4.BLOCK_SIZE}); allowed: quantize='' or target_modules without that layer"
      )
    flat[path] = nf4.quantize(kernel)
  return traverse_util.unflatten_dict(flat)


def _delta(module, lora_a, lora_b, scale):
  """(path of the weight the adapter at `module` adapts, `scale * A . B` in that weight's layout): a `DenseGeneral`
  kernel [*contracted, *features], or a stacked expert weight [E, in, out] (adapter at `<weight>_lora`)."""
  a, b = jnp.asarray(lora_a, jnp.float32), jnp.asarray(lora_b, jnp.float32)
  if module[-1].endswith(EXPERT_SUFFIX):
    return (*module[:-1], module[-1][: -len(EXPERT_SUFFIX)]), scale * jnp.einsum("eir,ero->eio", a, b)
  return (*module, "kernel"), scale * jnp.tensordot(a, b, axes=1)


def merge(params, spec):
  """The base model's params with every adapter folded into its kernel (`W + (alpha / r) A B`) and the adapters
  dropped: `base_model.apply` on them gives the adapted model's output (deterministic)."""
  if spec.experts:
    raise ConfigError("a mixture of LoRA experts (config.lora.experts > 0) routes per token; it cannot be merged")
  base, adapters = split_adapters(nn.unbox(params))
  flat = traverse_util.flatten_dict(base, is_leaf=lambda _, x: isinstance(x, nf4.NF4Tensor))
  for module, leaves in traverse_util.flatten_dict(adapters, is_leaf=_is_adapter).items():
    path, delta = _delta(module, leaves["lora_a"], leaves["lora_b"], spec.scale)
    kernel = flat[path]
    if isinstance(kernel, nf4.NF4Tensor):  # a QLoRA base: merged in float32
      kernel = nf4.dequantize(kernel)
    flat[path] = (kernel + delta).astype(kernel.dtype)
  return traverse_util.unflatten_dict(flat)


def unmerge(merged, adapters, spec):
  """The inverse of `merge`: the adapted model's params from merged params and the adapters (`split_adapters`)."""
  flat = traverse_util.flatten_dict(nn.unbox(merged))
  adapters = nn.unbox(adapters)
  for module, leaves in traverse_util.flatten_dict(adapters, is_leaf=_is_adapter).items():
    path, delta = _delta(module, leaves["lora_a"], leaves["lora_b"], spec.scale)
    flat[path] = (flat[path] - delta).astype(flat[path].dtype)
    flat[(*module, "lora_a")], flat[(*module, "lora_b")] = leaves["lora_a"], leaves["lora_b"]
  return traverse_util.unflatten_dict(flat)


def _is_adapter(path, value):
  del path
  return hasattr(value, "keys") and "lora_a" in value


def spec_from_config(lora_config):
  """The LoRASpec of `config.lora`, or None when `r` is 0 (no adapters).

  Raises:
    ConfigError naming the key: a negative rank, an adapter directory without a rank, or a bad value (`LoRASpec`).
  """
  if not lora_config:
    return None
  r = lora_config.get("r", 0)
  if isinstance(r, bool) or not isinstance(r, int) or r < 0:
    raise ConfigError(f"config.lora.r={r!r} is invalid; allowed: an integer >= 1, or 0 for no adapters")
  if r == 0:
    if lora_config.get("adapter"):
      raise ConfigError(
        f"config.lora.adapter={lora_config.adapter!r} needs adapters: set config.lora.r to the adapter's rank"
      )
    return None
  spec = LoRASpec(
    r=r,
    alpha=lora_config.get("alpha", 16.0),
    dropout=lora_config.get("dropout", 0.0),
    target_modules=tuple(lora_config.get("target_modules", DEFAULT_TARGETS)),
    trainable_params=tuple(lora_config.get("trainable_params", ())),
    quantize=lora_config.get("quantize", ""),
    experts=lora_config.get("experts", 0),
    router=lora_config.get("router", "lora_mixer"),
    top_k=lora_config.get("top_k", 2),
    dispatch=lora_config.get("dispatch", "dense"),
    expert_adapters=tuple(lora_config.get("expert_adapters", ())),
    freeze_experts=lora_config.get("freeze_experts", False),
    glider_scale=lora_config.get("glider_scale", lora_routers.GLIDER_SCALE_HELD_IN),
  )
  if spec.router == "glider" and spec.experts and spec.glider_scale and not spec.expert_adapters:
    if not lora_config.get("adapter"):
      raise ConfigError(
        "config.lora.router='glider' with glider_scale > 0 needs config.lora.expert_adapters (each expert's task "
        "embedding comes from its run's training data) or a GLIDER mixture in config.lora.adapter; set "
        "glider_scale=0 to train the local routers alone"
      )
  return spec
