"""RMoE LM: a mixture-of-experts decoder whose routers share one GRU along depth (papers.md A3).

Qiu et al. 2024, "Layerwise Recurrent Router for Mixture-of-Experts" (qiuzh20/RMoE), Sec. 3:
- router of MoE layer i (`zoo.routing.recurrent.RecurrentRouter`): `x'_i = W1_i h_i` (embed -> router_hidden_dim,
  256), `g_i = GRU(x'_i, g_{i-1})` with ONE GRU cell shared by every layer (`zoo.routing.recurrent.GRUCell`, owned by
  the model as `router_gru`), `g = 0` at the first MoE layer, carried along depth only (never along the sequence),
  `logits_i = W2_i g_i`; softmax -> top-2 -> renormalise; `h_i` is the FFN input (after the FFN's RMSNorm);
- 8 experts, no z-loss, and ONE load-balance loss with coefficient 1e-3 over the router outputs of all MoE layers
  pooled (`zoo.routing.recurrent.pooled_load_balance_loss`; the code's `load_balancing_loss_func`, which
  concatenates every layer's router logits along the tokens, and `router_aux_loss_coef=0.001`:
  `llama_moe_rnn/llama_moe_modeling.py` and `configuration_llama_moe_rnn.py`), not a sum of per-layer losses. Its
  scale is the code's (minimum k under uniform routing); the per-layer Switch losses stay in the metrics
  ('load_balance', unweighted). The linear baseline is trained with the same pooled loss, as in the code;
- option (`num_shared_experts` >= 1): an always-on shared expert mixed as
  `(1 - shared_mix) * routed + shared_mix * shared` (the code's `moe_weight` / `share_weight`, 0.5 / 0.5);
- baseline: the same model with `router_type='linear'` (`moe_lm`'s linear softmax top-k router).

Because the router state runs along depth only, each token's routing depends only on its own hidden states, so cached
decoding equals the full forward (with 'dense' or 'dropless' dispatch, as for `moe_lm`).

Everything else is `moe_lm`: decoder blocks, attention with KV cache, expert dispatch (`zoo.routing.MoEFFN` with a
precomputed routing), metrics stacked per MoE layer, weighted aux loss.
"""

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import MLP
from zoo.models.decoder_parts import ExpertLayers, SharedExperts, TopKRouting, layer_expert_ids
from zoo.models.dense_lm import DenseLM
from zoo.models.registry import ConfigError, check_config, register_model
from zoo.routing import MoEFFN
from zoo.routing.recurrent import GRUCell, RecurrentRouter, pooled_load_balance_loss

ROUTER_TYPES = ("gru", "linear")


class RMoEFFN(nn.Module):
  """One RMoE FFN: a router (recurrent or linear), routed experts, optionally a shared expert mixed in.

  Returns `(y, (aux, metrics, expert_ids, router_state))` through `DecoderBlock` (expert_ids [batch, length, k]); the
  model threads `router_state` to the next MoE layer.

  Attributes:
    router: an unbound `RecurrentRouter` or `zoo.routing.Router` (adopted as the child 'router').
    num_experts, expert_mlp_dim, activation, dispatch, capacity_factor: of the routed experts (`MoEFFN`).
    shared_mlp_dim: width of the shared expert (0 = none).
    shared_mix: the shared expert's weight; the routed output gets `1 - shared_mix`.
  """

  router: nn.Module
  num_experts: int
  expert_mlp_dim: int
  activation: str = "swiglu"
  dispatch: str | None = None
  capacity_factor: float | None = 1.25
  shared_mlp_dim: int = 0
  shared_mix: float = 0.5
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic=True, router_state=None, gru_params=None):
    """x: [batch, length, embed]; router_state: [tokens, hidden] or None; gru_params: the shared cell (GRU only)."""
    if isinstance(self.router, RecurrentRouter):
      if gru_params is None:
        raise ValueError("RMoEFFN with a RecurrentRouter needs gru_params (the shared GRUCell's parameters)")
      routing, router_state = self.router(x, router_state, gru_params)
    else:
      routing = self.router(x, deterministic=deterministic)
    y, aux, metrics = MoEFFN(
      self.num_experts,
      self.expert_mlp_dim,
      activation=self.activation,
      dispatch=self.dispatch,
      capacity_factor=self.capacity_factor,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="experts",
    )(x, routing=routing)
    if self.shared_mlp_dim:
      shared = MLP(
        self.shared_mlp_dim,
        activation=self.activation,
        dtype=self.dtype,
        param_dtype=self.param_dtype,
        name="shared_expert",
      )(x)
      y = (1.0 - self.shared_mix) * y + self.shared_mix * shared
    # The router outputs of every layer go to the model's pooled load-balance loss (removed from its metrics).
    metrics = {**metrics, "router_probs": routing.probs, "router_expert_ids": routing.expert_ids}
    return y, (aux, metrics, layer_expert_ids(routing, x), router_state)


@register_model("rmoe")
class RMoELM(ExpertLayers, TopKRouting, SharedExperts, DenseLM):
  """`moe_lm`'s fields with RMoE's layerwise recurrent router (see the module docstring).

  Attributes (besides those of `moe_lm`'s field groups; `router` must stay 'softmax_topk', the score RMoE uses):
    router_type: 'gru' (RMoE) | 'linear' (the baseline: `moe_lm`'s linear router).
    router_hidden_dim: GRU width and output width of W1_i (256).
    shared_mix: with `num_shared_experts` >= 1, `y = (1 - shared_mix) routed + shared_mix shared` (0.5).
  """

  load_balance_coef: float = 1e-3
  z_loss_coef: float = 0.0
  router_type: str = "gru"
  router_hidden_dim: int = 256
  shared_mix: float = 0.5

  def __post_init__(self):
    check_config(
      self, positive=("router_hidden_dim",), intervals={"shared_mix": "[0, 1]"}, choices={"router_type": ROUTER_TYPES}
    )
    if self.router != "softmax_topk":
      raise ConfigError(
        f"config.model.router={self.router!r}: RMoE routes with 'softmax_topk' (use router_type to "
        "pick the recurrent or linear router)"
      )
    if self.shared_expert_gate:
      raise ConfigError(
        "config.model.shared_expert_gate=True is not part of RMoE; its shared expert is mixed by shared_mix"
      )
    if self.router_type == "gru" and self.router_jitter > 0:
      raise ConfigError(f"config.model.router_jitter={self.router_jitter} applies to router_type='linear' only")
    super().__post_init__()

  def make_router(self):
    if self.router_type == "linear":
      return super().make_router()
    return RecurrentRouter(
      parent=None,
      num_experts=self.num_experts,
      num_experts_per_tok=self.num_experts_per_tok,
      hidden_dim=self.router_hidden_dim,
      renormalize=self.renormalize,
      n_group=self.n_group,
      topk_group=self.topk_group,
      routed_scaling_factor=self.routed_scaling_factor,
      per_sequence_balance=self.per_sequence_balance,
    )

  def moe_ffn_factory(self):
    """Builds the RMoE FFN of one layer (`name=` is given by `DecoderBlock`); each call gets its own router."""
    kwargs = dict(self.expert_kwargs(), shared_mlp_dim=self.shared_mlp_dim, shared_mix=self.shared_mix)
    return lambda name: RMoEFFN(router=self.make_router(), name=name, **kwargs)

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """As `MoELM.__call__` (tokens [batch, length] -> logits [batch, length, vocab_size] float32, ModelOutput);
    the router state runs along depth; `aux_loss` = load_balance_coef x the pooled load-balance loss + z_loss_coef x
    the sum of the per-layer z-losses."""
    gru_params = GRUCell(self.router_hidden_dim, name="router_gru")() if self.router_type == "gru" else None
    embed, x, positions = self.embed_tokens(tokens, positions, cache, deterministic)
    # The router state goes along depth: each MoE layer's FFN returns it as the last item of its aux.
    x, out, aux_losses = self.expert_layers(
      x,
      positions,
      cache,
      deterministic,
      self.decoder_block,
      lambda state: {"router_state": state, "gru_params": gru_params},
    )
    metrics = dict(out.metrics)
    probs, expert_ids = metrics.pop("router_probs"), metrics.pop("router_expert_ids")
    balance = pooled_load_balance_loss(
      probs,
      expert_ids,
      self.num_experts,
      self.num_experts_per_tok,
      sequence_length=tokens.shape[-1] if self.per_sequence_balance else None,
    )
    z_loss = sum(aux["z_loss"] for aux in aux_losses)
    aux_loss = self.load_balance_coef * balance + self.z_loss_coef * z_loss
    return self.output_logits(embed, x), out.replace(aux_loss=aux_loss, metrics=metrics)

  def moe_ffn_params(self):
    """Parameters of one MoE layer's FFN: its router (linear embed x E, or W1_i and W2_i), experts, shared expert."""
    h = self.router_hidden_dim
    router = self.router_params() if self.router_type == "linear" else self.embed_dim * h + h * self.num_experts
    return router + self.expert_ffn_params() + self.shared_params()

  def num_params(self):
    """Analytic parameter count: `ExpertLayers.num_params` plus the GRU cell the layers share (router_type='gru')."""
    h = self.router_hidden_dim
    return super().num_params() + (0 if self.router_type == "linear" else 2 * 3 * h * h + 2 * 3 * h)
