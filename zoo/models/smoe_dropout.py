"""SMoE-Dropout LM: a frozen random router whose number of active experts grows during training (papers.md A7).

Chen et al. 2023, "Sparse MoE as the New Dropout: Scaling Dense and Self-Slimmable Transformers" (ICLR 2023;
VITA-Group/Random-MoE-as-Dropout), Sec. 3.2:
- the router is a randomly initialised Linear(d, E) that is never trained (`moe_lm`'s `router='random'`: the kernel
  lives in the 'routing_state' collection). Its initialisation is the authors' effective one: the gate of
  `CustomNaiveGate` (custom_gate.py) is an `nn.Linear` with a bias, but train.py re-initialises every Linear after
  building the model (`model.apply(weights_init)`, L340; `init_weight` / `init_bias`, L260-275, with the default
  `--init normal --init_std 0.02`): weight ~ N(0, 0.02), bias = 0, then frozen (`--freeze_gate`,
  new_utils.py `freeze_part_weight` L63-68). A bias that stays 0 changes nothing, so the zoo's router has none;
- each token takes the top-k of its router logits, combined with the softmax over those k logits;
- k grows from `k_min` to `k_max = num_experts_per_tok` over `k_schedule_steps` optimizer steps
  (`zoo.routing.sparsity.expert_count_schedule`: the linear schedule of the paper and the cosine, exponential and
  step schedules of the authors' `calculate_gate_number`, new_utils.py L91-124);
- at inference any k can be used ("self-slimmable", Sec. 3.3): `eval_k` (0 = k_max); quality rises with k.

k is a function of the optimizer step, as in the authors' train.py, which sets k from `train_step` (L509-510), the
optimizer-step counter (L558), once per batch however many `--batch_chunk` pieces its gradient is accumulated over.
The model reaches the step through a counter in 'routing_state' (`.../router/step`) that each router increments in
`apply(..., mutable=['routing_state'])` with `deterministic=False`, so the engine needs no hook: the counter counts
forward passes in training, i.e. micro-batches when gradients are accumulated, and the optimizer step is
`counter // grad_accum_steps` (`grad_accum_steps` = `config.train.grad_accum_steps`, linked by the config). Counting
forward passes instead would grow k `grad_accum_steps` times too fast. Routing is always computed for k_max experts
and the slots past k are emptied (`zoo.routing.sparsity.truncate_routing`), so a changing k does not recompile; the
capacity buffers are sized for k_max.

Everything else is `moe_lm`'s expert layers and shared experts (decoder blocks, dispatch, metrics [moe_layers, ...]
plus 'active_k'); its router keys do not apply (the router is fixed). The router is frozen, so the balance and z
losses default to 0 (they would only push on the hidden states).
"""

import flax.linen as nn
import jax.numpy as jnp

from zoo.models.decoder_parts import ExpertLayers, RouterLossWeights, SharedExperts, routed_ffn_factory
from zoo.models.dense_lm import DenseLM
from zoo.models.registry import ConfigError, check_config, register_model
from zoo.routing import Router
from zoo.routing.sparsity import K_SCHEDULES, expert_count_schedule, truncate_routing


class ScheduledRouter(Router):
  """A frozen random top-k_max router whose active k follows the step counter in 'routing_state' (Sec. 3.2).

  Attributes (besides `Router`'s; `num_experts_per_tok` is k_max):
    k_min: k at step 0.
    k_schedule: one of `zoo.routing.sparsity.K_SCHEDULES`.
    k_schedule_steps: the schedule's length T in optimizer steps.
    eval_k: k when `deterministic=True` (0 = k_max).
    grad_accum_steps: training forward passes per optimizer step (the counter is divided by it).
  """

  k_min: int = 1
  k_schedule: str = "linear"
  k_schedule_steps: int = 1000
  eval_k: int = 0
  grad_accum_steps: int = 1

  @nn.compact
  def __call__(self, x, *, deterministic=True):
    """x: [..., embed] -> Routing over the flattened tokens with k active slots of num_experts_per_tok."""
    routing = super().__call__(x, deterministic=deterministic)
    step = self.variable("routing_state", "step", lambda: jnp.zeros((), jnp.int32))
    if deterministic:
      k = self.eval_k or self.num_experts_per_tok
    else:
      optimizer_step = step.value // self.grad_accum_steps
      k = expert_count_schedule(
        optimizer_step, self.k_schedule_steps, self.k_min, self.num_experts_per_tok, self.k_schedule
      )
      if self.is_mutable_collection("routing_state"):
        step.value = step.value + 1
    return truncate_routing(routing, k)


@register_model("smoe_dropout")
class SMoEDropoutLM(ExpertLayers, RouterLossWeights, SharedExperts, DenseLM):
  """`moe_lm`'s expert layers with SMoE-Dropout routing (see the module docstring).

  Attributes (besides those of `DenseLM`, `ExpertLayers`, `RouterLossWeights` and `SharedExperts`):
    num_experts_per_tok: k_max, the experts per token at the end of the schedule.
    router_jitter: half-width of the multiplicative router-input noise in training (0 = off).
    k_min: active experts at the start of training.
    k_schedule: 'linear' (paper) | 'cosine' | 'exponential' | 'step' (the authors' other schedules) | 'constant'.
    k_schedule_steps: the schedule's length T in optimizer steps (set it to the training steps).
    eval_k: experts per token at evaluation (0 = k_max); any value in 1..k_max.
    grad_accum_steps: forward passes per optimizer step, `config.train.grad_accum_steps` (the shipped configs link
      the two), so that k follows the optimizer step.
  """

  num_experts_per_tok: int = 2
  router_jitter: float = 0.0
  load_balance_coef: float = 0.0
  z_loss_coef: float = 0.0
  k_min: int = 1
  k_schedule: str = "linear"
  k_schedule_steps: int = 1000
  eval_k: int = 0
  grad_accum_steps: int = 1

  def __post_init__(self):
    check_config(
      self,
      positive=("k_schedule_steps", "grad_accum_steps"),
      non_negative=("router_jitter",),
      choices={"k_schedule": K_SCHEDULES},
    )
    if not 1 <= self.num_experts_per_tok <= self.num_experts:
      raise ConfigError(
        f"config.model.num_experts_per_tok={self.num_experts_per_tok} is invalid; allowed "
        f"1..num_experts={self.num_experts}"
      )
    if not 1 <= self.k_min <= self.num_experts_per_tok:
      raise ConfigError(
        f"config.model.k_min={self.k_min} is invalid; allowed 1..num_experts_per_tok={self.num_experts_per_tok} (k_max)"
      )
    if not 0 <= self.eval_k <= self.num_experts_per_tok:
      raise ConfigError(
        f"config.model.eval_k={self.eval_k} is invalid; allowed 0 (= k_max) or 1..num_experts_per_tok="
        f"{self.num_experts_per_tok}"
      )
    super().__post_init__()

  def make_router(self):
    """This layer's frozen `ScheduledRouter` (unbound; the MoE FFN adopts it as its child 'router')."""
    return ScheduledRouter(
      parent=None,
      num_experts=self.num_experts,
      num_experts_per_tok=self.num_experts_per_tok,
      score="softmax",
      frozen=True,
      jitter_eps=self.router_jitter,
      k_min=self.k_min,
      k_schedule=self.k_schedule,
      k_schedule_steps=self.k_schedule_steps,
      eval_k=self.eval_k,
      grad_accum_steps=self.grad_accum_steps,
    )

  def moe_ffn_factory(self):
    """Builds the MoE FFN of one layer (`name=` is given by `DecoderBlock`); each call gets its own router."""
    return routed_ffn_factory(self, **self.shared_ffn_kwargs())

  @nn.compact
  def __call__(self, tokens, *, positions=None, cache=None, deterministic=True):
    """As `MoELM.__call__`: (logits [batch, length, vocab_size] float32, ModelOutput(aux_loss, metrics, cache))."""
    return self.expert_forward(tokens, positions, cache, deterministic, aux_coefs=self.aux_coefs())

  def moe_ffn_params(self):
    """Parameters of one MoE layer's FFN: routed and shared experts (the frozen router is in 'routing_state')."""
    return self.expert_ffn_params() + self.shared_params()
