"""APTP: Ganjdanesh et al. 2024, "Not All Prompts Are Made Equal: Prompt-based Pruning of Text-to-Image Diffusion
Models" (arXiv:2406.12042; papers.md D2), on the zoo's flow-matching DiT (`zoo.models.dit`).

A prompt router maps each prompt to one of `num_codes` architecture codes; each code decodes to structured-pruning
gates of one shared denoiser (its attention heads, MLP units and whole blocks), so easy prompts run a smaller network
(`zoo.flow.aptp`: hypernetwork, Sinkhorn-balanced code assignment in training, cosine argmax at evaluation,
Gumbel-sigmoid gates at temperature 0.4). Sub-modules:
- `student`: the DiT that is pruned (initialised from a trained `dit` run: `config.init_from={'student': RUN,
  'teacher': RUN}`).
- `teacher`: the same DiT unpruned and frozen (`config.frozen_params=('^teacher/',)`): the distillation target.
- `router`: `zoo.flow.aptp.PromptRouter` over the prompt embedding [batch, prompt_dim].

The model's auxiliary loss is the paper's resource loss `|log(FLOPs ratio / target_flops)|` (the ratio of the gated
student's FLOPs to the unpruned DiT's, from the Gumbel-sigmoid gates, so it is differentiable), the contrastive loss
between the architecture and prompt embeddings, and the router's assignment loss; the task (`zoo.tasks.aptp`) adds
flow matching and distillation from the teacher.

Deviations [guess]: the paper prunes Stable Diffusion's U-Net channels and attention heads and fine-tunes each
pruned expert afterwards; here the gates prune a DiT's heads, MLP units and blocks, and `freeze_architecture=True`
(the fine-tuning phase) trains the shared student under each prompt's evaluation gates (one copy of the weights for
all codes, not one per expert). The reference's first 500 pruning steps feed the predictor's own gates
(`PromptRouter(pretrain=True)`); the shipped configs skip that warm-up.
"""

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from zoo.flow import aptp
from zoo.models.dit import DiT
from zoo.models.output import ModelOutput
from zoo.models.registry import ConfigError, check_config, register_model

DIT_FIELDS = (
  "image_size",
  "channels",
  "patch_size",
  "num_classes",
  "embed_dim",
  "num_layers",
  "num_heads",
  "mlp_ratio",
  "frequency_dim",
  "time_scale",
  "norm_epsilon",
  "dtype",
  "param_dtype",
)


@register_model("aptp")
class APTP(nn.Module):
  """Prompt-routed pruning of a DiT (see the module docstring). Config keys are the fields below.

  Attributes:
    image_size .. param_dtype: the pruned DiT's fields (`zoo.models.dit.DiT`; the same as the run it starts from).
    prompt_dim: width of the prompt embedding (the task's `zoo.tasks.aptp.VOCABULARY`).
    num_codes: n architecture codes (APTP: 8; 1 = one static pruned architecture for every prompt).
    arch_dim: None (APTP's code: the architecture embedding and the codes are gate logits) or the width of a
      [guess] bottleneck embedding decoded to gate logits by an MLP of `hidden_dim`.
    hidden_dim: the bottleneck variant's decoder width [guess].
    temperature: Gumbel-sigmoid temperature (APTP: 0.4).
    offset: added to the gate logits before the sigmoid (APTP's configs: 3), so every gate starts open.
    target_flops: the kept fraction of the FLOPs (APTP's `pruning_target` 0.6, of MACs).
    resource_weight: weight of `|log(mean ratio / target)|` (APTP: 2).
    spread_weight: weight of each of APTP's `1 - max ratio` and `-std ratio` terms (APTP: 0.1).
    contrastive_weight: weight of the contrastive loss (APTP: 100).
    contrastive_temperature: temperature of both similarity softmaxes (APTP: 0.03).
    freeze_architecture: True = the fine-tuning phase: every prompt takes its evaluation gates (cosine argmax code,
      hard gates, no noise) and only the denoiser learns.

  `exposes` (the `zoo.models` contract): none.
  """

  exposes: ClassVar[tuple[str, ...]] = ()
  image_size: int = 8
  channels: int = 1
  patch_size: int = 2
  num_classes: int = 10
  embed_dim: int = 64
  num_layers: int = 4
  num_heads: int = 4
  mlp_ratio: float = 4.0
  frequency_dim: int = 256
  time_scale: float = 1000.0
  norm_epsilon: float = 1e-6
  dtype: Any = "float32"
  param_dtype: Any = "float32"
  prompt_dim: int = 15
  num_codes: int = aptp.NUM_CODES
  arch_dim: int | None = None
  hidden_dim: int = 64
  temperature: float = aptp.TEMPERATURE
  offset: float = aptp.OFFSET
  target_flops: float = aptp.RESOURCE_TARGET
  resource_weight: float = 2.0
  spread_weight: float = 0.1
  contrastive_weight: float = 100.0
  contrastive_temperature: float = aptp.CONTRASTIVE_TEMPERATURE
  freeze_architecture: bool = False

  def __post_init__(self):
    check_config(
      self,
      positive=("prompt_dim", "num_codes", "hidden_dim"),
      optional_positive=("arch_dim",),
      non_negative=("resource_weight", "spread_weight", "contrastive_weight"),
      intervals={"temperature": "(0, inf)", "target_flops": "(0, 1]", "contrastive_temperature": "(0, inf)"},
    )
    if not isinstance(self.freeze_architecture, bool):
      raise ConfigError(f"config.model.freeze_architecture={self.freeze_architecture!r} must be True or False")
    super().__post_init__()

  def dit(self, name=None):
    """The DiT with this model's fields: a sub-module named `name`, or unbound (for its FLOP counts) when None."""
    fields = {k: getattr(self, k) for k in DIT_FIELDS}
    return DiT(**fields, name=name) if name else DiT(**fields, parent=None)

  @property
  def mlp_dim(self):
    return int(self.embed_dim * self.mlp_ratio)

  @property
  def width_groups(self):
    """The router's width-gate groups: each layer's heads, then each layer's MLP units."""
    return (self.num_heads,) * self.num_layers + (self.mlp_dim,) * self.num_layers

  @property
  def num_gates(self):
    return sum(self.width_groups) + self.num_layers  # + one depth gate per block

  def layer_gates(self, flat):
    """Flat gates [batch, L*heads | L*mlp | L blocks] (width first, depth last: `zoo.flow.aptp.PromptRouter`'s
    layout) -> one `AdaLNZeroBlock` gate dict per layer."""
    b, n, h, m = flat.shape[0], self.num_layers, self.num_heads, self.mlp_dim
    heads = flat[:, : n * h].reshape(b, n, h)
    mlp = flat[:, n * h : n * (h + m)].reshape(b, n, m)
    block = flat[:, n * (h + m) :]
    return [{"heads": heads[:, i], "mlp": mlp[:, i], "block": block[:, i]} for i in range(n)]

  def flops_ratio(self, gates):
    """The gated student's FLOPs over the unpruned DiT's, per sample [batch]."""
    student = self.dit()
    return student.pruned_flops(self.layer_gates(gates)) / student.flops_per_sample()

  @nn.compact
  def __call__(self, images, *, t, prompts, labels=None, distill=False, deterministic=True):
    """The pruned student's velocity for each prompt's architecture.

    Args:
      images: x_t [batch, image_size, image_size, channels] float.
      t: [batch] float32 in [0, 1] (data at t = 0).
      prompts: the prompt embeddings [batch, prompt_dim] float32.
      labels: [batch] int32 class labels (num_classes = the null class), as for `dit`.
      distill: also run the frozen teacher (training).
      deterministic: False in training: Sinkhorn assignment and Gumbel-sigmoid gates with the 'dropout' rng (unless
        freeze_architecture).

    Returns:
      ({'velocity': [batch, H, W, C] float32, 'code': [batch] int32, 'flops_ratio': [batch], and with distill
      'teacher': the teacher's velocity (no gradient)}, ModelOutput with the resource, contrastive and assignment
      losses in aux_loss and their values in metrics).
    """
    if prompts.ndim != 2 or prompts.shape != (images.shape[0], self.prompt_dim):
      raise ValueError(
        f"prompts must be [batch, prompt_dim] = [{images.shape[0]}, {self.prompt_dim}], got {tuple(prompts.shape)}"
      )
    training = not deterministic and not self.freeze_architecture
    route = aptp.PromptRouter(
      num_gates=self.num_gates,
      num_codes=self.num_codes,
      arch_dim=self.arch_dim,
      hidden_dim=self.hidden_dim,
      temperature=self.temperature,
      offset=self.offset,
      width_groups=self.width_groups,
      num_depth_gates=self.num_layers,
      name="router",
    )(prompts, training=training, rng=self.make_rng("dropout") if training else None)
    gates = route["gates"]
    velocity, _ = self.dit("student")(images, t=t, labels=labels, gates=self.layer_gates(gates))
    ratio = self.flops_ratio(gates)
    outputs = {"velocity": velocity, "code": route["code"], "flops_ratio": ratio}
    if distill:
      teacher, _ = self.dit("teacher")(images, t=t, labels=labels)
      outputs["teacher"] = jax.lax.stop_gradient(teacher)
    resource = aptp.resource_loss(ratio, self.target_flops)
    spread = aptp.resource_spread_losses(ratio)
    contrastive = aptp.contrastive_loss(route["arch_embedding"], prompts, self.contrastive_temperature)
    aux = (
      self.resource_weight * resource
      + self.spread_weight * (spread["max"] + spread["std"])
      + self.contrastive_weight * contrastive
      + route["assign_loss"]
    )
    if self.freeze_architecture:
      aux = jnp.zeros((), jnp.float32)
    metrics = {
      "resource_loss": resource,
      "contrastive_loss": contrastive,
      "flops_ratio": jnp.mean(ratio),
      "codes_used": jnp.sum(jnp.any(jax.nn.one_hot(route["code"], self.num_codes) > 0, axis=0)),
    }
    return outputs, ModelOutput(aux_loss=aux.astype(jnp.float32), metrics=metrics)

  def flops_per_sample(self):
    """Forward FLOPs of the unpruned student on one image (the pruned cost is `flops_ratio` times this)."""
    return self.dit().flops_per_sample()
