"""MoFME: Zhang et al. 2024, "Efficient Deweather Mixture-of-Experts with Uncertainty-aware Feature-wise Linear
Modulation" (AAAI 2024, arXiv:2312.16610; code RoyZry98/MoFME-Pytorch), as a small ViT-style image classifier
(papers.md E).

The MoFME layer replaces the MLP of a transformer block. With h = Norm(x) [tokens, embed] (the block's pre-norm):
- one shared block: `u = GELU(h W1 + c1) * (h W2 + c2)`, u [tokens, f] (f = `fme_dim`, the embedding width in the
  authors' code);
- E feature-modulated experts on it (FiLM of u by u itself): `FME_i(u) = (A_i u) * u + B_i u`;
- the router: `w = softmax(keep_top_k(h R))`, i.e. the softmax over the k kept logits, 0 elsewhere [tokens, E];
- `y = Adaptor(sum_i w_i FME_i(u))`, the Adaptor a two-layer GELU MLP f -> hidden_dim -> embed (authors' code).

What the authors' code shows (models/moe/film.py, `Modular_Experts`): A_i and B_i are full `nn.Linear(dim, dim)`
layers with biases, so `FME_i(u) = (u A_i + a_i) * u + u B_i + b_i` [E, f, f] each; the shared block W1, W2 is
`dim -> dim` and the Adaptor `dim -> mlp_dim -> dim`. That is `modulation='dense'` here (the default). The cheaper
reading of the paper's "feature-wise modulation", A_i = diag(a_i) and B_i = diag(b_i) so `FME_i(u) = a_i * u * u +
b_i * u` with 2f parameters per expert, is `modulation='diagonal'` [guess; no bias, a_i ~ N(0, 0.1^2), b_i ~
N(1, 0.1^2) so every expert starts near the identity]. Every expert is computed on every token and weighted by the
(mostly zero) router weights, as in the authors' code; with 'diagonal' the sum collapses to
`(w a) * u * u + (w b) * u`, two [tokens, E] x [E, f] products.

Uncertainty-aware router (UaR). Paper intent: Monte-Carlo sampling of the router, averaged. The first release of the
code (film.py at 0348e58, 2024-05) has no UaR: one plain router pass. The update of 2025-01 (522deb8) samples the router
T = 5 times in training, but the router has no dropout or noise, so the samples are identical; it keeps one list of
samples across all layers; and it "normalises" the deviations from their mean with the inverse of their [E, E]
covariance (zero, or of rank <= T - 1, plus 1e-5 I) through an einsum whose axis labels disagree ('ijk,jklm->ijlm' on
[b, n, E] and [b, n, E, E]: it runs only when batch = tokens = E), giving weights that are no longer a distribution (all
zero when the samples are identical); at evaluation it uses one plain router pass. Here [guess: the MC-dropout reading
of the paper]: in training (`deterministic=False`) the router input h is dropped out with rate `router_dropout`
(inverted dropout, the 'dropout' RNG stream) in each of `mc_samples` = T independent samples; each sample is routed with
the shared `zoo.routing.softmax_topk` (top-k, renormalised = softmax over the kept logits); the combine weights are the
average of the T sparse weight vectors, `w = (1/T) sum_t w_t`, a distribution over the union of the experts the samples
chose (up to min(E, T k) experts per token in training). At evaluation (`deterministic=True`) there is no dropout and
one sample: exactly k experts. T = 1 is the plain router (with dropout on its input in training if `router_dropout` >
0).

Auxiliary loss (the authors' code has none): the Switch load-balance loss and the router z-loss of
`zoo.routing.softmax_topk`, averaged over the T samples, weighted by `load_balance_coef` and `z_loss_coef`.
Metrics per layer ([depth, ...]): the shared routing metrics (`expert_load` [E], `load_imbalance`,
`router_entropy`, `router_z`, averaged over the samples), `active_experts` (mean experts with a non-zero weight
per token: k at evaluation), `router_uncertainty` (mean over tokens and experts of the standard deviation of the
weights over the T samples; 0 at evaluation) and the unweighted `load_balance`, `z_loss`.

The baseline (`ffn='moe'`, "MoE" in the paper's tables, models/moe/complete.py): E conventional experts, each a
GELU MLP embed -> hidden_dim -> embed (`zoo.routing.MoEFFN`, no biases, GELU with the tanh approximation, no
token dropped), with the same router.

The classifier: patches of p x p pixels -> linear embedding (+ RMSNorm) + the fixed 2-D sine-cosine positions of
ViT/MAE -> `depth` pre-norm blocks `x += Attn(Norm x); x += FFN(Norm x)` (`zoo.layers.DecoderBlock`, non-causal
`zoo.layers.Attention` without RoPE) -> RMSNorm -> mean over the patches -> linear head.

Differences from the authors' code [deviation]: the zoo's RMSNorm (`DecoderBlock`) instead of LayerNorm; the router
reads the normalised h (the code's reads the un-normalised residual x) and has no bias; fixed sine-cosine positions
(the code runs without positional embeddings, "wo-pe"); q/k/v and attention-output projections without biases; a
classification head on mean-pooled patches instead of the image-restoration decoder. Parameter counts: `num_params()`
(closed form), `ffn_params()` (one MoFME or MoE layer, router included) and `num_active_params()` (the parameters
one token's output depends on at evaluation: the E - k unselected experts of each layer left out).
"""

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.layers import Attention, DecoderBlock, DenseGeneral, RMSNorm
from zoo.layers.embeddings import sincos_2d
from zoo.models.decoder_parts import DISPATCH, RouterLossWeights, weighted_aux_loss
from zoo.models.dit import patchify
from zoo.models.output import ModelOutput, sow_output
from zoo.models.registry import ConfigError, check_config, register_model
from zoo.routing import MoEFFN, Routing, softmax_topk, stack_layer_metrics

FFNS = ("mofme", "moe")
MODULATIONS = ("dense", "diagonal")


def _gelu(x):
  return jax.nn.gelu(x, approximate=False)  # torch's nn.GELU() of the authors' code


def _near_one(key, shape, dtype=jnp.float32):
  """N(1, 0.1^2): the diagonal B_i start near the identity [guess]."""
  return 1.0 + 0.1 * jax.random.normal(key, shape, dtype)


def dense_weights(expert_ids, weights, num_experts):
  """[..., k] expert ids (-1 = empty) and weights -> the dense [..., E] weight matrix (0 where not routed)."""
  return jnp.sum(jax.nn.one_hot(expert_ids, num_experts, dtype=weights.dtype) * weights[..., None], axis=-2)


def mc_topk_routing(sample_logits, k):
  """Uncertainty-aware routing: the average of T top-k softmax routings (module docstring).

  Args:
    sample_logits: [T, tokens, E] router logits of the T Monte-Carlo samples.
    k: experts per token in each sample.

  Returns:
    (Routing, per-sample weights [T, tokens, E]). For T = 1 the Routing is `softmax_topk(logits, k)` itself (k
    slots); for T > 1 it has E slots (expert e or -1) holding `w = mean_t w_t`, `probs` = the mean softmax. Its aux
    losses ('load_balance', 'z_loss') and routing metrics are the averages over the samples, plus 'active_experts'
    and 'router_uncertainty'.
  """
  if sample_logits.ndim != 3:
    raise ValueError(f"sample logits must be [samples, tokens, experts], got shape {sample_logits.shape}")
  num_samples, _, num_experts = sample_logits.shape
  samples = jax.vmap(lambda logits: softmax_topk(logits, k))(sample_logits)
  weights = dense_weights(samples.expert_ids, samples.weights, num_experts)  # [T, tokens, E]
  combine = jnp.mean(weights, axis=0)
  if num_samples == 1:
    routing = jax.tree.map(lambda x: x[0], samples)
  else:
    routing = Routing(
      expert_ids=jnp.where(combine > 0, jnp.arange(num_experts, dtype=jnp.int32), -1),
      weights=combine,
      probs=jnp.mean(samples.probs, axis=0),
    )
  metrics = {name: jnp.mean(value, axis=0) for name, value in samples.metrics.items()}
  metrics["active_experts"] = jnp.mean(jnp.sum(combine > 0, axis=-1).astype(jnp.float32))
  metrics["router_uncertainty"] = jnp.mean(jnp.std(weights, axis=0))
  aux = {name: jnp.mean(value) for name, value in samples.aux.items()}
  return routing.replace(aux=aux, metrics=metrics), weights


class UncertaintyRouter(nn.Module):
  """The MC-dropout router: `logits_t = dropout_t(h) R` for t < T, then `mc_topk_routing` (module docstring).

  Parameter `kernel` [embed, E] float32 (normal 0.02, the zoo's router initialisation). Sows into 'intermediates'
  (when mutable) `sample_weights` [T, tokens, E] (each sample's top-k softmax weights) and `combine_weights`
  [tokens, E] (what the layer uses: their mean).

  Attributes:
    num_experts: E.
    num_experts_per_tok: k.
    mc_samples: T, samples in training (evaluation: 1).
    dropout_rate: dropout on the router input in training (0: the T samples are identical).
  """

  num_experts: int
  num_experts_per_tok: int = 2
  mc_samples: int = 1
  dropout_rate: float = 0.0

  @nn.compact
  def __call__(self, x, *, deterministic=True, logits=None):
    """x: [..., embed] -> Routing over the flattened tokens; `logits` [..., E]: given router logits (one sample, no
    dropout; the kernel is not used)."""
    if logits is None:
      kernel = self.param(
        "kernel",
        nn.with_logical_partitioning(nn.initializers.normal(0.02), ("embed", "expert")),
        (x.shape[-1], self.num_experts),
        jnp.float32,
      )
      tokens = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
      if deterministic:
        sample_logits = (tokens @ kernel)[None]
      elif self.dropout_rate == 0:
        sample_logits = jnp.broadcast_to(tokens @ kernel, (self.mc_samples, tokens.shape[0], self.num_experts))
      else:
        keep = 1.0 - self.dropout_rate

        def sample(key):
          mask = jax.random.bernoulli(key, keep, tokens.shape)
          return jnp.where(mask, tokens / keep, 0.0) @ kernel

        sample_logits = jax.vmap(sample)(jax.random.split(self.make_rng("dropout"), self.mc_samples))
    else:
      if logits.shape[-1] != self.num_experts:
        raise ValueError(f"router logits have {logits.shape[-1]} experts, the router {self.num_experts}")
      sample_logits = logits.reshape(1, -1, self.num_experts).astype(jnp.float32)
    routing, weights = mc_topk_routing(sample_logits, self.num_experts_per_tok)
    sow_output(self, "sample_weights", weights)
    sow_output(self, "combine_weights", lambda: jnp.mean(weights, axis=0))
    return routing


def feature_modulated_experts(u, a, b, a_bias=None, b_bias=None):
  """Every FME expert on every token: `FME_i(u) = (A_i u + a_i) * u + B_i u + b_i`.

  Args:
    u: [tokens, f] the shared block's output.
    a, b: [E, f, f] dense modulations (stored [in, out]: `A_i u` is `u @ a[i]`), or [E, f] diagonal ones
      (`A_i u` is `a[i] * u`).
    a_bias, b_bias: [E, f] or None.

  Returns:
    [tokens, E, f].
  """
  if a.ndim == 3:
    gamma, beta = jnp.einsum("tf,efg->teg", u, a), jnp.einsum("tf,efg->teg", u, b)
  else:
    gamma, beta = a[None] * u[:, None], b[None] * u[:, None]
  if a_bias is not None:
    gamma = gamma + a_bias[None]
  if b_bias is not None:
    beta = beta + b_bias[None]
  return gamma * u[:, None] + beta


class MoFMELayer(nn.Module):
  """The MoFME layer (module docstring): `y = Adaptor(sum_i w_i FME_i(u))`, `u = GELU(h W1) * (h W2)`.

  Parameters: `w1`, `w2` [embed, f] (+ biases), `router/kernel` [embed, E], `fme_a`, `fme_b` [E, f, f] (+
  `fme_a_bias`, `fme_b_bias` [E, f]) for 'dense' or [E, f] for 'diagonal', `adaptor_up` [f, hidden_dim],
  `adaptor_down` [hidden_dim, embed] (+ biases).

  Attributes:
    num_experts: E.
    num_experts_per_tok: k.
    hidden_dim: the Adaptor's inner width.
    fme_dim: f, the width of u and of the experts (None = embed, as in the authors' code).
    modulation: 'dense' (authors' code) or 'diagonal'.
    mc_samples: T of the uncertainty-aware router.
    router_dropout: dropout on the router input in training.
    use_bias: biases on W1, W2, the dense A_i, B_i and the Adaptor (torch's nn.Linear default, as in the code).
  """

  num_experts: int
  num_experts_per_tok: int
  hidden_dim: int
  fme_dim: int | None = None
  modulation: str = "dense"
  mc_samples: int = 1
  router_dropout: float = 0.0
  use_bias: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, h, *, deterministic=True, router_logits=None):
    """h: [..., embed] (normalised) -> (y [..., embed], (aux {'load_balance', 'z_loss'}, metrics)).

    router_logits: optional [..., E] logits replacing the router's (one sample, no dropout)."""
    if self.modulation not in MODULATIONS:
      raise ValueError(f"MoFMELayer.modulation={self.modulation!r} is invalid; choose one of {MODULATIONS}")
    embed = h.shape[-1]
    f = self.fme_dim or embed
    dense = dict(use_bias=self.use_bias, dtype=self.dtype, param_dtype=self.param_dtype)
    routing = UncertaintyRouter(
      self.num_experts, self.num_experts_per_tok, self.mc_samples, self.router_dropout, name="router"
    )(h, deterministic=deterministic, logits=router_logits)
    tokens = h.reshape(-1, embed).astype(self.dtype)
    u = _gelu(DenseGeneral(f, kernel_axes=("embed", "mlp"), name="w1", **dense)(tokens))
    u = u * DenseGeneral(f, kernel_axes=("embed", "mlp"), name="w2", **dense)(tokens)
    combine = dense_weights(routing.expert_ids, routing.weights, self.num_experts).astype(self.dtype)
    y = self._experts(u, combine, f)
    y = _gelu(DenseGeneral(self.hidden_dim, kernel_axes=(None, "mlp"), name="adaptor_up", **dense)(y))
    y = DenseGeneral(embed, kernel_axes=("mlp", "embed"), name="adaptor_down", **dense)(y)
    return y.reshape(h.shape), (dict(routing.aux), dict(routing.metrics))

  def _experts(self, u, combine, f):
    """sum_i combine[:, i] * FME_i(u): u [tokens, f], combine [tokens, E] -> [tokens, f]."""
    e = self.num_experts

    def param(name, shape, axes, init):
      return self.param(name, nn.with_logical_partitioning(init, axes), shape, self.param_dtype).astype(self.dtype)

    if self.modulation == "diagonal":
      a = param("fme_a", (e, f), ("expert", "mlp"), nn.initializers.normal(0.1))
      b = param("fme_b", (e, f), ("expert", "mlp"), _near_one)
      return (combine @ a) * u * u + (combine @ b) * u  # the diagonal FME summed in closed form
    init = nn.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=-2, out_axis=-1, batch_axis=(0,))
    a = param("fme_a", (e, f, f), ("expert", "mlp", None), init)
    b = param("fme_b", (e, f, f), ("expert", "mlp", None), init)
    a_bias = b_bias = None
    if self.use_bias:
      a_bias = param("fme_a_bias", (e, f), ("expert", None), nn.initializers.zeros)
      b_bias = param("fme_b_bias", (e, f), ("expert", None), nn.initializers.zeros)
    return jnp.einsum("te,tef->tf", combine, feature_modulated_experts(u, a, b, a_bias, b_bias))


class MoEBaseline(MoEFFN):
  """The conventional MoE with the same router (`UncertaintyRouter` as its child 'router'), in the FFN interface of
  `DecoderBlock`: returns `(y, (aux, metrics))`."""

  def __call__(self, x, *, deterministic=True):
    y, aux, metrics = super().__call__(x, deterministic=deterministic)
    return y, (aux, metrics)


@register_model("mofme")
class MoFME(RouterLossWeights):
  """MoFME image classifier (module docstring). Config keys are the fields below and `RouterLossWeights`'
  (load_balance_coef 1e-2, z_loss_coef 1e-3).

  Attributes:
    num_classes: classifier outputs.
    channels: image channels the model takes (the patch embedding is sized by it).
    patch_size: p; image height and width must be multiples of it.
    embed_dim: token width (a multiple of 4 for the 2-D sine-cosine positions, and of num_heads).
    depth: transformer blocks.
    num_heads: attention heads (head width embed_dim / num_heads).
    ffn: 'mofme' (the MoFME layer) or 'moe' (the conventional MoE baseline).
    num_experts: E.
    top_k: k, experts per token per router sample.
    hidden_dim: the Adaptor's inner width ('mofme'); each expert's inner width ('moe').
    fme_dim: width f of the shared block and the FME experts (None = embed_dim); 'mofme' only.
    modulation: 'dense' (A_i, B_i full f x f maps with biases, the authors' code) or 'diagonal' [guess]; 'mofme' only.
    mc_samples: T, router samples in training (1 = the plain router).
    router_dropout: dropout on the router input in training [guess: 0.1].
    use_bias: biases on the MoFME layer's projections ('mofme' only; the zoo's MoE experts have none).
    dispatch: how the 'moe' baseline's tokens reach their experts: 'auto' (per backend) | 'dense' | 'capacity' |
      'dropless'; no token is ever dropped.
    norm_epsilon: RMSNorm epsilon.
    dtype: compute dtype (name or dtype); routing is float32 and the logits are returned in float32.
    param_dtype: parameter dtype.

  `exposes` (the `zoo.models` contract): none at the top level; each layer's router sows `sample_weights` and
  `combine_weights` under `intermediates/layers_i/ffn/router`.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  num_classes: int = 10
  channels: int = 3
  patch_size: int = 4
  embed_dim: int = 64
  depth: int = 2
  num_heads: int = 4
  ffn: str = "mofme"
  num_experts: int = 4
  top_k: int = 2
  hidden_dim: int = 256
  fme_dim: int | None = None
  modulation: str = "dense"
  mc_samples: int = 5
  router_dropout: float = 0.1
  use_bias: bool = True
  dispatch: str = "auto"
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=(
        "num_classes",
        "channels",
        "patch_size",
        "embed_dim",
        "depth",
        "num_heads",
        "num_experts",
        "top_k",
        "hidden_dim",
        "mc_samples",
      ),
      optional_positive=("fme_dim",),
      intervals={"router_dropout": "[0, 1)", "norm_epsilon": "(0, inf)"},
      choices={"ffn": FFNS, "modulation": MODULATIONS, "dispatch": DISPATCH, "use_bias": (True, False)},
      dtypes=("dtype", "param_dtype"),
    )
    if self.top_k > self.num_experts:
      raise ConfigError(f"config.model.top_k={self.top_k} is invalid; allowed 1..num_experts={self.num_experts}")
    if self.embed_dim % self.num_heads:
      raise ConfigError(
        f"config.model.embed_dim={self.embed_dim} must be a multiple of config.model.num_heads={self.num_heads}"
      )
    if self.embed_dim % 4:
      raise ConfigError(
        f"config.model.embed_dim={self.embed_dim} must be a multiple of 4 (the 2-D sine-cosine positions)"
      )
    super().__post_init__()

  def ffn_factory(self):
    """`name -> ` a layer's FFN: the MoFME layer or the MoE baseline, each call with its own uncertainty-aware router
    (a plain function, so the module it builds belongs to the block that calls it)."""
    dtypes = dict(dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype))
    router = dict(
      num_experts=self.num_experts,
      num_experts_per_tok=self.top_k,
      mc_samples=self.mc_samples,
      dropout_rate=self.router_dropout,
    )
    if self.ffn == "mofme":
      return functools.partial(
        MoFMELayer,
        self.num_experts,
        self.top_k,
        self.hidden_dim,
        fme_dim=self.fme_dim,
        modulation=self.modulation,
        mc_samples=self.mc_samples,
        router_dropout=self.router_dropout,
        use_bias=self.use_bias,
        **dtypes,
      )
    return lambda name: MoEBaseline(
      self.num_experts,
      self.hidden_dim,
      num_experts_per_tok=self.top_k,
      activation="gelu",
      router=UncertaintyRouter(parent=None, **router),
      dispatch=None if self.dispatch == "auto" else self.dispatch,
      capacity_factor=None,
      name=name,
      **dtypes,
    )

  @nn.compact
  def __call__(self, images, *, deterministic=True):
    """Classify images.

    Args:
      images: [batch, height, width, channels] float; height and width multiples of `patch_size`, channels =
        `channels`.
      deterministic: False in training: the router's Monte-Carlo dropout samples (the 'dropout' RNG stream when
        router_dropout > 0).

    Returns:
      (logits [batch, num_classes] float32, ModelOutput(aux_loss = the weighted router losses summed over the
      layers, metrics {name: [depth, ...]})).
    """
    if images.ndim != 4 or not jnp.issubdtype(images.dtype, jnp.floating):
      raise ValueError(f"images must be float [batch, height, width, channels], got {images.dtype} {images.shape}")
    _, height, width, channels = images.shape
    p = self.patch_size
    if height % p or width % p:
      raise ValueError(f"image size {height}x{width} is not divisible by config.model.patch_size={p}")
    if channels != self.channels:
      raise ValueError(f"images have {channels} channels but the model takes config.model.channels={self.channels}")
    dtype, param_dtype = jnp.dtype(self.dtype), jnp.dtype(self.param_dtype)
    dtypes = dict(dtype=dtype, param_dtype=param_dtype)
    d = self.embed_dim
    x = DenseGeneral(d, kernel_axes=(None, "embed"), use_bias=True, name="patch_embed", **dtypes)(
      patchify(images.astype(dtype), p)
    )
    x = RMSNorm(self.norm_epsilon, name="patch_norm", **dtypes)(x)
    x = x + jnp.asarray(sincos_2d(height // p, width // p, d), dtype)[None]
    x = nn.with_logical_constraint(x, ("batch", "length", "embed"))
    positions = jnp.broadcast_to(jnp.arange(x.shape[1], dtype=jnp.int32), x.shape[:2])
    attention = functools.partial(
      Attention, num_heads=self.num_heads, head_dim=d // self.num_heads, use_rope=False, causal=False, **dtypes
    )
    aux_losses, layer_metrics = [], []
    ffn = self.ffn_factory()
    for i in range(self.depth):
      block = DecoderBlock(attention, ffn, norm_epsilon=self.norm_epsilon, name=f"layers_{i}", **dtypes)
      x, _, (aux, metrics) = block(x, positions, deterministic=deterministic)
      aux_losses.append(aux)
      layer_metrics.append({**metrics, **aux})
    x = RMSNorm(self.norm_epsilon, name="final_norm", **dtypes)(x)
    logits = DenseGeneral(self.num_classes, kernel_axes=("embed", None), use_bias=True, name="head", **dtypes)(
      jnp.mean(x, axis=1)
    )
    out = ModelOutput(
      aux_loss=weighted_aux_loss(aux_losses, self.aux_coefs()), metrics=stack_layer_metrics(layer_metrics)
    )
    return logits.astype(jnp.float32), out

  def expert_params(self):
    """Parameters of one routed expert: 2 f^2 (+ 2 f biases) for a dense FME, 2 f for a diagonal one, 2 embed
    hidden_dim for an MoE expert."""
    if self.ffn == "moe":
      return 2 * self.embed_dim * self.hidden_dim
    f = self.fme_dim or self.embed_dim
    return 2 * f if self.modulation == "diagonal" else 2 * (f * f + f * self.use_bias)

  def ffn_params(self):
    """Parameters of one layer's FFN, its router included (no norm)."""
    d, e, m = self.embed_dim, self.num_experts, self.hidden_dim
    router = d * e
    if self.ffn == "moe":
      return router + e * self.expert_params()
    f, bias = self.fme_dim or d, int(self.use_bias)
    shared = 2 * (d * f + f * bias)
    adaptor = f * m + m * bias + m * d + d * bias
    return router + shared + e * self.expert_params() + adaptor

  def num_params(self):
    """The closed-form parameter count (equal to the initialised model's)."""
    d = self.embed_dim
    patch = self.patch_size**2 * self.channels * d + d + d  # kernel, bias, RMSNorm scale
    block = 2 * d + 4 * d * d + self.ffn_params()  # two RMSNorm scales, q/k/v/out, FFN
    head = d + d * self.num_classes + self.num_classes  # final RMSNorm, kernel, bias
    return patch + self.depth * block + head

  def num_active_params(self):
    """Parameters one token's output depends on at evaluation: `num_params()` less the E - k unselected experts of
    every layer."""
    return self.num_params() - self.depth * (self.num_experts - self.top_k) * self.expert_params()
