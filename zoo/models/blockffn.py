"""BlockFFN LM: ReLU-routed, top-k-free block experts with chunk-level activation sparsity (papers.md A2).

Song et al. 2025, "BlockFFN: Towards End-Side Acceleration-Friendly Mixture-of-Experts with Chunk-Level Activation
Sparsity" (thunlp/BlockFFN), Sec. 3:
- router (Sec. 3.1): `s = W_r x`, `r = RMSNorm_noweight(ReLU(s)) * gain` (`zoo.routing.sparsity.ReLURouter`); no
  top-k, an expert with r_e = 0 is off, so each token uses a variable number of experts;
- experts: non-gated `y = sum_e r_e W_out,e SiLU(W_in,e x)` (`MoEFFN` with activation 'silu' and the dense routing
  r; `chunk_skip=True` runs `zoo.routing.sparsity.chunk_sparse_ffn`, which skips the experts inactive for a
  whole chunk);
- losses (Sec. 3.2): activation locality `lambda_al * BCE(alpha s_{t-1}, sigmoid(alpha s_t))` (alpha 100, lambda_al
  2e-3; the target is differentiated too) and chunk sparsification `lambda_cs * (1 - mean prod_{t in chunk}(1 -
  p_{t,e}))` with p from the router output before its gain, each averaged over layers as the authors do
  (thunlp/BlockFFN pretrain/cpm/dragonfly/modeling_dragonfly.py L521-530: `ave_transfer_loss /= len(self.layers)`,
  `ave_chunk_loss /= len(self.layers)`); lambda_cs adapts during training like the authors'
  `AdaptiveLinearScheduler` (`zoo.routing.sparsity.update_chunk_lambda`, state in 'routing_state/chunk_lambda');
- metrics: token-level sparsity TLS ('tls') and chunk-level sparsity CLS(L) ('cls_<L>' for each L of `cls_lengths`,
  default 8, 16 and 64; the paper's headline is CLS at 8 tokens) per layer, besides the routing metrics of `moe_lm`
  and the unweighted losses;
- per-token output (`exposes`, as `moe_lm`): `intermediates['expert_ids']` int32 [moe_layers, batch, length,
  num_experts] with `apply(..., mutable=['intermediates'])`; slot e holds e where r_e > 0, else -1.

Built from the dense LM and `moe_lm`'s `ExpertLayers` (which layers have experts, E, expert width, dispatch, the
layer loop collecting losses and metrics); `moe_lm`'s router and shared-expert keys do not apply and are rejected.
dispatch 'auto' = capacity on CPU, which with every slot possible costs what 'dense' costs. The locality loss runs
over each row of the batch as one document [guess: packed rows are not split at document boundaries].
"""

import flax.linen as nn
import jax.numpy as jnp

from zoo.models.decoder_parts import ExpertLayers, layer_expert_ids
from zoo.models.dense_lm import DenseLM
from zoo.models.registry import ConfigError, check_config, register_model
from zoo.routing import MoEFFN, routing_from_dense, sparsity


class BlockFFNLayer(nn.Module):
  """One BlockFFN FFN: ReLU router + non-gated block experts; returns `(y, (aux, metrics, expert_ids))` for
  `ExpertLayers.expert_layers` (expert_ids [batch, length, num_experts]: slot e holds e where r_e > 0, else -1).

  Attributes:
    num_experts, expert_mlp_dim: E blocks of this width.
    locality_alpha: sharpness alpha of the locality loss.
    chunk_length: chunk of the chunk-sparsification loss (must divide the sequence length; training and full
      forwards only: a shorter call, e.g. cached decoding, skips it).
    cls_lengths: the window lengths L of the CLS(L) metrics 'cls_<L>' (a call shorter than L skips that one).
    dispatch: MoEFFN dispatch, or 'chunk_skip'.
    capacity_factor: of 'capacity' dispatch (`MoEFFN`).
  """

  num_experts: int
  expert_mlp_dim: int
  locality_alpha: float = 100.0
  chunk_length: int = 64
  cls_lengths: tuple[int, ...] = (8, 16, 64)
  dispatch: str | None = None
  capacity_factor: float | None = 1.25
  dtype: object = jnp.float32
  param_dtype: object = jnp.float32

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    """x: [batch, length, embed] -> (y [batch, length, embed], (aux, metrics, expert_ids))."""
    del deterministic
    r, logits, pre_gain = sparsity.ReLURouter(self.num_experts, name="router")(x)
    flat_r, flat_logits = r.reshape(-1, self.num_experts), logits.reshape(-1, self.num_experts)
    routing = routing_from_dense(flat_r, flat_logits, probs=sparsity.normalized_weights(flat_r))
    experts = MoEFFN(
      self.num_experts,
      self.expert_mlp_dim,
      activation="silu",
      dispatch="dense" if self.dispatch == "chunk_skip" else self.dispatch,
      capacity_factor=self.capacity_factor,
      dtype=self.dtype,
      param_dtype=self.param_dtype,
      name="experts",
    )
    if self.dispatch == "chunk_skip":
      experts(x[:, :0], routing=routing_from_dense(flat_r[:0], flat_logits[:0]))  # creates the parameters only
      weights = {name: experts.variables["params"][name] for name in ("up", "down")}
      weights = {k: nn.meta.unbox(v).astype(self.dtype) for k, v in weights.items()}
      chunk = self.chunk_length if x.shape[1] % self.chunk_length == 0 else 1  # e.g. one decoded token
      y = sparsity.chunk_sparse_ffn(x.astype(self.dtype), r, weights, chunk)
      metrics = dict(routing.metrics)
    else:
      y, _, metrics = experts(x, routing=routing)
    aux = {"activation_locality": sparsity.activation_locality_loss(logits, alpha=self.locality_alpha)}
    metrics = {
      "expert_load": metrics["expert_load"],
      "load_imbalance": metrics["load_imbalance"],
      "router_entropy": metrics["router_entropy"],
      "tls": sparsity.token_level_sparsity(r),
      "active_experts": jnp.mean(jnp.sum(r > 0, axis=-1).astype(jnp.float32)),
    }
    for length in self.cls_lengths:
      if length <= x.shape[1]:
        metrics[f"cls_{length}"] = sparsity.chunk_level_sparsity(r, length)
    if x.shape[1] % self.chunk_length == 0:
      aux["chunk_sparsification"] = sparsity.chunk_sparsification_loss(pre_gain, self.chunk_length)
    return y, (aux, metrics, layer_expert_ids(routing, x))


@register_model("blockffn")
class BlockFFNLM(ExpertLayers, DenseLM):
  """The dense LM with BlockFFN layers (see the module docstring).

  Attributes (besides those of `DenseLM` and `ExpertLayers`):
    activation_locality_coef: lambda_al (2e-3).
    locality_alpha: alpha (100).
    chunk_coef: initial lambda_cs (5e-2); 0 turns the chunk loss off.
    chunk_length: chunk of the chunk loss (64).
    cls_lengths: window lengths of the CLS metrics 'cls_<L>' ((8, 16, 64); the authors log windows of
      1, 2, 4, 8, 16, 32 and 64 tokens, `--stat_act_window_sizes` in pretrain/apps/dragonfly_2b/pretrain_dragonfly.sh).
    chunk_warmup_steps: steps at the initial lambda_cs before the first adaptation (the authors' `stable_iter`, 1000).
    chunk_interval: lambda_cs adapts every `chunk_interval` steps from then on, ramping to its new value over the
      next `chunk_interval` steps (the authors' `step_iter`, 100).
    chunk_min_factor, chunk_max_factor: a rising chunk loss multiplies lambda_cs by at least `chunk_min_factor`
      (1.025); lambda_cs never exceeds `chunk_max_factor` (4) times `chunk_coef` (the authors' min_factor and
      max_factor, `zoo.routing.sparsity.update_chunk_lambda`).
    chunk_skip: run the experts with `chunk_sparse_ffn` (skip experts inactive for a whole chunk) instead of
      `dispatch`.
  """

  num_experts: int = 16
  expert_mlp_dim: int = 32
  activation_locality_coef: float = 2e-3
  locality_alpha: float = 100.0
  chunk_coef: float = 5e-2
  chunk_length: int = 64
  cls_lengths: tuple[int, ...] = (8, 16, 64)
  chunk_warmup_steps: int = 1000
  chunk_interval: int = 100
  chunk_min_factor: float = 1.025
  chunk_max_factor: float = 4.0
  chunk_skip: bool = False

  def __post_init__(self):
    check_config(
      self,
      positive=("chunk_length", "chunk_warmup_steps", "chunk_interval"),
      non_negative=("activation_locality_coef", "chunk_coef", "locality_alpha"),
      intervals={"chunk_min_factor": "[1, inf)", "chunk_max_factor": "[1, inf)"},
    )
    lengths = self.cls_lengths
    if not isinstance(lengths, tuple) or not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
      raise ConfigError(f"config.model.cls_lengths={lengths!r} must be a tuple of positive integers, e.g. (8, 16, 64)")
    if any(n < 1 for n in lengths) or len(set(lengths)) != len(lengths):
      raise ConfigError(f"config.model.cls_lengths={lengths!r} must hold distinct positive integers, e.g. (8, 16, 64)")
    super().__post_init__()

  def moe_ffn_factory(self):
    kwargs = self.expert_kwargs()
    del kwargs["activation"]  # BlockFFN's experts are non-gated SiLU blocks
    if self.chunk_skip:
      kwargs["dispatch"] = "chunk_skip"
    return lambda name: BlockFFNLayer(
      locality_alpha=self.locality_alpha,
      chunk_length=self.chunk_length,
      cls_lengths=self.cls_lengths,
      name=name,
      **kwargs,
    )

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """As `MoELM.__call__`; aux_loss = lambda_al * mean over layers of the locality losses + lambda_cs * mean over
    layers of the chunk losses (the authors average both over layers: modeling_dragonfly.py L521-530)."""
    logits, out = self.expert_forward(tokens, positions, cache, deterministic)  # losses weighted below
    state = self.variable("routing_state", "chunk_lambda", sparsity.init_chunk_lambda_state, self.chunk_coef)
    aux = self.activation_locality_coef * jnp.mean(out.metrics["activation_locality"])
    metrics = dict(out.metrics)
    if "chunk_sparsification" in metrics:
      chunk_loss = jnp.mean(metrics["chunk_sparsification"])
      aux = aux + state.value["lambda"] * chunk_loss
      if not deterministic and self.is_mutable_collection("routing_state") and self.chunk_coef > 0:
        state.value = sparsity.update_chunk_lambda(
          state.value,
          chunk_loss,
          initial=self.chunk_coef,
          warmup_steps=self.chunk_warmup_steps,
          interval=self.chunk_interval,
          min_factor=self.chunk_min_factor,
          max_factor=self.chunk_max_factor,
        )
    metrics["chunk_lambda"] = state.value["lambda"]
    return logits, out.replace(aux_loss=aux, metrics=metrics)

  def moe_ffn_params(self):
    """Parameters of one BlockFFN layer: ReLU router, its gain and the non-gated experts."""
    return self.embed_dim * self.num_experts + self.num_experts + self.expert_ffn_params(gated=False)

  def num_active_params(self):
    """All parameters: training runs every expert (the ReLU router's sparsity is data-dependent, not a fixed k)."""
    return self.num_params()
