"""AdamW with gradient clipping and a learning-rate schedule."""

import jax
import optax

from zoo import sparsity
from zoo.models import ConfigError


def make_schedule(opt_config, total_steps):
  """Learning rate as a function of the step.

  'warmup_cosine': linear warmup to `lr`, then cosine decay to `lr * end_lr_fraction` at `total_steps`.
  'warmup_stable_decay': linear warmup, constant `lr`, then linear decay to 0 over the last `decay_fraction` of the
    steps (the WSD schedule of MiniCPM, Hu et al. 2024, Sec. 4).
  'constant': linear warmup, then constant `lr`.
  """
  lr, warmup = float(opt_config.lr), int(opt_config.warmup_steps)
  warmup = min(warmup, total_steps)
  name = opt_config.schedule
  if name == "warmup_cosine":
    return optax.warmup_cosine_decay_schedule(
      0.0, lr, warmup, max(total_steps, warmup + 1), end_value=lr * float(opt_config.end_lr_fraction)
    )
  warm = optax.linear_schedule(0.0, lr, warmup) if warmup else optax.constant_schedule(lr)
  if name == "constant":
    return optax.join_schedules([warm, optax.constant_schedule(lr)], [warmup])
  if name == "warmup_stable_decay":
    decay_steps = int(round(total_steps * float(opt_config.decay_fraction)))
    stable = max(total_steps - decay_steps - warmup, 0)
    return optax.join_schedules(
      [warm, optax.constant_schedule(lr), optax.linear_schedule(lr, 0.0, max(decay_steps, 1))],
      [warmup, warmup + stable],
    )
  raise ConfigError(
    f"config.optimizer.schedule={name!r} is not known; choose one of "
    "['warmup_cosine', 'warmup_stable_decay', 'constant']"
  )


def _decay_mask(params):
  """Weight decay on matrices and kernels only, not on norms' scales or biases."""
  return jax.tree.map(lambda p: p.ndim >= 2, params)


def make_optimizer(opt_config, total_steps, sparsity_config=None):
  """Returns (optax transformation, schedule). The engine applies it to the trainable parameters only
  (`zoo.engine.partition`): frozen ones have no moments, no update and no weight decay, and clipping sees only the
  trainable gradients.

  Args:
    opt_config: `config.optimizer`.
    total_steps: the training steps (for the schedule).
    sparsity_config: `config.sparsity` (None or method 'none': dense): the chain is wrapped by `zoo.sparsity.sparse`,
      so clipping and AdamW see the masked gradients.

  Raises:
    ConfigError: a `config.sparsity` value the sparse transform refuses (a block shape that does not divide a
      sparsified kernel is found when the state is initialised, and raised then).
  """
  schedule = make_schedule(opt_config, total_steps)
  parts = []
  if opt_config.grad_clip_norm > 0:
    parts.append(optax.clip_by_global_norm(float(opt_config.grad_clip_norm)))
  parts.append(
    optax.adamw(
      schedule,
      b1=float(opt_config.b1),
      b2=float(opt_config.b2),
      eps=float(opt_config.eps),
      weight_decay=float(opt_config.weight_decay),
      mask=_decay_mask,
    )
  )
  tx = optax.chain(*parts)
  try:
    tx = sparsity.from_config(tx, sparsity_config, total_steps)
  except ValueError as e:
    raise ConfigError(f"config.{e}") from None
  if (sparsity_config or {}).get("method", "none") != "none":
    init = tx.init

    def checked_init(params):
      try:
        return init(params)
      except ValueError as e:
        raise ConfigError(f"config.{e}") from None

    tx = optax.GradientTransformation(checked_init, tx.update)
  return tx, schedule
