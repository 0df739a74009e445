"""NetMamba: Wang et al. 2024, "NetMamba: Efficient Network Traffic Classification via Pre-training Unidirectional
Mamba" (arXiv:2405.11449; wangtz19/NetMamba), papers.md F.

Input (Section 3.2, "traffic representation"): the first P = 5 packets of a flow, each its first 80 header bytes (IP
addresses zeroed) and first 240 payload bytes, as `packets` [batch, 5, 320] (the embedded 'loopback_traffic' layout).
`header_bytes` / `payload_bytes` keep a prefix of each part (the paper's 80 / 240 by default; smaller for CPU runs).
The bytes, scaled to [0, 1] and flattened packet after packet, are cut into strides of `stride` = 4 bytes:

  x = StrideEmbed(bytes) + pos            # Conv1d(1 -> d, kernel 4, stride 4) == a Dense over each 4-byte stride
  x = [x ; cls + pos_cls]                 # the CLS token appended at the END (Section 3.3: the model is
                                          # unidirectional, so only the last position has seen every stride)
  h = MambaStack(x)                       # `depth` Mamba-1 blocks (d_state 16, d_conv 4, expand 2) + RMSNorm
  logits = Linear(h[:, -1])               # the CLS position

Pre-training (Section 3.4, MAE-style): a `mask_ratio` = 0.9 of the strides is dropped; the encoder sees only the
visible strides (in their order, CLS at the end); a light decoder (`decoder_dim`, `decoder_depth` Mamba blocks) gets
the encoded visible strides back at their positions with a learned mask token elsewhere and predicts the bytes of
every stride; the loss (task 'masked_pretraining') is the mean squared error on the masked strides. Which strides are
masked comes from the task's random stream: `mask_noise` [batch, P, 320] uniform, reduced to one number per stride
(its first byte's), the lowest (1 - mask_ratio) kept.

Positions: the fixed 1-D sine-cosine embedding of MAE, for encoder and decoder [guess: NetMamba builds on MAE's
code]. Decoder width 128 and depth 2 [guess: MAE's light decoder, scaled to the encoder]. The pixel targets are
not normalised per stride (MAE's norm_pix_loss off) [guess].

Both heads' parameters exist in every run (the classifier head and the decoder are made at init), so a fine-tuning
run starts from a pre-training run's checkpoint with `config.init_from=<pre-training workdir>` and the same model
config, and freezes the unused decoder with `config.frozen_params=('^decoder', '^mask_token')`.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp
import numpy as np

from zoo.layers import DenseGeneral
from zoo.layers.embeddings import sincos_1d
from zoo.layers.mamba import SCANS, MambaStack
from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model

# The stored packet layout (`zoo.data.traffic`): header bytes, then payload bytes.
STORED_HEADER, STORED_PAYLOAD = 80, 240


@register_model("netmamba")
class NetMamba(nn.Module):
  """NetMamba classifier and its masked pre-training (see the module docstring).

  Attributes:
    num_classes: classifier outputs.
    packets: packets per flow read (the first ones, <= the stored 5).
    header_bytes, payload_bytes: bytes kept of each packet's header (<= 80) and payload (<= 240).
    stride: bytes per token (4); (header_bytes + payload_bytes) must be a multiple of it.
    embed_dim: d (256 in the paper).
    depth: encoder Mamba blocks (4).
    d_state, d_conv, expand: Mamba-1 fields (16, 4, 2).
    decoder_dim, decoder_depth: the pre-training decoder.
    mask_ratio: fraction of strides masked in pre-training (0.9).
    dropout_rate: before the classifier head [guess: 0].
    scan: 'associative' | 'sequential' (`zoo.layers.mamba`).
    dtype, param_dtype: compute and parameter dtypes; the scan runs in float32.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  num_classes: int = 10
  packets: int = 5
  header_bytes: int = STORED_HEADER
  payload_bytes: int = STORED_PAYLOAD
  stride: int = 4
  embed_dim: int = 256
  depth: int = 4
  d_state: int = 16
  d_conv: int = 4
  expand: int = 2
  decoder_dim: int = 128
  decoder_depth: int = 2
  mask_ratio: float = 0.9
  dropout_rate: float = 0.0
  scan: str = "associative"
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_config(
      self,
      positive=("num_classes", "packets", "stride", "embed_dim", "depth", "d_state", "d_conv", "expand"),
      non_negative=("decoder_depth",),
      intervals={
        "mask_ratio": "[0, 1)",
        "dropout_rate": "[0, 1)",
        "header_bytes": f"[0, {STORED_HEADER}]",
        "payload_bytes": f"[0, {STORED_PAYLOAD}]",
      },
      choices={"scan": SCANS},
      dtypes=("dtype", "param_dtype"),
    )
    per_packet = self.header_bytes + self.payload_bytes
    if per_packet < 1 or per_packet % self.stride:
      raise ConfigError(
        f"config.model.header_bytes + payload_bytes = {per_packet} must be a positive multiple of stride={self.stride}"
      )
    super().__post_init__()

  @property
  def num_strides(self):
    return self.packets * (self.header_bytes + self.payload_bytes) // self.stride

  @property
  def visible_strides(self):
    """Strides the encoder sees in pre-training (at least one)."""
    return max(1, round(self.num_strides * (1.0 - self.mask_ratio)))

  def strides(self, x):
    """[batch, >= packets, 320] -> [batch, num_strides, stride]: the kept header and payload bytes of the first
    `packets` packets, flattened packet after packet."""
    x = x[:, : self.packets]
    x = jnp.concatenate([x[..., : self.header_bytes], x[..., STORED_HEADER : STORED_HEADER + self.payload_bytes]], -1)
    return x.reshape(x.shape[0], self.num_strides, self.stride)

  def _mamba(self, depth, name):
    return MambaStack(
      depth, self.d_state, self.d_conv, self.expand, scan=self.scan, dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype), name=name,
    )  # fmt: skip

  def _dense(self, features, name, axes=("embed", "mlp")):
    return DenseGeneral(
      features, kernel_axes=axes, use_bias=True, dtype=jnp.dtype(self.dtype), param_dtype=jnp.dtype(self.param_dtype),
      name=name,
    )  # fmt: skip

  @nn.compact
  def __call__(self, packets, *, mask_noise=None, deterministic=True):
    """Classify flows, or reconstruct their masked strides.

    Args:
      packets: [batch, P >= packets, 320] bytes (integers 0..255 or floats already in [0, 1]).
      mask_noise: None (classification), or [batch, P, 320] uniform noise choosing the masked strides
        (pre-training).
      deterministic: no dropout when True.

    Returns:
      Classification: (logits [batch, num_classes] float32, ModelOutput()). Pre-training: ({'reconstruction':
      [batch, S, stride], 'target': [batch, S, stride], 'masked': [batch, S] (1 = masked)} float32, ModelOutput()).
    """
    if packets.ndim != 3 or packets.shape[1] < self.packets or packets.shape[2] != STORED_HEADER + STORED_PAYLOAD:
      raise ValueError(
        f"packets must be [batch, >= {self.packets}, {STORED_HEADER + STORED_PAYLOAD}] bytes, got {packets.shape}"
      )
    dtype = jnp.dtype(self.dtype)
    scale = 255.0 if jnp.issubdtype(packets.dtype, jnp.integer) else 1.0
    target = self.strides(packets).astype(jnp.float32) / scale  # [b, S, stride]
    d, n = self.embed_dim, self.num_strides
    positions = jnp.asarray(sincos_1d(np.arange(n + 1), d), dtype)  # the CLS position is n
    x = self._dense(d, "stride_embed", ("mlp", "embed"))(target.astype(dtype)) + positions[:n]
    cls = self.param("cls_token", nn.initializers.normal(0.02), (d,), jnp.dtype(self.param_dtype))
    cls = jnp.broadcast_to((cls.astype(dtype) + positions[n])[None, None], (x.shape[0], 1, d))
    encoder = self._mamba(self.depth, "encoder")
    head = self._dense(self.num_classes, "head", ("embed", "vocab"))

    if mask_noise is None or self.is_initializing():
      h = encoder(jnp.concatenate([x, cls], 1))
      h = nn.Dropout(self.dropout_rate)(h[:, -1], deterministic=deterministic)
      logits = head(h).astype(jnp.float32)
      if mask_noise is None and not self.is_initializing():
        return logits, ModelOutput()
    if mask_noise is None:  # init: make the decoder too, so every run has the same parameters
      mask_noise = jnp.zeros(packets.shape, jnp.float32)
      pretraining = False
    else:
      pretraining = True

    # Pre-training: keep the strides with the lowest noise, in their order.
    noise = self.strides(mask_noise.astype(jnp.float32))[..., 0]  # [b, S]
    keep = jnp.sort(jnp.argsort(noise, axis=-1)[:, : self.visible_strides], axis=-1)  # [b, V]
    visible = jnp.take_along_axis(x, keep[..., None], axis=1)
    h = encoder(jnp.concatenate([visible, cls], 1))
    e = self.decoder_dim
    h = self._dense(e, "decoder_embed")(h)
    mask_token = self.param("mask_token", nn.initializers.normal(0.02), (e,), jnp.dtype(self.param_dtype))
    rows = jnp.arange(x.shape[0])[:, None]
    full = jnp.broadcast_to(mask_token.astype(dtype), (x.shape[0], n, e)).at[rows, keep].set(h[:, :-1])
    full = jnp.concatenate([full, h[:, -1:]], 1) + jnp.asarray(sincos_1d(np.arange(n + 1), e), dtype)
    y = self._mamba(self.decoder_depth, "decoder")(full) if self.decoder_depth else full
    reconstruction = self._dense(self.stride, "decoder_pred", ("embed", "mlp"))(y[:, :-1]).astype(jnp.float32)
    masked = jnp.ones((x.shape[0], n), jnp.float32).at[rows, keep].set(0.0)
    if not pretraining:
      return logits, ModelOutput()
    return {"reconstruction": reconstruction, "target": target, "masked": masked}, ModelOutput()
