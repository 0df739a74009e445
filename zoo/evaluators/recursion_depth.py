"""The recursion depth of each token of one validation sequence, as a PNG (Mixture-of-Recursions and any model that
exposes 'depth' [B, T])."""

import math
from collections.abc import Sequence

import numpy as np

from zoo.evaluators.base import Evaluator, pyplot, register_evaluator, save_figure


def plot_depth_per_token(tokens: Sequence[str], depth, num_recursions: int, path: str, title: str = ""):
  """Saves a PNG that shows each token of a text coloured by its recursion depth.

  Args:
    tokens: the text pieces of one sequence (e.g. decoded bytes), length T.
    depth: [T] int, recursions each token ran.
    num_recursions: N_r (colour scale 0..N_r).
    path: output .png path.
    title: figure title.
  """
  import matplotlib  # pylint: disable=g-import-not-at-top

  plt = pyplot()
  depth = np.asarray(depth).reshape(-1)
  if len(tokens) != depth.shape[0]:
    raise ValueError(f"plot_depth_per_token: {len(tokens)} tokens but {depth.shape[0]} depths")
  per_row = 32
  rows = max(1, math.ceil(len(tokens) / per_row))
  fig, ax = plt.subplots(figsize=(per_row * 0.38, rows * 0.45 + 0.9))
  cmap = plt.get_cmap("viridis", num_recursions + 1)
  for i, (piece, d) in enumerate(zip(tokens, depth)):
    x, y = i % per_row, rows - 1 - i // per_row
    ax.add_patch(plt.Rectangle((x, y), 1, 1, color=cmap(int(d)), alpha=0.85))
    ax.text(
      x + 0.5,
      y + 0.5,
      repr(piece)[1:-1][:3],
      ha="center",
      va="center",
      fontsize=7,
      color="white" if d < num_recursions / 2 else "black",
    )
  ax.set_xlim(0, per_row)
  ax.set_ylim(0, rows)
  ax.set_axis_off()
  norm = matplotlib.colors.BoundaryNorm(np.arange(num_recursions + 2) - 0.5, num_recursions + 1)
  bar = fig.colorbar(
    matplotlib.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, ticks=range(num_recursions + 1), fraction=0.03
  )
  bar.set_label("recursions run")
  ax.set_title(title or "recursion depth per token")
  save_figure(fig, path, dpi=120, bbox_inches="tight")


@register_evaluator("recursion_depth")
class RecursionDepth(Evaluator):
  """{'depth_per_token_plot': path} for the first validation sequence."""

  needs = ("depth",)
  tasks = ("lm",)

  def __call__(self, ctx):
    batch = ctx.first_batch()
    depth = ctx.intermediates("depth", batch)[0]
    tok = ctx.tokenizer()
    pieces = [tok.decode([i]) for i in batch["inputs"][0]]
    path = ctx.path("depth_per_token.png")
    scale = int(getattr(ctx.exp.model, "num_recursions", np.max(depth, initial=0)))  # the colour scale's top
    plot_depth_per_token(pieces, depth, scale, path)
    return {"depth_per_token_plot": path}
