"""Layerwise recurrent router (RMoE: Qiu et al. 2024, "Layerwise Recurrent Router for Mixture-of-Experts", Sec. 3).

The router of MoE layer i projects the token's hidden state and feeds it to ONE GRU cell shared by all layers; the
GRU state is carried from MoE layer to MoE layer (along depth only, never along the sequence), so each layer's
routing sees the routing history of the earlier layers:

  x'_i = h_i W1_i                  (embed -> hidden, per layer)
  g_i  = GRU(x'_i, g_{i-1})        (one cell for all layers; g = 0 before the first MoE layer)
  logits_i = g_i W2_i              (hidden -> experts, per layer)

then softmax -> top-k -> renormalise (`zoo.routing.softmax_topk`). The shared cell's parameters are created once by
the model (`GRUCell`) and given to every layer's `RecurrentRouter` as arrays, so the sharing needs no module
aliasing and survives `nn.remat`.

The load-balance loss is one loss over the router outputs of all MoE layers pooled (`pooled_load_balance_loss`).
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.routing import losses, routers


def pooled_load_balance_loss(probs, expert_ids, num_experts, num_experts_per_tok, *, sequence_length=None):
  """RMoE's load-balance loss: ONE Switch loss over the tokens of all MoE layers pooled, `k E sum_e f_e P_e`.

  The authors' code (qiuzh20/RMoE, `llama_moe_rnn/llama_moe_modeling.py`, `load_balancing_loss_func` and its call
  in `LlamaForCausalLM.forward`) concatenates the router logits of every layer along the token axis, then
  computes the (early Hugging Face Mixtral) load-balance loss once: `E sum_e (selections of e per token) P_e`, where
  a token's k selections count k times, so its minimum under uniform routing is k. Here `f_e` (fraction of the
  pooled assignments, sums to 1; not differentiated) and `P_e` (mean pooled router probability) are
  `zoo.routing.losses.load_balance_loss`'s, hence the factor k. It is not the sum of per-layer losses: pooling
  averages f and P over the layers before multiplying them.

  Args:
    probs: [layers, tokens, E] router probabilities of each MoE layer (the same tokens in every layer).
    expert_ids: [layers, tokens, k] selected experts of each MoE layer.
    num_experts: E.
    num_experts_per_tok: k.
    sequence_length: when set, tokens are consecutive sequences of this length and the loss is pooled over the
      layers per sequence, then averaged over sequences (`per_sequence_balance`; not in the authors' code).

  Returns:
    scalar float32.
  """
  layers, tokens, _ = probs.shape
  if expert_ids.shape[:2] != (layers, tokens):
    raise ValueError(f"expert_ids {expert_ids.shape} and probs {probs.shape} must share [layers, tokens]")
  group = tokens if sequence_length is None else sequence_length
  if group < 1 or tokens % group:
    raise ValueError(f"sequence_length={sequence_length} must divide the number of tokens ({tokens})")

  def per_group(x):  # [layers, tokens, d] -> [groups * layers * group, d], each group's tokens of all layers together
    x = x.reshape(layers, tokens // group, group, x.shape[-1]).transpose(1, 0, 2, 3)
    return x.reshape(-1, x.shape[-1])

  return num_experts_per_tok * losses.load_balance_loss(
    per_group(probs),
    per_group(expert_ids),
    num_experts,
    sequence_length=None if sequence_length is None else layers * group,
  )


GRU_GATES = ("reset", "update", "candidate")


def gru_cell(params, x, h):
  """One GRU step (Cho et al. 2014, Eq. 5-8; the gate layout of PyTorch's GRUCell, which RMoE uses).

  r = sigmoid(x W_ir + b_ir + h W_hr + b_hr)
  z = sigmoid(x W_iz + b_iz + h W_hz + b_hz)
  n = tanh(x W_in + b_in + r * (h W_hn + b_hn))
  h' = (1 - z) * n + z * h

  Args:
    params: dict of float32 arrays 'input_kernel' [in, 3, hidden], 'hidden_kernel' [hidden, 3, hidden],
      'input_bias' and 'hidden_bias' [3, hidden]; gate order `GRU_GATES` (reset, update, candidate).
    x: [tokens, in] input.
    h: [tokens, hidden] previous state.

  Returns:
    [tokens, hidden] float32 new state.
  """
  hidden = params["hidden_kernel"].shape[0]
  if h.shape != x.shape[:1] + (hidden,):
    raise ValueError(f"GRU state must be [tokens, hidden]=({x.shape[0]}, {hidden}), got shape {h.shape}")
  if x.shape[-1] != params["input_kernel"].shape[0]:
    raise ValueError(f"GRU input width {x.shape[-1]} != input_kernel width {params['input_kernel'].shape[0]}")
  x, h = x.astype(jnp.float32), h.astype(jnp.float32)
  xi = jnp.einsum("ti,igh->tgh", x, params["input_kernel"]) + params["input_bias"]
  hh = jnp.einsum("ti,igh->tgh", h, params["hidden_kernel"]) + params["hidden_bias"]
  r = jax.nn.sigmoid(xi[:, 0] + hh[:, 0])
  z = jax.nn.sigmoid(xi[:, 1] + hh[:, 1])
  n = jnp.tanh(xi[:, 2] + r * hh[:, 2])
  return (1.0 - z) * n + z * h


class GRUCell(nn.Module):
  """Owns the parameters of the GRU cell shared by all RMoE routers; `__call__()` returns them for `gru_cell`.

  Initialisation: every weight and bias ~ N(0, init_std) (RMoE's `moe_router_init_std`, 0.02).

  Attributes:
    hidden_dim: state width (RMoE: 256); the input width is the same (the projections W1_i map to it).
    init_std: standard deviation of the initialisation.
  """

  hidden_dim: int
  init_std: float = 0.02

  @nn.compact
  def __call__(self):
    """Returns the dict of float32 parameter arrays that `gru_cell` takes."""
    init = nn.initializers.normal(self.init_std)
    h = self.hidden_dim
    shapes = {
      "input_kernel": ((h, 3, h), (None, None, None)),
      "hidden_kernel": ((h, 3, h), (None, None, None)),
      "input_bias": ((3, h), (None, None)),
      "hidden_bias": ((3, h), (None, None)),
    }
    return {
      name: nn.meta.unbox(self.param(name, nn.with_logical_partitioning(init, axes), shape, jnp.float32))
      for name, (shape, axes) in shapes.items()
    }


class RecurrentRouter(nn.Module):
  """RMoE router of one MoE layer: `W1_i`, the shared GRU step, `W2_i`, then softmax top-k (Sec. 3, Eq. 3-5).

  Attributes:
    num_experts: E.
    num_experts_per_tok: k (RMoE: 2).
    hidden_dim: GRU width (RMoE: 256).
    renormalize, n_group, topk_group, routed_scaling_factor: as in `zoo.routing.softmax_topk`.
    per_sequence_balance: compute the load-balance loss per sequence (x must be [batch, length, embed]).
    kernel_init: initialiser of W1_i and W2_i (N(0, 0.02) as RMoE).
  """

  num_experts: int
  num_experts_per_tok: int = 2
  hidden_dim: int = 256
  renormalize: bool = True
  n_group: int = 1
  topk_group: int = 1
  routed_scaling_factor: float = 1.0
  per_sequence_balance: bool = False
  kernel_init: Any = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self, x, state, gru_params):
    """Routes the tokens of x and advances the depth-wise router state.

    Args:
      x: [..., embed] the FFN input of this layer (e.g. [batch, length, embed]); routed as a flat list of tokens.
      state: [tokens, hidden_dim] the state after the previous MoE layer, or None at the first MoE layer (zeros).
      gru_params: the shared cell's parameters (`GRUCell()`).

    Returns:
      (Routing over the flattened tokens, new state [tokens, hidden_dim] float32).
    """
    if self.per_sequence_balance and x.ndim != 3:
      raise ValueError(f"RecurrentRouter.per_sequence_balance needs x as [batch, length, embed], got {x.shape}")
    embed = x.shape[-1]
    tokens = x.reshape(-1, embed).astype(jnp.float32)
    if state is None:
      state = jnp.zeros((tokens.shape[0], self.hidden_dim), jnp.float32)
    w1 = self.param(
      "input_proj",
      nn.with_logical_partitioning(self.kernel_init, ("embed", None)),
      (embed, self.hidden_dim),
      jnp.float32,
    )
    w2 = self.param(
      "output_proj",
      nn.with_logical_partitioning(self.kernel_init, (None, "expert")),
      (self.hidden_dim, self.num_experts),
      jnp.float32,
    )
    state = gru_cell(gru_params, tokens @ w1, state)
    logits = state @ w2
    routing = routers.softmax_topk(
      logits,
      self.num_experts_per_tok,
      renormalize=self.renormalize,
      n_group=self.n_group,
      topk_group=self.topk_group,
      routed_scaling_factor=self.routed_scaling_factor,
      sequence_length=x.shape[-2] if self.per_sequence_balance else None,
    )
    return routing, state
