"""Read-ME pre-gating router and expert extraction (papers.md A4; Cai et al. 2024, "Read-ME: Refactorizing LLMs as
Router-Decoupled Mixture of Experts with System Co-Design", Sec. 3-4).

Expert extraction (Sec. 3.1): for each data domain d, the importance of FFN neuron j of a layer is the mean absolute
value of the input of `down_proj` (`act(x W_gate) * (x W_up)`, the [mlp] activation) over the domain's tokens. Each
domain keeps its top `keep_fraction` (50%) neurons; the shared expert is the intersection of all domain masks and
expert e is `mask_e - shared`. `readme_params_from_dense` slices a dense LM's FFN weights into those experts.

Pre-gating router (Sec. 3.2): a small causal transformer over the token ids only, ending in `Linear(E)`; its argmax
is ONE expert id per token used by every layer, known before the backbone runs (`pregate_routing`). Its targets come
from the backbone's own per-layer expert activation statistics (`expert_activation_scores`, `pregate_targets`) and
its loss is `0.75 * CE(label smoothing 0.5) + 0.25 * soft CE` (`pregate_loss`).

The statistics and parameter surgery are numpy (outside jit, variable-size slices); the losses are jnp (float32).
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from zoo.layers import MLP, Attention, DecoderBlock, DenseGeneral, Embed, KVCache, RMSNorm
from zoo.routing.routers import softmax_topk


def down_proj_inputs(model, params, tokens):
  """The input of every FFN's `down` projection of a dense LM (`zoo.models.dense_lm`), layer by layer.

  Args:
    model: a `DenseLM` (or any model whose FFNs are `zoo.layers.MLP` with a `down` projection).
    params: its params.
    tokens: [batch, length] int32.

  Returns:
    [layers, batch, length, mlp] float32 numpy array, in call order of the `down` projections.
  """
  captured = []

  def interceptor(next_fun, args, kwargs, context):
    module = context.module
    if context.method_name == "__call__" and module.name == "down" and isinstance(module.parent, MLP):
      captured.append(args[0])
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(interceptor):
    model.apply({"params": params}, tokens)
  if not captured:
    raise ValueError(f"{type(model).__name__} has no MLP `down` projection to take statistics from")
  return np.stack([np.asarray(h, np.float32) for h in captured])


def neuron_importance(hidden, mask=None):
  """Mean |activation| per FFN neuron over the valid tokens (Read-ME Sec. 3.1).

  Args:
    hidden: [layers, batch, length, mlp] inputs of `down` (from `down_proj_inputs`).
    mask: [batch, length] 1 for real tokens, 0 for padding; None = all tokens.

  Returns:
    [layers, mlp] float64 importance.
  """
  hidden = np.abs(np.asarray(hidden, np.float64))
  if hidden.ndim != 4:
    raise ValueError(f"hidden must be [layers, batch, length, mlp], got shape {hidden.shape}")
  mask = np.ones(hidden.shape[1:3]) if mask is None else np.asarray(mask, np.float64)
  if mask.shape != hidden.shape[1:3]:
    raise ValueError(f"mask shape {mask.shape} must be [batch, length] = {hidden.shape[1:3]}")
  if mask.sum() <= 0:
    raise ValueError("mask selects no token")
  return np.einsum("lbtm,bt->lm", hidden, mask) / mask.sum()


def expert_masks(importance, keep_fraction=0.5):
  """Shared and domain-expert neuron masks from per-domain importance (Read-ME Sec. 3.1).

  Domain d keeps its `k = round(keep_fraction * mlp)` most important neurons (ties broken by the lower index);
  `shared = AND_d mask_d`; `expert_d = mask_d AND NOT shared`.

  Args:
    importance: [layers, domains, mlp] (or [domains, mlp] for one layer) mean |input of down| per domain.
    keep_fraction: fraction of neurons each domain keeps, in (0, 1].

  Returns:
    (shared [layers, mlp] bool, experts [layers, domains, mlp] bool) (without the layers axis for 2-D input).
  """
  importance = np.asarray(importance, np.float64)
  if importance.ndim not in (2, 3):
    raise ValueError(f"importance must be [layers, domains, mlp] or [domains, mlp], got shape {importance.shape}")
  if importance.shape[-2] < 2:
    raise ValueError(f"expert extraction needs >= 2 domains, got {importance.shape[-2]}")
  if not 0.0 < keep_fraction <= 1.0:
    raise ValueError(f"keep_fraction={keep_fraction} must be in (0, 1]")
  mlp = importance.shape[-1]
  k = max(1, int(round(keep_fraction * mlp)))
  order = np.argsort(-importance, axis=-1, kind="stable")[..., :k]
  keep = np.zeros(importance.shape, bool)
  np.put_along_axis(keep, order, True, axis=-1)
  shared = keep.all(axis=-2)
  return shared, keep & ~shared[..., None, :]


def extracted_widths(shared, experts):
  """(shared_mlp_dim, expert_mlp_dim): the widest shared expert and the widest domain expert over the layers."""
  return int(np.asarray(shared).sum(-1).max()), int(np.asarray(experts).sum(-1).max())


def _columns(kernel, mask, width):
  """kernel [embed, mlp] -> [embed, width]: the masked columns, zero-padded on the right."""
  cols = kernel[:, mask]
  if cols.shape[1] > width:
    raise ValueError(f"{cols.shape[1]} neurons do not fit the width {width}")
  return np.pad(cols, ((0, 0), (0, width - cols.shape[1])))


def readme_params_from_dense(dense_params, shared, experts, readme_params):
  """Read-ME params from a dense LM's params and the extraction masks (Read-ME Sec. 3.1).

  Everything but the FFNs and the router is copied; layer i's FFN becomes the shared expert (the `shared` neurons)
  and one expert per domain (the `experts[i, e]` neurons) as sliced gate/up columns and down rows, zero-padded to the
  widths of `readme_params` (a padded neuron has zero weights in and out, so it adds exactly 0). The router keeps
  its params from `readme_params`, except its token embedding, set to the LM's.

  Args:
    dense_params: unboxed `dense_lm` params (`layers_i/ffn/{gate,up,down}/kernel`).
    shared: [layers, mlp] bool.
    experts: [layers, experts, mlp] bool.
    readme_params: unboxed params of the target `readme_moe` model (e.g. from `init`), giving the shapes.

  Returns:
    A new params dict with the structure of `readme_params`.
  """
  dense = jax.tree.map(np.asarray, nn.meta.unbox(dense_params))
  out = jax.tree.map(np.asarray, nn.meta.unbox(readme_params))
  shared, experts = np.asarray(shared, bool), np.asarray(experts, bool)
  num_layers = sum(1 for k in dense if k.startswith("layers_"))
  if shared.shape[0] != num_layers or experts.shape[0] != num_layers:
    raise ValueError(f"masks cover {shared.shape[0]} / {experts.shape[0]} layers, the dense model has {num_layers}")
  for key, value in dense.items():
    if not key.startswith("layers_"):
      if key not in out:
        raise ValueError(f"dense param {key!r} has no place in the Read-ME params {sorted(out)}")
      out[key] = value
  for i in range(num_layers):
    layer, ffn = dense[f"layers_{i}"], dense[f"layers_{i}"]["ffn"]
    target = out[f"layers_{i}"]
    for key, value in layer.items():
      if key != "ffn":
        target[key] = value
    moe = target["ffn"]
    if experts.shape[1] != moe["down"].shape[0]:
      raise ValueError(f"{experts.shape[1]} expert masks for a model with {moe['down'].shape[0]} experts")
    width, shared_width = moe["down"].shape[1], moe["shared_down"].shape[0]
    for name in [n for n in ("gate", "up") if n in ffn]:
      kernel = ffn[name]["kernel"]
      moe[f"shared_{name}"] = _columns(kernel, shared[i], shared_width)
      moe[name] = np.stack([_columns(kernel, m, width) for m in experts[i]])
    down = ffn["down"]["kernel"]
    moe["shared_down"] = _columns(down.T, shared[i], shared_width).T
    moe["down"] = np.stack([_columns(down.T, m, width).T for m in experts[i]])
  out["router"]["embed"]["embedding"] = dense["embed"]["embedding"]
  return out


def expert_activation_scores(hidden, valid):
  """Per-token expert scores: mean |input of down| over each expert's real neurons (the target statistic).

  Args:
    hidden: [tokens, experts, expert_mlp] activations `act(x W_gate_e) * (x W_up_e)` of every expert.
    valid: [experts, expert_mlp] bool, False on zero-padded neurons.

  Returns:
    [tokens, experts] float32.
  """
  valid = valid.astype(jnp.float32)
  return jnp.einsum("teh,eh->te", jnp.abs(hidden.astype(jnp.float32)), valid) / jnp.maximum(valid.sum(-1), 1.0)


def pregate_targets(scores):
  """Soft router targets from per-layer scores [layers, tokens, experts]: each layer's scores normalised to sum 1,
  averaged over layers [guess: Read-ME's exact aggregation is not stated]. Returns [tokens, experts] float32."""
  scores = scores.astype(jnp.float32)
  per_layer = scores / jnp.maximum(scores.sum(-1, keepdims=True), 1e-9)
  return per_layer.mean(0)


def pregate_loss(logits, targets, mask=None, *, label_smoothing=0.5, hard_weight=0.75, soft_weight=0.25):
  """Router loss `hard_weight * CE(argmax target, label smoothing) + soft_weight * CE(soft target)` (Read-ME
  Sec. 3.2; the weights 0.75 / 0.25 and smoothing 0.5 are from its code, their exact form is a [guess]).

  Args:
    logits: [tokens, experts] router logits.
    targets: [tokens, experts] soft targets (rows sum to 1).
    mask: [tokens] 1 for real tokens (None = all).
    label_smoothing: smoothing of the one-hot argmax target (mass spread uniformly over all experts).

  Returns:
    (loss scalar, accuracy scalar: fraction of tokens whose router argmax is the target argmax).
  """
  if logits.shape != targets.shape or logits.ndim != 2:
    raise ValueError(f"logits {logits.shape} and targets {targets.shape} must both be [tokens, experts]")
  num_experts = logits.shape[-1]
  log_probs = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  hard = jax.nn.one_hot(jnp.argmax(targets, -1), num_experts)
  hard = (1.0 - label_smoothing) * hard + label_smoothing / num_experts
  per_token = -jnp.sum((hard_weight * hard + soft_weight * targets) * log_probs, -1)
  correct = (jnp.argmax(logits, -1) == jnp.argmax(targets, -1)).astype(jnp.float32)
  mask = jnp.ones(per_token.shape, jnp.float32) if mask is None else mask.astype(jnp.float32)
  total = jnp.maximum(mask.sum(), 1.0)
  return jnp.sum(per_token * mask) / total, jnp.sum(correct * mask) / total


def pregate_routing(logits):
  """Top-1 routing with weight exactly 1 (no gate weight) from router logits [tokens, experts]; the Routing's aux
  losses and metrics are the standard ones of `softmax_topk`."""
  return softmax_topk(logits, 1, renormalize=True)


class PreGateRouter(nn.Module):
  """The pre-gating router: token embedding -> `num_layers` causal decoder blocks -> RMSNorm -> Linear(E)
  (Read-ME Sec. 3.2). It sees only token ids, so the routes of a sequence are known before the backbone runs.

  Attributes:
    vocab_size: vocabulary size (the LM's, so the embedding can be initialised from the LM's).
    num_experts: E.
    embed_dim: width (= the LM's embed_dim to reuse its embedding).
    num_layers, num_heads, mlp_dim: the blocks [guess: Read-ME uses a small transformer; sizes are ours].
  """

  vocab_size: int
  num_experts: int
  embed_dim: int
  num_layers: int = 1
  num_heads: int = 2
  mlp_dim: int = 128
  norm_epsilon: float = 1e-6
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @property
  def head_dim(self):
    return self.embed_dim // self.num_heads

  def init_cache(self, batch_size, max_length):
    """A tuple of `num_layers` KVCache."""
    return tuple(
      KVCache.create(batch_size, max_length, self.num_heads, self.head_dim, self.dtype) for _ in range(self.num_layers)
    )

  @nn.compact
  def __call__(self, tokens, positions, cache=None):
    """tokens, positions: [batch, length] -> (logits [batch, length, experts] float32, new cache or None)."""
    if self.embed_dim % self.num_heads or self.head_dim % 2:
      raise ValueError(
        f"router embed_dim={self.embed_dim} must split into num_heads={self.num_heads} heads of even width"
      )
    dtypes = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = Embed(self.vocab_size, self.embed_dim, name="embed", **dtypes)(tokens)
    attention = functools.partial(Attention, num_heads=self.num_heads, head_dim=self.head_dim, **dtypes)
    ffn = functools.partial(MLP, hidden_dim=self.mlp_dim, **dtypes)
    new_cache = []
    for i in range(self.num_layers):
      x, layer_cache, _ = DecoderBlock(attention, ffn, norm_epsilon=self.norm_epsilon, name=f"layers_{i}", **dtypes)(
        x, positions, None if cache is None else cache[i]
      )
      new_cache.append(layer_cache)
    x = RMSNorm(self.norm_epsilon, name="final_norm", **dtypes)(x)
    logits = DenseGeneral(self.num_experts, kernel_axes=("embed", "expert"), name="head", **dtypes)(x)
    return logits.astype(jnp.float32), None if cache is None else tuple(new_cache)
