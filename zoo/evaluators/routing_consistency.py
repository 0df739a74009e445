"""Local routing consistency (papers.md A8): SRP and SCH of the experts the model routes validation tokens to
(`zoo.routing.consistency`), and their plot."""

import numpy as np

from zoo.evaluators.base import Evaluator, pyplot, register_evaluator, save_figure
from zoo.routing.consistency import routing_consistency

# Validation batches whose expert ids feed the metrics.
ROUTING_BATCHES = 4


def plot_routing_consistency(result, path, *, title="Local routing consistency"):
  """Saves a PNG of SRP and SCH against the segment length (one line per layer for SRP, per cache size for SCH).

  Args:
    result: the dict of `zoo.routing.consistency.routing_consistency`.
    path: output .png path.
    title: figure title.

  Returns:
    path.
  """
  plt = pyplot()
  lengths, srp, sch = result["segment_lengths"], np.asarray(result["srp"]), np.asarray(result["sch"])
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
  for layer, row in enumerate(srp):
    left.plot(lengths, row, marker="o", alpha=0.5, label=f"layer {layer}")
  left.plot(lengths, srp.mean(0), color="black", linewidth=2, label="mean")
  left.set_ylabel("SRP (best F1)")
  for j, c in enumerate(result["cache_sizes"]):
    right.plot(lengths, sch[:, :, j].mean(0), marker="o", label=f"C={c}")
  right.set_ylabel("SCH (hit rate, mean over layers)")
  for ax in (left, right):
    ax.set_xscale("log", base=2)
    ax.set_xlabel("segment length L")
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=7)
  fig.suptitle(title)
  fig.tight_layout()
  return save_figure(fig, path, dpi=100)


@register_evaluator("routing_consistency")
class RoutingConsistency(Evaluator):
  """{'srp_L<L>': mean over MoE layers, 'sch_L<L>_C<C>': mean over MoE layers, 'routing_consistency_plot': path}
  from the expert ids of up to `ROUTING_BATCHES` validation batches."""

  needs = ("expert_ids",)

  def __call__(self, ctx):
    ids = []
    for batch in ctx.batches(ROUTING_BATCHES):
      batch_ids = ctx.intermediates("expert_ids", batch)  # [moe_layers, B, T, k]
      ids.append(batch_ids[:, batch["weight"] > 0])  # without the padding rows
    ids = np.concatenate(ids, axis=1)
    result = routing_consistency(ids, int(getattr(ctx.exp.model, "num_experts", ids.max() + 1)))
    out = {}
    for j, length in enumerate(result["segment_lengths"]):
      out[f"srp_L{length}"] = float(result["srp"][:, j].mean())
      for c, size in enumerate(result["cache_sizes"]):
        out[f"sch_L{length}_C{size}"] = float(result["sch"][:, j, c].mean())
    out["routing_consistency_plot"] = plot_routing_consistency(result, ctx.path("routing_consistency.png"))
    return out
