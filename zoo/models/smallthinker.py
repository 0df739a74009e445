"""SmallThinker LM: pre-attention routed ReGLU experts and a NoPE-global / RoPE-sliding layer pattern (papers.md A5).

SmallThinker (SJTU-IPADS, "SmallThinker: A Family of Efficient Large Language Models Natively Trained for Local
Deployment", 2025; mechanism as in its llama.cpp / vLLM ports):
- pre-attention router (Sec. 2, "pre-attention router"): layer i's router logits come from the raw residual stream at
  the block input, BEFORE the attention norm and attention, so an inference engine knows layer i's experts while
  attention still runs and can prefetch them from storage; the model computes the routing first and hands it to the
  FFN (`DecoderBlock`'s `ffn_kwargs`);
- top-k on the raw logits, then sigmoid of the chosen logits normalised to sum 1 (`router='sigmoid_topk'`, i.e.
  `zoo.routing.sigmoid_topk`; sigmoid is monotone, so top-k of the logits = top-k of the scores); 'softmax_topk' is the
  softmax option (softmax over the chosen logits);
- ReGLU experts `down(ReLU(gate x) * up x)` (`mlp_activation='reglu'`): a second level of sparsity inside each
  expert;
- attention: layer i with `i % nope_every == 0` is NoPE global attention, the others RoPE with the sliding window
  `sliding_window` (1 NoPE-global layer per 3 RoPE-sliding layers).

The load-balance / z-loss coefficients are `moe_lm`'s [guess: the report does not give SmallThinker's].

Paper sizes (README of SJTU-IPADS/SmallThinker; the tiny config in `configs/smallthinker.py` keeps the structure):

  | model       | layers | d_model | experts | top-k | expert width | heads (q/kv) | vocab   |
  |-------------|--------|---------|---------|-------|--------------|--------------|---------|
  | 4B-A0.6B    | 32     | 1536    | 32      | 4     | 768          | 12 / 2       | 151,936 |
  | 21B-A3B     | 52     | 2560    | 64      | 6     | 768          | 28 / 4       | 151,936 |

Decoding: the routing of layer i depends only on the token's block input, so in a decode step (one token per call
with the KV cache) `layers_i` computes its routing before its attention; the routing is also sown as
`intermediates['layers_i']['prefetch_expert_ids']` int32 [batch, length, k] (the array itself, as
`zoo.models.output.sow_output` stores it) when 'intermediates' is mutable, besides the model's
`intermediates['expert_ids']` [moe_layers, batch, length, k] (`exposes`, as for `moe_lm`). Cached decoding equals the
full forward with 'dense' or 'dropless' dispatch.
"""

import functools

import flax.linen as nn

from zoo.layers import DecoderBlock
from zoo.models.decoder_parts import ExpertLayers, TopKRouting, layer_expert_ids
from zoo.models.dense_lm import DenseLM
from zoo.models.output import sow_output
from zoo.models.registry import check_config, register_model
from zoo.routing import MoEFFN

SMALLTHINKER_ROUTERS = ("sigmoid_topk", "softmax_topk")


class PreRoutedMoEFFN(MoEFFN):
  """`MoEFFN` that only dispatches a routing computed earlier; returns `(y, (aux, metrics, expert_ids))` for
  `ExpertLayers.expert_layers`."""

  def __call__(self, x, *, deterministic=True, routing=None):
    if routing is None:
      raise ValueError("PreRoutedMoEFFN needs the routing computed before attention (routing=...)")
    y, aux, metrics = super().__call__(x, deterministic=deterministic, routing=routing)
    return y, (aux, metrics, layer_expert_ids(routing, x))


class PreRoutedBlock(DecoderBlock):
  """`DecoderBlock` whose MoE routing is computed from the block input before attention (pre-attention router).

  Attributes (besides `DecoderBlock`'s):
    router: an unbound `zoo.routing.Router` (adopted as the child 'router'), or None for a dense FFN.
  """

  router: nn.Module | None = None

  @nn.compact
  def __call__(self, x, positions, cache=None, mask=None, deterministic=True):
    """x: [batch, length, embed] -> (x, cache, ffn aux); see `DecoderBlock`."""
    ffn_kwargs = None
    if self.router is not None:
      routing = self.router(x, deterministic=deterministic)  # raw residual stream, before the attention norm
      sow_output(self, "prefetch_expert_ids", lambda: layer_expert_ids(routing, x))
      ffn_kwargs = {"routing": routing}
    return super().__call__(x, positions, cache, mask, deterministic, ffn_kwargs)


@register_model("smallthinker")
class SmallThinkerLM(ExpertLayers, TopKRouting, DenseLM):
  """A decoder of `moe_lm`'s expert layers and routers with SmallThinker's pre-attention router, ReGLU experts and
  layer pattern (see the module docstring); no shared experts.

  Attributes (besides those of `DenseLM`, `ExpertLayers` and `TopKRouting`):
    nope_every: layer i with `i % nope_every == 0` uses NoPE global attention, the others RoPE with
      `sliding_window` (None = RoPE global); 4 in SmallThinker.
  """

  mlp_activation: str = "reglu"
  router: str = "sigmoid_topk"
  nope_every: int = 4

  def __post_init__(self):
    check_config(self, positive=("nope_every",), choices={"router": SMALLTHINKER_ROUTERS})
    super().__post_init__()

  def moe_ffn_params(self):
    """Parameters of one MoE layer's FFN: router and routed experts."""
    return self.router_params() + self.expert_ffn_params()

  def is_nope_global(self, i):
    """Whether layer i uses NoPE global attention (else RoPE with the sliding window)."""
    return i % self.nope_every == 0

  def layer_attention_factory(self, i):
    """Layer i's attention: NoPE global, or RoPE with `sliding_window`."""
    nope = self.is_nope_global(i)
    return functools.partial(
      self.attention_factory(), use_rope=not nope, sliding_window=None if nope else self.sliding_window
    )

  def moe_ffn_factory(self):
    kwargs = self.expert_kwargs()
    return lambda name: PreRoutedMoEFFN(name=name, **kwargs)

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """As `MoELM.__call__` (tokens [batch, length] -> logits [batch, length, vocab_size] float32, ModelOutput);
    each layer routes before its attention."""
    make_block = lambda i, is_moe: self.decoder_block(
      i, is_moe, PreRoutedBlock, self.layer_attention_factory(i), router=self.make_router() if is_moe else None
    )
    return self.expert_forward(tokens, positions, cache, deterministic, make_block, aux_coefs=self.aux_coefs())
