"""Routers of mixtures of LoRA experts (papers.md B1-B3): pure float32 functions from router logits to `LoRARouting`.

Each router returns the dense combine weights `weights [tokens, E]` (0 for the experts a token does not use; what
`zoo.layers.lora_dispatch.dense_lora_experts` takes), the selected experts `expert_ids [tokens, k_max]` (-1 = empty
slot; what `zoo.layers.lora_dispatch.sparse_lora_experts` takes besides the weights), and its auxiliary losses:
- `lora_mixer`: LoRA-Mixer (B1), hard top-k with softmax weights over the selected logits and the "specialization
  balance loss" (Switch load balance + mean routing entropy) [guess: no code released];
- `dynmole`: DynMoLE (B2), top-p with a minimum of experts, all experts for tokens whose Tsallis entropy is high,
  weights `p_e` without renormalisation; Tsallis-entropy and load-balance losses [code];
- `glider`: GLIDER (B3), local logits (`glider_local_logits`) plus a scaled per-sequence task bias
  (`glider_task_bias`), softmax, top-2, renormalised [code]; no auxiliary loss.
"""

import flax.struct
import jax
import jax.numpy as jnp

from zoo.routing import routers
from zoo.routing.metrics import routing_metrics

# GLIDER's scale of the global (task-instruction) bias: 100 on held-in tasks, 3 on held-out tasks
# (UNITES-Lab/glider, src/scripts/paper-eval.sh, `bias_routing_scale`).
GLIDER_SCALE_HELD_IN = 100.0
GLIDER_SCALE_HELD_OUT = 3.0


@flax.struct.dataclass
class LoRARouting:
  """A routing decision over E LoRA experts for a flat set of tokens.

  Attributes:
    weights: [tokens, E] float32 combine weight of every expert (0 for the experts a token does not use).
    expert_ids: [tokens, k_max] int32 selected experts, -1 marks an empty slot.
    probs: [tokens, E] float32 router probabilities (softmax of the logits the router selects from).
    aux: dict name -> unweighted scalar auxiliary loss, for logging.
    aux_loss: scalar float32, the router's auxiliary losses weighted by their coefficients (what the model adds to
      the task loss; 0 for a router without one).
    metrics: dict name -> array (`zoo.routing.metrics.routing_metrics`, plus a router's own).
  """

  weights: jax.Array
  expert_ids: jax.Array
  probs: jax.Array
  aux: dict = flax.struct.field(default_factory=dict)
  aux_loss: jax.Array = flax.struct.field(default_factory=lambda: jnp.zeros((), jnp.float32))
  metrics: dict = flax.struct.field(default_factory=dict)


def slots_to_dense(expert_ids, slot_weights, num_experts):
  """[tokens, k] slot weights -> [tokens, E] dense weights (empty slots, -1, add nothing).

  Args:
    expert_ids: [tokens, k] int expert of each slot, -1 = empty.
    slot_weights: [tokens, k] weight of each slot.
    num_experts: E.

  Returns:
    [tokens, E] float32.
  """
  one_hot = jax.nn.one_hot(expert_ids, num_experts, dtype=jnp.float32)  # empty slots: all-zero rows
  return jnp.einsum("tk,tke->te", slot_weights.astype(jnp.float32), one_hot)


def _from_topk(logits, routing, aux, aux_loss):
  """LoRARouting from a `routers.softmax_topk` Routing."""
  num_experts = logits.shape[-1]
  return LoRARouting(
    weights=slots_to_dense(routing.expert_ids, routing.weights, num_experts),
    expert_ids=routing.expert_ids,
    probs=routing.probs,
    aux=aux,
    aux_loss=jnp.asarray(aux_loss, jnp.float32),
    metrics=routing.metrics,
  )


def shannon_entropy(logits):
  """Routing entropy `H(p_t) = -sum_e p_te log p_te` in nats, p = softmax(logits); differentiable.

  Args:
    logits: [tokens, E].

  Returns:
    [tokens] float32.
  """
  log_p = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
  return -jnp.sum(jnp.exp(log_p) * log_p, axis=-1)


def lora_mixer(logits, k, *, load_balance_coef=0.01, entropy_coef=0.01, sequence_length=None):
  """LoRA-Mixer router (papers.md B1; no code released): hard top-k selection with soft weights.

  `p = softmax(logits)`; each token takes its k most probable experts, weighted by the softmax over the selected
  logits (= their p renormalised to sum 1) [guess: papers.md says "hard top-k selection with soft weights"; which
  softmax is not stated]. The "specialization balance loss" is
  `lambda_b * E * sum_e f_e P_e + lambda_h * mean_t H(p_t)` [guess, papers.md B1]: the Switch load-balance term
  (`zoo.routing.losses.load_balance_loss`: f_e the fraction of token-slot assignments routed to e, not
  differentiated; P_e the mean router probability; 1 under uniform routing for any k) plus the mean Shannon entropy
  of the full routing distribution (minimising it makes each token's routing decisive, the "input-aware" term).

  Args:
    logits: [tokens, E] router logits (cast to float32).
    k: experts per token (1 <= k <= E).
    load_balance_coef: the paper's lambda_b [guess: 0.01, Switch Transformer's load-balance weight].
    entropy_coef: the paper's lambda_h [guess: 0.01, the same scale as lambda_b].
    sequence_length: when set, the load-balance term is computed per sequence of this many consecutive tokens and
      averaged (else over all tokens).

  Returns:
    LoRARouting with expert_ids [tokens, k], aux {'load_balance', 'entropy'} (unweighted) and
    aux_loss = load_balance_coef * load_balance + entropy_coef * entropy.
  """
  routing = routers.softmax_topk(logits, k, renormalize=True, sequence_length=sequence_length)
  aux = {"load_balance": routing.aux["load_balance"], "entropy": jnp.mean(shannon_entropy(logits))}
  return _from_topk(logits, routing, aux, load_balance_coef * aux["load_balance"] + entropy_coef * aux["entropy"])


def tsallis_entropy(probs, q, *, eps=1e-5, normalize=True):
  """Tsallis entropy of each token's routing distribution, as DynMoLE computes it (papers.md B2).

  `S_q(p) = (1 - sum_e (p_e + eps)^q) / (q - 1)` (Shannon `-sum (p + eps) log(p + eps)` for q = 1); normalised by its
  maximum over N = E experts, `(1 - N^(1 - q)) / (q - 1)` (log N for q = 1). `eps` is added to every probability
  before the sum, as in mikecovlee/DynMoLE, moe_peft/common/moe_utils.py (`tsallis_entropy`).

  Args:
    probs: [tokens, E] routing probabilities.
    q: the entropic index (> 0; DynMoLE uses 1.1).
    eps: added to each probability (DynMoLE's `entropy_eps`, 1e-5).
    normalize: divide by the maximum entropy of E experts.

  Returns:
    [tokens] float32.
  """
  num_experts = probs.shape[-1]
  p = probs.astype(jnp.float32) + eps
  if q == 1.0:
    entropy = -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=-1)  # 0 log 0 = 0
    max_entropy = jnp.log(float(num_experts))
  else:
    entropy = (1.0 - jnp.sum(p**q, axis=-1)) / (q - 1.0)
    max_entropy = (1.0 - num_experts ** (1.0 - q)) / (q - 1.0)
  return entropy / max_entropy if normalize else entropy


def dynmole(
  logits,
  *,
  top_p=0.75,
  keep_top_k=2,
  entropy_threshold=0.9,
  entropy_index=1.1,
  entropy_eps=1e-5,
  entropy_coef=0.01,
  load_balance_coef=0.001,
):
  """DynMoLE hybrid router (papers.md B2; mikecovlee/DynMoLE, moe_peft/adapters/dynmole/model.py).

  From `_dynamic_routing`: `p = softmax(logits)`; sorted descending, the experts whose cumulative probability
  (themselves included) is <= top_p are kept, so the expert that crosses top_p is dropped; the first `keep_top_k`
  sorted experts are kept regardless. A token whose normalised Tsallis entropy (`tsallis_entropy`, q =
  `entropy_index`) is strictly above `entropy_threshold` uses every expert (only when entropy_threshold < 1, as
  there). The weights are `p_e` on the kept experts, not renormalised (`DynMoleSparseMoe.forward` adds
  `p_e * LoRA_e(x)` for every expert with the masked p).

  Losses, from `_dynamic_load_balancing_loss_func` (no padding mask here): `entropy = mean_t S_q(p_t)` and
  `load_balance = E * sum_e mean_t(w_te) * mean_t(p_te)` with w the masked weights (both factors differentiated, as
  there); `aux_loss = entropy_coef * entropy + load_balance_coef * load_balance` (config.py: `router_dyn_loss_coef`
  0.01, `router_aux_loss_coef` 0.001). Their loss concatenates every layer's router logits before the means; a model
  that averages this per-layer loss gets the same entropy term and a load-balance term over per-layer means.

  Args:
    logits: [tokens, E] router logits (cast to float32), E >= 2.
    top_p: cumulative-probability budget (config.py `top_p`, 0.75).
    keep_top_k: experts always kept (`keep_top_k`, 2).
    entropy_threshold: normalised-entropy level above which all experts are used (`entropy_threshold`, 0.9); >= 1
      turns the switch off.
    entropy_index: Tsallis q (`entropy_index`, 1.1).
    entropy_eps: added to each probability inside the entropy (`entropy_eps`, 1e-5).
    entropy_coef: weight of the entropy loss (`router_dyn_loss_coef`, 0.01).
    load_balance_coef: weight of the load-balance loss (`router_aux_loss_coef`, 0.001).

  Returns:
    LoRARouting with expert_ids [tokens, E]: the kept experts in descending probability, then -1; aux
    {'entropy', 'load_balance'} (unweighted); metrics add 'active_experts' (mean kept per token) and
    'all_experts_fraction' (fraction of tokens switched to all experts).
  """
  routers._check_logits(logits)
  num_experts = logits.shape[-1]
  if num_experts < 2:
    raise ValueError(f"dynmole needs at least 2 experts (the entropy is normalised by that of E), got E={num_experts}")
  if not 0 < top_p <= 1:
    raise ValueError(f"top_p={top_p} is invalid; allowed (0, 1]")
  if keep_top_k < 1:
    raise ValueError(f"keep_top_k={keep_top_k} is invalid; allowed >= 1")
  if not 0 < entropy_index <= 2:
    raise ValueError(f"entropy_index={entropy_index} is invalid; allowed (0, 2] (the Tsallis q)")
  if not entropy_threshold > 0:
    raise ValueError(f"entropy_threshold={entropy_threshold} is invalid; allowed > 0 (>= 1 turns the switch off)")
  logits = logits.astype(jnp.float32)
  probs = jax.nn.softmax(logits, axis=-1)
  sorted_probs, sorted_ids = jax.lax.top_k(probs, num_experts)  # descending
  keep = (jnp.cumsum(sorted_probs, axis=-1) <= top_p) | (jnp.arange(num_experts) < keep_top_k)
  entropy = tsallis_entropy(probs, entropy_index, eps=entropy_eps)  # [tokens]
  all_experts = entropy > entropy_threshold if entropy_threshold < 1 else jnp.zeros_like(entropy, jnp.bool_)
  keep = keep | all_experts[:, None]  # a prefix of the sorted experts for every token
  expert_ids = jnp.where(keep, sorted_ids, -1).astype(jnp.int32)
  mask = slots_to_dense(expert_ids, jnp.ones_like(sorted_probs), num_experts)
  weights = probs * mask
  aux = {
    "entropy": jnp.mean(entropy),
    "load_balance": num_experts * jnp.sum(jnp.mean(weights, axis=0) * jnp.mean(probs, axis=0)),
  }
  metrics = routing_metrics(logits, probs, expert_ids, num_experts)
  metrics["active_experts"] = jnp.mean(jnp.sum(keep, axis=-1).astype(jnp.float32))
  metrics["all_experts_fraction"] = jnp.mean(all_experts.astype(jnp.float32))
  return LoRARouting(
    weights=weights,
    expert_ids=expert_ids,
    probs=probs,
    aux=aux,
    aux_loss=entropy_coef * aux["entropy"] + load_balance_coef * aux["load_balance"],
    metrics=metrics,
  )


def glider_local_logits(h, gate, *, epsilon=1e-5):
  """GLIDER's local router (papers.md B3; UNITES-Lab/glider, src/peft/tuners/molora/layers.py, `forward`).

  `l = LN(h) W_gate / sqrt(d_in)`, LN a layer norm without scale or bias (torch `nn.LayerNorm(d_in,
  elementwise_affine=False)`, epsilon 1e-5); the columns of `gate` are the experts' gate vectors.

  Args:
    h: [tokens, d_in] the adapted layer's input.
    gate: [d_in, E] gate vectors.
    epsilon: the layer norm's epsilon.

  Returns:
    [tokens, E] float32 local logits.
  """
  if h.ndim != 2 or gate.ndim != 2 or h.shape[-1] != gate.shape[0]:
    raise ValueError(f"expected h [tokens, d_in] and gate [d_in, experts], got shapes {h.shape} and {gate.shape}")
  h = h.astype(jnp.float32)
  mean = jnp.mean(h, axis=-1, keepdims=True)
  var = jnp.mean(jnp.square(h - mean), axis=-1, keepdims=True)  # biased, as torch's LayerNorm
  normed = (h - mean) * jax.lax.rsqrt(var + epsilon)
  return normed @ gate.astype(jnp.float32) / jnp.sqrt(float(h.shape[-1]))


def glider_task_bias(expert_embeddings, query_embedding, *, eps=1e-8):
  """GLIDER's global router bias: cosine similarity of each expert's task-instruction embedding with the query's.

  `bias_e = cos(E_expert_instr[e], e_query)` (UNITES-Lab/glider, src/peft/tuners/molora/model.py,
  `update_routing_bias`, torch `cosine_similarity` with its eps 1e-8 on each norm). The authors compute it without
  gradient from fixed embeddings of LLM-written instructions, once per query, and add the same bias in every module.

  Args:
    expert_embeddings: [E, d_t] instruction embedding of each expert's task.
    query_embedding: [d_t] one query's instruction embedding, or [sequences, d_t] one per sequence.

  Returns:
    [E] or [sequences, E] float32.
  """
  if expert_embeddings.ndim != 2 or query_embedding.shape[-1] != expert_embeddings.shape[-1]:
    raise ValueError(
      f"expected expert_embeddings [experts, d_t] and query_embedding [..., d_t], got shapes "
      f"{expert_embeddings.shape} and {query_embedding.shape}"
    )
  e = expert_embeddings.astype(jnp.float32)
  q = query_embedding.astype(jnp.float32)
  e = e / jnp.maximum(jnp.linalg.norm(e, axis=-1, keepdims=True), eps)
  q = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), eps)
  return q @ e.T


def glider(local_logits, bias, scale, k=2):
  """GLIDER router (papers.md B3; UNITES-Lab/glider, src/peft/tuners/molora/layers.py, `forward`).

  `logits = l + scale * bias`; `p = softmax(logits)`; each token takes its k most probable experts, their p
  renormalised to sum 1 (the authors divide by the sum + 1e-6; here exactly, a relative difference below 1e-6).
  `scale` is `GLIDER_SCALE_HELD_IN` (100) on held-in tasks and `GLIDER_SCALE_HELD_OUT` (3) on held-out ones. GLIDER
  trains each expert's gate vector alongside its LoRA, with no routing loss: aux is empty and aux_loss 0.

  Args:
    local_logits: [tokens, E] from `glider_local_logits`.
    bias: [E] one task bias for all tokens, or [sequences, E] one per sequence, the tokens being `sequences`
      consecutive runs of equal length (from `glider_task_bias`).
    scale: the bias scale s.
    k: experts per token (GLIDER uses 2).

  Returns:
    LoRARouting with expert_ids [tokens, k]; probs = softmax of the biased logits.
  """
  routers._check_logits(local_logits, k)
  tokens, num_experts = local_logits.shape
  bias = jnp.asarray(bias, jnp.float32)
  if bias.ndim == 2 and bias.shape[-1] == num_experts and bias.shape[0] >= 1 and tokens % bias.shape[0] == 0:
    bias = jnp.repeat(bias, tokens // bias.shape[0], axis=0)
  elif bias.shape != (num_experts,):
    raise ValueError(
      f"bias must be [experts={num_experts}] or [sequences, {num_experts}] with sequences dividing the tokens "
      f"({tokens}), got shape {bias.shape}"
    )
  logits = local_logits.astype(jnp.float32) + scale * bias
  routing = routers.softmax_topk(logits, k, renormalize=True)
  return _from_topk(logits, routing, {}, 0.0)
