"""The router of Decentralized Diffusion Models (McAllister et al. 2025, papers.md D1): r(x_t, t) -> logits over the
K data clusters, trained with cross-entropy to predict the cluster of the clean image x0 from the noised x_t
(`zoo.tasks.flow_router`); at sampling time it picks or weighs the K flow-matching experts (`zoo.flow.ensemble`).

Architecture [guess: the paper's router is a small DiT]: the DiT backbone of `zoo.models.dit` (patchify with the fixed
2-D sine-cosine positions, timestep embedding -> MLP as the only conditioning, adaLN-Zero blocks, final
adaLN-modulated LayerNorm), then mean pooling over the patches and a linear head to `num_experts` logits. As in DiT
the modulation is zero-initialised, so at initialisation the blocks are the identity and the logits do not yet depend
on t; the head has the default (LeCun-normal) initialisation.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax.numpy as jnp

from zoo.layers import DenseGeneral, Embed
from zoo.models.dit import backbone_flops, backbone_of, backbone_params, check_backbone, check_inputs
from zoo.models.output import ModelOutput
from zoo.models.registry import check_config, register_model


@register_model("flow_router")
class FlowRouter(nn.Module):
  """DDM router over images [batch, H, W, C] and times t [batch] -> logits [batch, num_experts]. Config keys are the
  fields below.

  Attributes:
    image_size: height = width of the images.
    channels: image channels.
    num_experts: K, the number of data clusters / flow-matching experts (= config.data.clusters).
    num_classes: 0 = r(x_t, t); C = a class-conditional router r(x_t, t, class) (class embedding added to the time
      embedding, as in DiT), the posterior a class-conditional ensemble needs: v(x_t | c) = sum_k p(k | x_t, c)
      v_k(x_t | c).
    patch_size: p; (image_size / p)^2 tokens.
    embed_dim: transformer width (divisible by num_heads and by 4).
    num_layers: adaLN-Zero blocks.
    num_heads: attention heads.
    mlp_ratio: MLP width / embed_dim.
    frequency_dim: width of the sinusoidal timestep embedding.
    time_scale: t in [0, 1] is multiplied by this before the sinusoidal embedding [guess].
    norm_epsilon: LayerNorm epsilon.
    dtype: compute dtype (name or dtype); logits are returned in float32.
    param_dtype: parameter dtype.

  Defaults [guess]: half the width and depth of the default `dit` (the paper's router costs ~4% of the compute).

  `exposes` (the `zoo.models` contract): none.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  image_size: int = 8
  channels: int = 1
  num_experts: int = 4
  num_classes: int = 0
  patch_size: int = 2
  embed_dim: int = 32
  num_layers: int = 2
  num_heads: int = 2
  mlp_ratio: float = 4.0
  frequency_dim: int = 256
  time_scale: float = 1000.0
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"

  def __post_init__(self):
    check_backbone(self)
    check_config(self, positive=("num_experts",), non_negative=("num_classes",))
    super().__post_init__()

  @nn.compact
  def __call__(self, images, *, t, labels=None, deterministic=True):
    """Cluster logits of noised images.

    Args:
      images: x_t [batch, image_size, image_size, channels] float.
      t: [batch] (or a scalar) float32 in [0, 1] (data at t = 0, noise at t = 1).
      labels: [batch] int32 classes of a class-conditional router (num_classes > 0): p(k | x_t, t, class); ignored
        when num_classes = 0.
      deterministic: unused (no dropout); part of the models' call contract.

    Returns:
      (logits [batch, num_experts] float32, ModelOutput with no aux loss).
    """
    del deterministic
    t = check_inputs(self, images, t)
    condition = None
    if self.num_classes:
      if labels is None or jnp.shape(labels) != images.shape[:1]:
        raise ValueError(f"labels must be int [batch] = [{images.shape[0]}] for a router with num_classes > 0")
      condition = Embed(
        self.num_classes,
        self.embed_dim,
        dtype=jnp.dtype(self.dtype),
        param_dtype=jnp.dtype(self.param_dtype),
        name="class_embed",
      )(labels)
    x, _ = backbone_of(self)(images, t, condition)
    pooled = jnp.mean(x.astype(jnp.float32), axis=1).astype(jnp.dtype(self.dtype))
    logits = DenseGeneral(
      self.num_experts,
      kernel_axes=("embed", "expert"),
      use_bias=True,
      dtype=jnp.dtype(self.dtype),
      param_dtype=jnp.dtype(self.param_dtype),
      name="head",
    )(pooled)
    return logits.astype(jnp.float32), ModelOutput()

  def num_params(self):
    """Analytic parameter count (equals `count_params` of the initialised params)."""
    return (
      backbone_params(self) + self.embed_dim * self.num_experts + self.num_experts + self.num_classes * self.embed_dim
    )

  def flops_per_sample(self):
    """Forward FLOPs of one image (2 x multiply-adds of the matmuls, attention included): `zoo.models.dit.
    backbone_flops` plus the head `2 E K` (after pooling)."""
    return backbone_flops(self) + 2 * self.embed_dim * self.num_experts
