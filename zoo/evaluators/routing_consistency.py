"""Local routing consistency (papers.md A8): SRP and SCH of the experts the model routes validation tokens to
(`zoo.routing.consistency`), and their plot. The headline figures are the whole-model ones of the authors' code
(ljcleo/moe-lrc src/31_srp_refine.py, src/41_sch_calc.py): SRP of the window counts pooled over the layers, SCH of one
cache over all layers' experts."""

import numpy as np

from zoo.evaluators.base import Evaluator, pyplot, register_evaluator, save_figure
from zoo.routing.consistency import routing_consistency

# Validation batches whose expert ids feed the metrics.
ROUTING_BATCHES = 4


def plot_routing_consistency(result, path, *, title="Local routing consistency"):
  """Saves a PNG of SRP and SCH against the segment length: SRP per layer and of the whole model (pooled counts),
  whole-model SCH per cache size (C slots per layer).

  Args:
    result: the dict of `zoo.routing.consistency.routing_consistency`.
    path: output .png path.
    title: figure title.

  Returns:
    path.
  """
  plt = pyplot()
  lengths, srp = result["segment_lengths"], np.asarray(result["srp"])
  fig, (left, right) = plt.subplots(1, 2, figsize=(9, 3.5))
  for layer, row in enumerate(srp):
    left.plot(lengths, row, marker="o", alpha=0.5, label=f"layer {layer}")
  left.plot(lengths, result["model_srp"], color="black", linewidth=2, label="whole model")
  left.set_ylabel("SRP (best F1)")
  for j, c in enumerate(result["cache_sizes"]):
    right.plot(lengths, result["model_sch"][:, j], marker="o", label=f"C={c} per layer")
  right.set_ylabel("SCH (hit rate, whole model)")
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
  """Routing consistency of the expert ids of up to `ROUTING_BATCHES` validation batches.

  Returns {'srp_L<L>': whole-model SRP (window counts pooled over the MoE layers), 'sch_L<L>_C<C>': whole-model SCH
  (one cache of C slots per MoE layer over all layers' experts), 'layer_mean_srp_L<L>' and
  'layer_mean_sch_L<L>_C<C>': the means of the per-layer values, 'routing_consistency_plot': path}.
  """

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
      out[f"srp_L{length}"] = float(result["model_srp"][j])
      out[f"layer_mean_srp_L{length}"] = float(result["srp"][:, j].mean())
      for c, size in enumerate(result["cache_sizes"]):
        out[f"sch_L{length}_C{size}"] = float(result["model_sch"][j, c])
        out[f"layer_mean_sch_L{length}_C{size}"] = float(result["sch"][:, j, c].mean())
    out["routing_consistency_plot"] = plot_routing_consistency(result, ctx.path("routing_consistency.png"))
    return out
