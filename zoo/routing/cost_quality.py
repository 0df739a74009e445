"""Cost-quality metrics of routers between models (`papers.md` C5) and their plot.

Pure functions over a router's curve: the (mean cost, mean quality) points it reaches over its knob.

- PGR, APGR and CPT (RouteLLM, Ong et al. 2024). PGR(r) = (q(r) - q_weak) / (q_strong - q_weak).
  RouteLLM integrates PGR over the percentage of calls to the strong model; with measured costs and more than two
  members the x axis is the cost, normalised as x = (c - c_weak) / (c_strong - c_weak) (so the random router between
  the weak and the strong member scores APGR 0.5, as in RouteLLM). The curve is the router's points sorted by cost,
  joined by straight lines (at equal cost the better point), starting from the weak member (x = 0, PGR = 0: always
  reachable without routing [guess]) and flat right of its last point; the area is taken over x in [0, 1].
  CPT(p) = the cost, as a fraction of the strong member's, at which that curve first reaches PGR >= p (nan: never).
- AIQ (RouterBench, Hu et al. 2024): the area under the non-decreasing convex hull of the points (the upper concave
  hull, flat after its best point) over a cost range, divided by the range's width; the range is [c_weak, c_strong]
  unless given. The hull is what mixing knobs at random can reach.

`category_table` gives the share of each category's queries that each member receives. `plot_cost_quality` draws
every router's curve with the members as points (matplotlib, Agg).
"""

from __future__ import annotations

import numpy as np

from zoo.evaluators.base import pyplot, save_figure


def pgr(quality, weak_quality, strong_quality):
  """Performance gap recovered: (quality - weak) / (strong - weak); elementwise on arrays."""
  gap = strong_quality - weak_quality
  if gap == 0:
    raise ValueError(f"pgr: the strong and the weak member have the same quality {strong_quality}; no gap to recover")
  return (np.asarray(quality, np.float64) - weak_quality) / gap


def _pgr_curve(costs, qualities, weak, strong):
  """x [N+1] ascending (normalised cost, with the weak member's 0 first) and PGR [N+1]; at equal x the best PGR."""
  (cw, qw), (cs, qs) = weak, strong
  if cs <= cw:
    raise ValueError(f"the strong member's cost {cs} must exceed the weak member's {cw}")
  x = np.concatenate([[0.0], (np.asarray(costs, np.float64) - cw) / (cs - cw)])
  y = np.concatenate([[0.0], pgr(qualities, qw, qs)])
  order = np.lexsort((-y, x))
  x, y = x[order], y[order]
  keep = np.concatenate([[True], np.diff(x) > 0])  # the first of equal x is the best
  return x[keep], y[keep]


def apgr(costs, qualities, *, weak, strong):
  """Average performance gap recovered over normalised cost [0, 1] (see the module docstring).

  Args:
    costs, qualities: float [N], the router's points.
    weak, strong: (cost, quality) of the cheapest and of the strongest member.
  """
  x, y = _pgr_curve(costs, qualities, weak, strong)
  grid = np.unique(np.concatenate([[0.0, 1.0], x[(x > 0) & (x < 1)]]))
  values = np.interp(grid, x, y)  # flat right of the last point
  return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)))


def cpt(costs, qualities, target, *, weak, strong):
  """Call-performance threshold generalised to cost: the cost (a fraction of the strong member's) where the curve
  first reaches PGR >= target; nan when it never does.

  Args:
    target: the PGR to reach, e.g. 0.5 for CPT(50%).
  """
  x, y = _pgr_curve(costs, qualities, weak, strong)
  (cw, _), (cs, _) = weak, strong
  hit = np.flatnonzero(y >= target)
  if hit.size == 0:
    return float("nan")
  k = int(hit[0])
  if k == 0:
    at = x[0]
  else:  # the crossing on the segment from point k-1 (below target) to point k
    at = x[k - 1] + (target - y[k - 1]) / (y[k] - y[k - 1]) * (x[k] - x[k - 1])
  return float((cw + at * (cs - cw)) / cs)


def upper_hull(costs, qualities):
  """The non-decreasing convex hull's vertices: (cost [H], quality [H]) ascending in cost, ending at the best point."""
  pts = sorted(set(zip(np.asarray(costs, np.float64).tolist(), np.asarray(qualities, np.float64).tolist())))
  hull = []
  for p in pts:  # Andrew's monotone chain, upper half
    while len(hull) >= 2:
      (x1, y1), (x2, y2) = hull[-2], hull[-1]
      if (x2 - x1) * (p[1] - y1) - (y2 - y1) * (p[0] - x1) >= 0:  # hull[-1] lies on or below the chord
        hull.pop()
      else:
        break
    hull.append(p)
  hull = np.asarray(hull)
  best = int(np.argmax(hull[:, 1]))
  return hull[: best + 1, 0], hull[: best + 1, 1]


def aiq(costs, qualities, *, cost_range=None, anchor=None):
  """Average improvement in quality: area under the non-decreasing convex hull over `cost_range`, per unit cost.

  Args:
    costs, qualities: float [N], the router's points.
    cost_range: (low, high); default: the points' own range (with the anchor).
    anchor: an extra (cost, quality) point always reachable (e.g. the cheapest member), or None.

  Raises:
    ValueError: an empty or reversed range, or a range starting below every point.
  """
  costs, qualities = np.asarray(costs, np.float64), np.asarray(qualities, np.float64)
  if anchor is not None:
    costs, qualities = np.append(costs, anchor[0]), np.append(qualities, anchor[1])
  low, high = (costs.min(), costs.max()) if cost_range is None else cost_range
  if not high > low:
    raise ValueError(f"aiq: cost range ({low}, {high}) must have high > low")
  hx, hy = upper_hull(costs, qualities)
  if low < hx[0] - 1e-12 * max(1.0, abs(hx[0])):
    raise ValueError(f"aiq: the cost range starts at {low}, below the cheapest point {hx[0]}; pass an anchor there")
  grid = np.unique(np.concatenate([[low, high], hx[(hx > low) & (hx < high)]]))
  values = np.interp(grid, hx, hy)  # flat right of the best point
  return float(np.sum((values[1:] + values[:-1]) / 2 * np.diff(grid)) / (high - low))


def category_table(choice, category, num_members, num_categories):
  """float [categories, members]: the share of each category's queries routed to each member (rows of empty
  categories are 0)."""
  counts = np.zeros((num_categories, num_members))
  np.add.at(counts, (np.asarray(category), np.asarray(choice)), 1.0)
  return counts / np.maximum(counts.sum(axis=1, keepdims=True), 1.0)


def plot_cost_quality(curves, members, path, *, xlabel="cost per query", ylabel="quality", budgets=()):
  """Cost-quality curves of several routers on one axis, the members as labelled points.

  Args:
    curves: {router name: (costs [N], qualities [N])}.
    members: {member name: (cost, quality)}.
    path: the PNG to write.
    budgets: costs drawn as vertical dotted lines.

  Returns:
    path.
  """
  plt = pyplot()
  fig, ax = plt.subplots(figsize=(7, 5))
  for name, (c, q) in curves.items():
    order = np.argsort(c, kind="stable")
    ax.plot(np.asarray(c)[order], np.asarray(q)[order], marker=".", markersize=3, linewidth=1.2, label=name)
  for name, (c, q) in members.items():
    ax.scatter([c], [q], s=60, marker="*", color="black", zorder=5)
    ax.annotate(name, (c, q), textcoords="offset points", xytext=(5, -10))
  for b in budgets:
    ax.axvline(b, color="grey", linestyle=":", linewidth=0.8)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=8, loc="lower right")
  fig.tight_layout()
  return save_figure(fig, path, dpi=120)
