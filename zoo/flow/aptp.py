"""APTP, prompt-based pruning of text-to-image diffusion models (Ganjdanesh et al. 2024, "Not All Prompts Are Made
Equal", arXiv:2406.12042, Section 3): the prompt router, its balanced assignment to architecture codes, the
Gumbel-Sigmoid gates and the contrastive and resource losses. Pure JAX plus one Flax linen module.

Pipeline, as the reference code (github rezashkv/diffusion_pruning, `pdm/`) runs it in one training step
(`pdm/training/trainer.py`, `step`):

  1. prompt encoder (frozen sentence transformer, pooled) -> prompt embedding z [B, P];
  2. architecture predictor (`pdm/models/hypernet/hypernet.py`, `HyperStructure`): one linear head per gate group
     (orthogonal kernels, bias initialised to 0) -> architecture embedding e [B, G], which lives in the space of the
     gate logits (G = number of width + depth gates; there is no separate bottleneck);
  3. router (`pdm/models/vq/quantizer.py`, `StructureVectorQuantizer`): n architecture codes, a parameter [n, G] of
     gate logits (orthogonal init). Both e and the codes go through the Gumbel-Sigmoid, are scaled per gate group
     and L2-normalised; their cosine similarities [B, n] are the scores. Training assigns by Sinkhorn-Knopp on those
     scores (SwAV's, epsilon 0.05, 3 iterations) and takes the argmax of the plan; evaluation takes the argmax
     cosine. The assignment carries no gradient;
  4. what is fed onward is the prototype: the Gumbel-Sigmoid gates of the assigned code (one noise draw per code per
     step, shared by every prompt routed to it). No straight-through from e to the code and no commitment loss (the
     quantizer stores `beta = 0.25` but never uses it), so the predictor learns only from the contrastive loss and
     the codes from the diffusion, distillation and resource losses;
  5. the pruned UNet multiplies channels / blocks by the gates, hardened at 0.5 with a straight-through gradient
     (`hard_concrete` in `pdm/utils/estimation_utils.py`, applied inside the gated blocks);
  6. losses (weights from `configs/pruning/sd-2-1_cc3m.yaml`, identical in `sd-2-1_coco2014.yaml`): diffusion (snr
     gamma 5) x1.0 + resource x2.0 + contrastive x100 + distillation (MSE to the unpruned UNet's output) x0.2 + block
     distillation (MSE of block activations) x0.2 + std x0.1 + max x0.1 (`LOSS_WEIGHTS`). For the first 500 steps
     (`hypernet_pretraining_steps`) the predictor's own gates are fed onward instead of the codes' (`pretrain=True`).

Gates start open: the Gumbel-Sigmoid adds an offset (the quantizer's `base`, 3 in the configs) to logits that start
near 0, so sigmoid((0 + 3) / 0.4) > 0.99 and the pruned model starts as the unpruned one; no bias is needed.

Defaults and their source:
  TEMPERATURE = 0.4       Gumbel-Sigmoid temperature, configs `quantizer_T` (and the quantizer's default).
  OFFSET = 3.0            Gumbel-Sigmoid offset, configs `quantizer_base` (the quantizer's own default is 2).
  NUM_CODES = 8           configs `num_arch_vq_codebook_embeddings`.
  SINKHORN_EPSILON = 0.05, SINKHORN_ITERATIONS = 3   the quantizer's defaults (not overridden in the configs).
  CONTRASTIVE_TEMPERATURE = 0.03   configs `arch_vector_temperature` and `prompt_embedding_temperature`.
  RESOURCE_TARGET = 0.6   configs `pruning_target` (fraction of the prunable MACs kept), loss type 'log'.
  LOSS_WEIGHTS, HYPERNET_PRETRAINING_STEPS = 500   configs `training.losses.*.weight`, `hypernet_pretraining_steps`.

Where this file departs from the reference (each also marked in the docstrings):
  * [guess] `PromptRouter(arch_dim=int)` is an optional bottleneck variant (predictor to `arch_dim`, codes in that
    space, an MLP decoder from the code to gate logits); the reference is `arch_dim=None`, the default.
  * the reference's assignment vectors harden the gates (straight-through) except the width gates of depth-gated
    blocks, which stay soft and are multiplied by their block's depth gate (`width_depth_normalize`); without a block
    structure, `PromptRouter` uses the soft gates everywhere, scaled by 1/sqrt(group size) (`width_groups`).
  * evaluation draws the Gumbel noise of the prompts' and the codes' gates from a fixed seed (`eval_seed`, 0), as the
    reference does for the prompts; the reference reuses the codes' last training sample, here the codes get a fixed
    draw too. `eval_seed=None` evaluates noiselessly (threshold of sigmoid((logits + offset) / T) at 0.5).
  * one noise draw of e per step serves both the assignment and the contrastive loss (the reference draws twice).
  * the reference's `force_width_non_zero` (reopen the first gate of a group whose gates all closed) and its
    `depth_order` permutation of the depth gates are not implemented.
"""

import math

import flax.linen as nn
import jax
import jax.numpy as jnp

TEMPERATURE = 0.4
OFFSET = 3.0
NUM_CODES = 8
SINKHORN_EPSILON = 0.05
SINKHORN_ITERATIONS = 3
CONTRASTIVE_TEMPERATURE = 0.03
RESOURCE_TARGET = 0.6
HYPERNET_PRETRAINING_STEPS = 500
LOSS_WEIGHTS = {
  "diffusion": 1.0,
  "resource": 2.0,
  "contrastive": 100.0,
  "distillation": 0.2,
  "block": 0.2,
  "std": 0.1,
  "max": 0.1,
}
NOISES = ("gumbel", "logistic")

_GUMBEL_EPS = 1e-20  # inside both logs of the Gumbel sample, as `sample_gumbel` in the reference
_IMPORTANCE_EPS = 1e-6  # of the inverse sigmoid in `importance_logits`, as the reference
_BCE_LOG_FLOOR = -100.0  # torch's binary_cross_entropy clamps each log at -100
_NORM_EPS = 1e-12  # [guess] guards the L2 normalisations against a zero vector (the reference divides unguarded)


def _l2_normalize(x):
  """Rows of `x` [..., d] scaled to unit L2 norm (float32)."""
  x = x.astype(jnp.float32)
  return x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), _NORM_EPS)


def sample_noise(rng, shape, noise="gumbel"):
  """Noise added to the gate logits: 'gumbel' (one standard Gumbel sample, -log(-log u), as the reference's
  `sample_gumbel`) or 'logistic' (the difference of two Gumbels, the binary-concrete noise of Maddison et al. 2017 /
  Jang et al. 2017). float32 of `shape`."""
  if noise not in NOISES:
    raise ValueError(f"noise={noise!r} is invalid; allowed: {NOISES}")

  def gumbel(key):
    u = jax.random.uniform(key, shape, jnp.float32)
    return -jnp.log(-jnp.log(u + _GUMBEL_EPS) + _GUMBEL_EPS)

  if noise == "gumbel":
    return gumbel(rng)
  k1, k2 = jax.random.split(rng)
  return gumbel(k1) - gumbel(k2)


def gumbel_sigmoid(logits, rng, temperature=TEMPERATURE, hard=True, offset=OFFSET, noise="gumbel"):
  """Gumbel-Sigmoid gates `sigmoid((logits + noise + offset) / temperature)` (APTP Section 3; the reference's
  `gumbel_softmax_sample` and `hard_concrete`, `pdm/utils/estimation_utils.py`).

  Args:
    logits: gate logits [...].
    rng: a PRNG key, or None for deterministic evaluation (no noise; [guess] the reference uses a fixed-seed sample).
    temperature: T; lower T gives samples closer to 0/1.
    hard: return {0, 1} (1 where the soft gate >= 0.5, i.e. logits + noise + offset >= 0) with the soft gate's
      gradient (straight-through), as `hard_concrete`.
    offset: added to the logits before the sigmoid (the reference's `base`); a positive offset opens gates whose
      logits are near 0.
    noise: 'gumbel' (the reference: one Gumbel sample, mean 0.577) or 'logistic' (difference of two Gumbels).

  Returns:
    float32 gates of `logits`' shape, in (0, 1) (hard=False) or {0, 1} (hard=True).
  """
  z = logits.astype(jnp.float32) + offset
  if rng is not None:
    z = z + sample_noise(rng, logits.shape, noise)
  soft = jax.nn.sigmoid(z / temperature)
  if not hard:
    return soft
  hard_value = (z >= 0).astype(jnp.float32)
  return hard_value + (soft - jax.lax.stop_gradient(soft))  # exactly {0, 1}; gradient of soft


def importance_logits(depth_logits):
  """The reference's ordered depth gates (`importance_gumbel_softmax_sample`): softmax over the K depth logits,
  reversed cumulative sum (entry j is the mass of positions 0..K-1-j, so entry 0 is 1 and the sequence decreases),
  then the inverse sigmoid; the result is the logit fed to `gumbel_sigmoid`. [..., K] -> [..., K] float32."""
  p = jax.nn.softmax(depth_logits.astype(jnp.float32), axis=-1)
  p = jnp.flip(jnp.cumsum(p, axis=-1), axis=-1)
  return jnp.log(p + _IMPORTANCE_EPS) - jnp.log1p(-(p - _IMPORTANCE_EPS))


def sinkhorn(scores, epsilon=SINKHORN_EPSILON, iterations=SINKHORN_ITERATIONS):
  """Balanced soft assignment by Sinkhorn-Knopp (SwAV, Caron et al. 2020; the quantizer's
  `get_optimal_transport_min_encoding_indices`).

  `Q = exp(scores / epsilon)`, scaled to total mass 1; then `iterations` times: each code's column to mass 1/n, each
  row to mass 1/B; finally rows are scaled to sum to 1. The column scaling comes before the row scaling in each
  iteration, so the rows sum to 1 exactly and the codes' masses are only close to B/n (closer with more iterations).

  Args:
    scores: [B, n] (cosine similarities of architecture embeddings and codes).
    epsilon: entropic regularisation (the temperature of the exp).
    iterations: Sinkhorn iterations.

  Returns:
    Q [B, n] float32 with no gradient; row b is the assignment distribution of sample b.
  """
  s = jax.lax.stop_gradient(scores).astype(jnp.float32) / epsilon
  q = jnp.exp(s - jnp.max(s))  # the global shift cancels in the first normalisation; avoids overflow
  batch, num_codes = q.shape
  q = q / jnp.sum(q)
  for _ in range(iterations):
    q = q / jnp.sum(q, axis=0, keepdims=True) / num_codes
    q = q / jnp.sum(q, axis=1, keepdims=True) / batch
  return q * batch


def cosine_scores(arch_embedding, codes):
  """Cosine similarities [B, n] of `arch_embedding` [B, d] and `codes` [n, d] (float32)."""
  return jnp.einsum(
    "bd,nd->bn", _l2_normalize(arch_embedding), _l2_normalize(codes), precision=jax.lax.Precision.HIGHEST
  )


def assign(
  arch_embedding,
  codes,
  training,
  *,
  epsilon=SINKHORN_EPSILON,
  iterations=SINKHORN_ITERATIONS,
  prototypes=None,
):
  """Route each architecture embedding to a code (the quantizer's `forward`).

  Training: argmax of the Sinkhorn plan of the cosine scores (balanced across codes); evaluation: argmax cosine.
  Ties go to the lower index. The index carries no gradient. What is fed onward is the prototype (the assigned row of
  `prototypes`), with its own gradient and none to `arch_embedding`; the reference has no commitment or assignment
  loss (its `beta` is unused), so the loss returned is 0.

  Args:
    arch_embedding: [B, d] in the assignment space.
    codes: [n, d] in the same space.
    training: Python bool.
    epsilon, iterations: of `sinkhorn`.
    prototypes: [n, ...] rows fed onward (e.g. the codes' gates); default `codes`.

  Returns:
    (code [B] int32, prototypes[code] [B, ...], loss () float32 = 0).
  """
  scores = jax.lax.stop_gradient(cosine_scores(arch_embedding, codes))
  plan = sinkhorn(scores, epsilon, iterations) if training else scores
  code = jnp.argmax(plan, axis=-1).astype(jnp.int32)
  prototypes = codes if prototypes is None else prototypes
  return code, jnp.take(prototypes, code, axis=0), jnp.zeros((), jnp.float32)


def contrastive_loss(arch_embedding, prompt_embedding, temperature=CONTRASTIVE_TEMPERATURE, prompt_temperature=None):
  """APTP's contrastive loss (`pdm/losses/contrastive_loss.py`): binary cross-entropy between the row-softmaxed
  similarity matrices of the L2-normalised architecture and prompt embeddings.

  `BCE(input=softmax(A A^T / T_a), target=softmax(P P^T / T_p))`, the mean over all B x B entries, each log clamped
  at -100 (as torch). The target carries no gradient (the prompt encoder is frozen).

  Args:
    arch_embedding: A [B, d] (in the reference: the predictor's Gumbel-Sigmoid gates scaled per group).
    prompt_embedding: P [B, P].
    temperature: T_a (0.03).
    prompt_temperature: T_p; default `temperature` (both 0.03 in the configs).

  Returns:
    () float32.
  """
  prompt_temperature = temperature if prompt_temperature is None else prompt_temperature
  a = _l2_normalize(arch_embedding)
  p = _l2_normalize(jax.lax.stop_gradient(prompt_embedding))
  hp = jax.lax.Precision.HIGHEST
  a_logits = jnp.einsum("id,jd->ij", a, a, precision=hp) / temperature
  target = jax.nn.softmax(jnp.einsum("id,jd->ij", p, p, precision=hp) / prompt_temperature, axis=-1)
  log_p = jnp.maximum(jax.nn.log_softmax(a_logits, axis=-1), _BCE_LOG_FLOOR)
  one_minus = 1.0 - jax.nn.softmax(a_logits, axis=-1)
  positive = one_minus > 0
  safe_log = jnp.log(jnp.where(positive, one_minus, 1.0))  # no log(0): its zero cotangent would still give nan
  log_1mp = jnp.where(positive, jnp.maximum(safe_log, _BCE_LOG_FLOOR), _BCE_LOG_FLOOR)
  return -jnp.mean(target * log_p + (1.0 - target) * log_1mp)


def resource_loss(flops_ratio, target=RESOURCE_TARGET):
  """APTP's resource loss, type 'log' (`pdm/losses/resource_loss.py`): `|log(r / target)|`.

  `flops_ratio` [B] (per-sample MACs of the pruned model / the unpruned's prunable MACs) is averaged first: the
  reference takes the log of the batch mean, not the mean of the logs. The ratio is floored at 1e-6 (as the
  reference, on the below-target side). Returns () float32, 0 at the target, symmetric in log(r / target).
  """
  r = jnp.mean(jnp.asarray(flops_ratio, jnp.float32))
  return jnp.abs(jnp.log(jnp.maximum(r, 1e-6) / target))


def resource_spread_losses(flops_ratio):
  """The trainer's two extra resource terms on the per-sample ratios [B]: ('max', 1 - max r) and ('std', -std r)
  (unbiased std, as torch), weighted 0.1 each. Returns a dict of () float32."""
  r = jnp.asarray(flops_ratio, jnp.float32)
  if r.shape[0] < 2:  # one sample: no spread (the unbiased std is 0 / 0)
    return {"max": 1.0 - jnp.max(r), "std": jnp.zeros((), jnp.float32)}
  var = jnp.var(r, ddof=1)
  # sqrt'(0) is infinite: equal ratios (every gate open at initialisation) would make the gradient NaN
  std = jnp.where(var > 0, jnp.sqrt(jnp.where(var > 0, var, 1.0)), 0.0)
  return {"max": 1.0 - jnp.max(r), "std": -std}


def group_scale(width_groups, num_gates):
  """Per-gate scale of the assignment space (the reference's `template`): 1/sqrt(s) for each gate of a width group
  of size s, 1 for the remaining (depth) gates; all ones when `width_groups` is empty. [num_gates] float32."""
  if not width_groups:
    return jnp.ones((num_gates,), jnp.float32)
  num_width = sum(width_groups)
  if num_width > num_gates:
    raise ValueError(f"width_groups={width_groups} sum to {num_width} > num_gates={num_gates}")
  scale = [1.0 / math.sqrt(s) for s in width_groups for _ in range(s)] + [1.0] * (num_gates - num_width)
  return jnp.asarray(scale, jnp.float32)


class PromptRouter(nn.Module):
  """APTP's prompt router: architecture predictor, architecture codes and balanced assignment (Section 3; the
  reference's `HyperStructure` + `StructureVectorQuantizer`).

  Attributes:
    num_gates: G, total gate logits (width gates first, then `num_depth_gates` depth gates).
    num_codes: n architecture codes (8).
    arch_dim: None (the reference): the architecture embedding and the codes are gate logits [.., G]. An int:
      [guess] bottleneck variant, embedding and codes in R^arch_dim, gate logits = decoder(code).
    hidden_dim: [guess] hidden width of the decoder (bottleneck variant only).
    temperature, offset, noise: of `gumbel_sigmoid`.
    sinkhorn_epsilon, sinkhorn_iterations: of `sinkhorn`.
    width_groups: sizes of the width-gate groups (per-gate scale 1/sqrt(size) in the assignment space); () = 1 each.
    num_depth_gates: trailing gates whose logits go through `importance_logits` (ordered depth gates); 0 = none.
    eval_seed: the seed of the fixed Gumbel draw of evaluation (the reference's 0); None = noiseless evaluation.
  """

  num_gates: int
  num_codes: int = NUM_CODES
  arch_dim: int | None = None
  hidden_dim: int = 64
  temperature: float = TEMPERATURE
  offset: float = OFFSET
  noise: str = "gumbel"
  sinkhorn_epsilon: float = SINKHORN_EPSILON
  sinkhorn_iterations: int = SINKHORN_ITERATIONS
  width_groups: tuple[int, ...] = ()
  num_depth_gates: int = 0
  eval_seed: int | None = 0

  def _gates(self, logits, rng, hard):
    """Gumbel-Sigmoid gates of gate logits [..., G], the trailing depth logits through `importance_logits`."""
    if self.num_depth_gates:
      k = self.num_depth_gates
      logits = jnp.concatenate([logits[..., :-k], importance_logits(logits[..., -k:])], axis=-1)
    return gumbel_sigmoid(logits, rng, self.temperature, hard, self.offset, self.noise)

  @nn.compact
  def __call__(self, prompt_embedding, *, training, rng=None, pretrain=False):
    """Route a batch of prompts.

    Args:
      prompt_embedding: pooled prompt embeddings [B, P].
      training: Python bool; Sinkhorn assignment and Gumbel noise (when `rng` is given) in training, argmax cosine
        and the fixed draw of `eval_seed` (or no noise) in evaluation (`rng` is then ignored).
      rng: PRNG key for the Gumbel noise (training only); None gives noiseless training gates.
      pretrain: feed the predictor's own gates onward instead of the assigned code's (the reference's first
        `HYPERNET_PRETRAINING_STEPS` steps); the code is still computed.

    Returns:
      dict: 'arch_embedding' [B, d] (input of `contrastive_loss`; d = G, or arch_dim in the bottleneck variant),
      'code' [B] int32, 'gate_logits' [B, G] (the logits of the gates fed onward), 'gates' [B, G] (hard {0, 1},
      straight-through), 'code_gates' [n, G] (every code's hard gates), 'scores' [B, n] (cosine, no gradient),
      'assign_loss' () float32 (0: the reference has none).
    """
    if self.num_depth_gates > self.num_gates:
      raise ValueError(f"num_depth_gates={self.num_depth_gates} > num_gates={self.num_gates}")
    if not training:
      rng = None if self.eval_seed is None else jax.random.key(self.eval_seed)
    k_arch, k_codes = jax.random.split(rng) if rng is not None else (None, None)
    x = prompt_embedding.astype(jnp.float32)
    dim = self.num_gates if self.arch_dim is None else self.arch_dim
    orthogonal = nn.initializers.orthogonal()
    # The predictor: the reference's per-group linear heads, here one head (orthogonal kernel, zero bias).
    e = nn.Dense(dim, kernel_init=orthogonal, bias_init=nn.initializers.zeros, name="predictor")(x)
    codes = self.param("codes", orthogonal, (self.num_codes, dim), jnp.float32)

    if self.arch_dim is None:
      scale = group_scale(self.width_groups, self.num_gates)
      code_logits = codes
      arch_embedding = self._gates(e, k_arch, hard=False) * scale
      code_space = self._gates(code_logits, k_codes, hard=False) * scale
      own_logits = e
    else:  # [guess] bottleneck variant: assignment between raw embeddings; a shared decoder makes the gate logits
      decoder = nn.Sequential(
        [
          nn.Dense(self.hidden_dim, kernel_init=orthogonal, name="decoder_hidden"),
          nn.relu,
          nn.Dense(self.num_gates, kernel_init=orthogonal, name="decoder_out"),
        ]
      )
      code_logits = decoder(codes)
      arch_embedding = e
      code_space = codes
      own_logits = decoder(e)

    code_gates = self._gates(code_logits, k_codes, hard=True)  # one draw per code, shared by its prompts
    code, gates, assign_loss = assign(
      arch_embedding,
      code_space,
      training,
      epsilon=self.sinkhorn_epsilon,
      iterations=self.sinkhorn_iterations,
      prototypes=code_gates,
    )
    gate_logits = jnp.take(code_logits, code, axis=0)
    if pretrain:
      gate_logits = own_logits
      gates = self._gates(own_logits, k_arch, hard=True)
    return {
      "arch_embedding": arch_embedding,
      "code": code,
      "gate_logits": gate_logits,
      "gates": gates,
      "code_gates": code_gates,
      "scores": jax.lax.stop_gradient(cosine_scores(arch_embedding, code_space)),
      "assign_loss": assign_loss,
    }
