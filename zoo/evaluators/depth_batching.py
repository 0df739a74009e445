"""Decoding throughput of validation prompts served by continuous depth-wise batching (`zoo.engine.mor_batching`,
papers.md A1, Sec. 2.1), for Mixture-of-Recursions (cycle / middle-cycle sharing) and the vanilla dense LM.

Options (`config.depth_batching`, every key optional; the defaults are `DEFAULTS`): `requests` prompts cut from
validation rows at lengths drawn in [`prompt_min`, `prompt_max`] (capped at the rows' length; rows are reused when
there are fewer than `requests`), `new_tokens` greedy tokens each (no stop at EOS, so every model generates the same
tokens), engine steps of `batch_size` jobs over `num_slots` sequence slots (0 = 2 x batch_size). The requests are
served twice: the first run compiles every step shape, the second is timed.

Reports tokens/s of the whole run and, apart, of the prefill calls (prompt tokens) and of decoding (the tokens of the
engine steps), the batch fill of block and boundary steps, slot reuses (admissions into a freed slot), the decoded
tokens that left the recursion after each depth, and a PNG of the slot occupancy per depth over the engine steps.
"""

import os

import jax
import numpy as np

from zoo.evaluators.base import Evaluator, pyplot, register_evaluator, save_figure
from zoo.models import ConfigError

DEFAULTS = {
  "requests": 32,
  "new_tokens": 32,
  "batch_size": 8,
  "num_slots": 0,  # 0 = 2 x batch_size
  "prompt_min": 8,
  "prompt_max": 48,
}


def plot_occupancy(panels, path, batch):
  """Saves a PNG with one panel per run: the sequences at each depth (pending or running) and at the boundary per
  engine step, a stacked area plot, with the batch size as a dashed line.

  Args:
    panels: a list of (label, `EngineStats`) pairs.
    path: output .png path (its folder is created).
    batch: the batch size (jobs per engine step) of the runs.

  Returns:
    path.
  """
  plt = pyplot()
  fig, axes = plt.subplots(len(panels), 1, figsize=(9, 2.4 * len(panels)), squeeze=False)
  for ax, (label, stats) in zip(axes[:, 0], panels):
    occ = stats.occupancy
    names = [f"depth {r}" for r in range(occ.shape[1] - 1)] + ["boundary (coda + prelude)"]
    ax.stackplot(np.arange(len(occ)), occ.T, labels=names, alpha=0.8)
    ax.axhline(batch, color="k", lw=0.8, ls="--", label=f"batch {batch}")
    ax.set_title(f"{label}: sequences in flight by stage, batch {batch}, {stats.num_slots} slots", fontsize=9)
    ax.set_ylabel("sequences")
    ax.legend(fontsize=7, loc="upper right", ncol=2)
  axes[-1, 0].set_xlabel("engine step")
  fig.tight_layout()
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  return save_figure(fig, path, dpi=110)


def options(config):
  """`config.depth_batching` over `DEFAULTS`, checked.

  Raises:
    ConfigError: an unknown key or a bad value, named.
  """
  given = config.get("depth_batching") or {}
  unknown = sorted(set(given.keys()) - set(DEFAULTS))
  if unknown:
    raise ConfigError(f"unknown key config.depth_batching.{unknown[0]}; valid keys: {sorted(DEFAULTS)}")
  o = {**DEFAULTS, **{k: int(v) for k, v in given.items()}}
  for key in ("requests", "new_tokens", "batch_size", "prompt_min"):
    if o[key] < 1:
      raise ConfigError(f"config.depth_batching.{key}={o[key]} is invalid; allowed: >= 1")
  if o["num_slots"] < 0:
    raise ConfigError(f"config.depth_batching.num_slots={o['num_slots']} is invalid; allowed: >= 0 (0 = 2 x batch)")
  if o["prompt_max"] < o["prompt_min"]:
    raise ConfigError(
      f"config.depth_batching.prompt_max={o['prompt_max']} is invalid; allowed: >= prompt_min={o['prompt_min']}"
    )
  return o


def validation_prompts(ctx, lengths):
  """Prompts of `lengths` tokens cut from the validation rows (reused in turn when there are fewer rows), each at
  most its row's real tokens long."""
  rows = []
  for batch in ctx.batches(max(1, len(lengths))):
    keep = np.asarray(batch["weight"]) > 0
    real = np.asarray(batch["mask"]).sum(-1) if "mask" in batch else np.full(len(keep), batch["inputs"].shape[1])
    rows += [(np.asarray(row), int(n)) for row, n, k in zip(batch["inputs"], real, keep) if k and n > 0]
    if len(rows) >= len(lengths):
      break
  if not rows:
    raise ValueError(f"split {ctx.config.data.eval_split!r} has no validation rows to cut prompts from")
  return [rows[i % len(rows)][0][: min(n, rows[i % len(rows)][1])].astype(np.int32) for i, n in enumerate(lengths)]


@register_evaluator("depth_batching")
class DepthBatching(Evaluator):
  """{'depth_batching_tokens_per_s', ..._prefill_tokens_per_s, ..._decode_tokens_per_s, ..._block_fill,
  ..._boundary_fill, ..._slot_reuses, ..._requests_served, ..._tokens_per_depth (a list: the tokens the engine steps
  decoded, all but each request's first, by the recursions they ran, 0..N_r), ..._plot (the PNG), ...}; see the
  module docstring."""

  tasks = ("lm",)
  by_default = False  # a timed decoding run: only when config.evals names it

  @classmethod
  def unmet(cls, model, task_name):
    from zoo.engine.mor_batching import make_stages  # pylint: disable=g-import-not-at-top

    why = super().unmet(model, task_name)
    if why is None:
      try:
        make_stages(model)
      except ValueError as e:
        return str(e)
    return why

  def __call__(self, ctx):
    from zoo.engine.mor_batching import DepthBatchingEngine  # pylint: disable=g-import-not-at-top

    o = options(ctx.config)
    rng = np.random.default_rng(int(ctx.config.seed))
    top = max(o["prompt_min"], min(o["prompt_max"], int(ctx.config.data.seq_len)))
    lengths = rng.integers(o["prompt_min"], top + 1, size=o["requests"])
    prompts = validation_prompts(ctx, lengths)
    model = ctx.exp.model
    engine = DepthBatchingEngine(
      model,
      jax.device_get(ctx.state.variables()),
      batch_size=o["batch_size"],
      num_slots=o["num_slots"] or None,
      max_length=max(len(p) for p in prompts) + o["new_tokens"],
    )
    engine.run(prompts, o["new_tokens"])  # compiles every shape of the timed run
    outputs, stats = engine.run(prompts, o["new_tokens"])
    counts = stats.depth_counts
    path = ctx.path("depth_batching_occupancy.png")
    label = type(model).__name__ + (f", router {model.router}, KV {model.kv_mode}" if hasattr(model, "router") else "")
    plot_occupancy([(label, stats)], path, o["batch_size"])
    p = "depth_batching_"
    return {
      p + "tokens_per_s": stats.tokens_per_s(),
      p + "prefill_tokens_per_s": stats.prefill_tokens_per_s(),
      p + "decode_tokens_per_s": stats.decode_tokens_per_s(),
      p + "prefill_seconds": stats.prefill_seconds,
      p + "decode_seconds": stats.decode_seconds,
      p + "requests_served": sum(len(out) == o["new_tokens"] for out in outputs),
      p + "generated_tokens": stats.generated_tokens,
      p + "prompt_tokens": stats.prompt_tokens,
      p + "block_fill": stats.fill("block"),
      p + "boundary_fill": stats.fill("boundary"),
      p + "block_steps": stats.steps["block"],
      p + "boundary_steps": stats.steps["boundary"],
      p + "mixed_depth_steps": stats.mixed_depth_steps,
      p + "read_only_block_steps": stats.read_only_block_steps,
      p + "slot_reuses": stats.slot_reuses,
      p + "num_slots": stats.num_slots,
      p + "tokens_per_depth": [int(c) for c in counts],
      p + "recursions_per_token": float(np.dot(np.arange(len(counts)), counts) / max(1, counts.sum())),
      p + "plot": path,
    }
