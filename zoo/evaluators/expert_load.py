"""A heatmap of the expert load per layer (the model's `expert_load` metric [layers, experts], averaged over the
validation batches by the engine)."""

import numpy as np

from zoo.evaluators.base import Evaluator, pyplot, register_evaluator, save_figure


def plot_expert_load(expert_load, path, *, title="Expert load by layer"):
  """Saves a PNG heatmap of expert load, one row per layer.

  Args:
    expert_load: [layers, experts] fraction of assignments per expert (e.g. `metrics['expert_load']`).
    path: output .png path.
    title: figure title.

  Returns:
    path.
  """
  plt = pyplot()
  load = np.asarray(expert_load, dtype=np.float32)
  if load.ndim == 1:
    load = load[None]
  if load.ndim != 2:
    raise ValueError(f"expert_load must be [layers, experts], got shape {load.shape}")
  layers, experts = load.shape
  fig, ax = plt.subplots(figsize=(max(4.0, 0.25 * experts + 2), max(2.5, 0.3 * layers + 1.5)))
  image = ax.imshow(load * experts, aspect="auto", cmap="viridis", interpolation="nearest")
  fig.colorbar(image, ax=ax, label="load x experts (1 = balanced)")
  ax.set_xlabel("expert")
  ax.set_ylabel("layer")
  ax.set_title(title)
  fig.tight_layout()
  return save_figure(fig, path, dpi=100)


@register_evaluator("expert_load")
class ExpertLoad(Evaluator):
  """{'expert_load_plot': path} when the evaluation's metrics hold `expert_load`, else nothing."""

  def __call__(self, ctx):
    if "expert_load" not in ctx.results:
      return {}
    return {"expert_load_plot": plot_expert_load(ctx.results["expert_load"], ctx.path("expert_load.png"))}
