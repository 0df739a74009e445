"""R2R's token router ("Roads to Rome", Fu et al. 2025, thu-nics/R2R; `papers.md` C1): a small MLP that reads the
small model's state at one decoding step and says whether the token it is about to emit diverges from what the large
model would write (route that token to the large model) or not.

Inputs, per token (`HiddenStatesTokenLMHeadLogitsClassifier` in the authors' code):
- the small model's last hidden state (after its final norm) `h` [batch, hidden];
- the embedding of the small model's sampled token `e` [batch, embed] (the small model's own input embedding, frozen:
  the caller looks it up, so the router holds no copy of it);
- the small model's top-k logit values (sorted, k = 100 clipped to the vocabulary) `l` [batch, k], projected by
  Linear(k -> hidden).

`concat(h, e, W_l l)` -> Linear(-> hidden_dim) -> `num_blocks` residual MLP blocks `x + Drop(W2 Drop(GELU(W1 LN(x))))`
(pre-LN, expansion 4, dropout 0.1) -> LN -> Linear -> one logit; the large model takes the token when
`sigmoid(logit) >= tau` (`zoo.routing.r2r.choose_threshold`: tau for recall >= 0.95 on validation labels). Trained
with BCE, `pos_weight = #neg / #pos` (`zoo.routing.r2r.router_loss`).

The authors' code applies two Linear layers back to back before the blocks (`combined_projection` then the backbone's
`input_projection`, no nonlinearity between); one Linear spans the same functions, so there is one here. The blocks'
Linear layers are Kaiming-normal initialised with zero biases [code]; the two input projections keep PyTorch's
default init (uniform in +-1/sqrt(fan_in)) [code]. `hidden_dim` 1024 in the authors' configs; 32 by default here
[guess: CPU scale; the authors' router is a few percent of their small model's parameters, a 32-wide one is about
half of the zoo's 2 x 64 small pool model, a 128-wide one already seven times its size].
"""

from typing import ClassVar

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers.vision import TORCH_CONV_INIT  # PyTorch's default Linear init too
from zoo.models.output import ModelOutput
from zoo.models.registry import check_config, register_model

# torch.nn.init.kaiming_normal_ (fan_in, gain sqrt(2), untruncated).
KAIMING_NORMAL = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class ResidualMLPBlock(nn.Module):
  """`x + Dropout(Linear(Dropout(GELU(Linear(LN(x))))))`, inner width `expansion * width` (R2R's
  `ClassifierBlock`). x: [batch, width] -> [batch, width]."""

  expansion: int = 4
  dropout_rate: float = 0.1

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    width = x.shape[-1]
    y = nn.LayerNorm(epsilon=1e-5, name="norm")(x)
    y = nn.Dense(width * self.expansion, kernel_init=KAIMING_NORMAL, name="up")(y)
    y = nn.Dropout(self.dropout_rate)(nn.gelu(y, approximate=False), deterministic=deterministic)
    y = nn.Dense(width, kernel_init=KAIMING_NORMAL, name="down")(y)
    return x + nn.Dropout(self.dropout_rate)(y, deterministic=deterministic)


@register_model("r2r")
class R2RRouter(nn.Module):
  """The router network of R2R (authors' defaults but the width). Model `r2r`: a per-token binary
  classifier over array features (the 'arrays' contract: `__call__(**features, deterministic=True)`).

  Attributes:
    input_dim: the width of the small model's hidden state and token embedding (its `embed_dim`).
    hidden_dim: the blocks' width (authors: 1024; 32 here [guess: CPU scale]).
    num_blocks: residual MLP blocks (authors: 6).
    expansion: the blocks' inner width factor (authors: 4).
    dropout_rate: dropout in the blocks (authors: 0.1).
    top_k: how many of the small model's largest logits it reads (authors: 100; callers clip it to the vocabulary).
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  input_dim: int = 64
  hidden_dim: int = 32
  num_blocks: int = 6
  expansion: int = 4
  dropout_rate: float = 0.1
  top_k: int = 100

  def __post_init__(self):
    check_config(
      self,
      positive=("input_dim", "hidden_dim", "num_blocks", "expansion", "top_k"),
      intervals={"dropout_rate": "[0, 1)"},
    )
    super().__post_init__()

  @nn.compact
  def __call__(self, hidden_states, token_embeddings, top_logits, *, deterministic=True):
    """Routing logits, float32.

    Args:
      hidden_states: [batch, input_dim] the small model's last hidden state.
      token_embeddings: [batch, input_dim] the small model's input embedding of the token it sampled.
      top_logits: [batch, top_k] its largest logits, in decreasing order.
      deterministic: disables dropout.

    Returns:
      (logits [batch] float32, ModelOutput): `sigmoid(logits)` is the probability that the token must go to the
      large model.
    """
    expected = {"hidden_states": self.input_dim, "token_embeddings": self.input_dim, "top_logits": self.top_k}
    for name, array in zip(expected, (hidden_states, token_embeddings, top_logits)):
      if array.ndim != 2 or array.shape[0] != hidden_states.shape[0] or array.shape[1] != expected[name]:
        raise ValueError(
          f"R2RRouter: {name} has shape {tuple(array.shape)}, expected [batch={hidden_states.shape[0]}, "
          f"{expected[name]}] (input_dim={self.input_dim}, top_k={self.top_k})"
        )
    hidden_states, token_embeddings, top_logits = (
      jnp.asarray(a, jnp.float32) for a in (hidden_states, token_embeddings, top_logits)
    )
    logit_features = nn.Dense(self.input_dim, kernel_init=TORCH_CONV_INIT, name="logits_projection")(top_logits)
    x = jnp.concatenate([hidden_states, token_embeddings, logit_features], axis=-1)
    x = nn.Dense(self.hidden_dim, kernel_init=TORCH_CONV_INIT, name="combined_projection")(x)
    for i in range(self.num_blocks):
      x = ResidualMLPBlock(self.expansion, self.dropout_rate, name=f"blocks_{i}")(x, deterministic=deterministic)
    x = nn.LayerNorm(epsilon=1e-5, name="output_norm")(x)
    return nn.Dense(1, kernel_init=KAIMING_NORMAL, name="output")(x)[..., 0], ModelOutput()

  def num_params(self):
    """Analytic parameter count (equals the initialised params)."""
    d, inner, e = self.hidden_dim, self.hidden_dim * self.expansion, self.input_dim
    projections = (self.top_k + 1) * e + (3 * e + 1) * d
    blocks = self.num_blocks * (2 * d + (d + 1) * inner + (inner + 1) * d)
    return projections + blocks + 2 * d + d + 1
