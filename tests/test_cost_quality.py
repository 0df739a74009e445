"""Cost-quality metrics of routers between models (`zoo.routing.cost_quality`) on hand-computed curves."""

import math

import numpy as np
import pytest

from zoo.routing import cost_quality as cq

WEAK, STRONG = (1.0, 0.2), (3.0, 0.6)  # (cost, quality)


def test_pgr():
  np.testing.assert_allclose(cq.pgr(np.array([0.2, 0.4, 0.6, 0.7]), 0.2, 0.6), [0.0, 0.5, 1.0, 1.25])
  with pytest.raises(ValueError, match="same quality"):
    cq.pgr(0.3, 0.5, 0.5)


def test_apgr_of_the_straight_line_is_one_half_and_of_a_hand_curve():
  # The random router between weak and strong: PGR = x.
  assert cq.apgr([1.0, 2.0, 3.0], [0.2, 0.4, 0.6], weak=WEAK, strong=STRONG) == pytest.approx(0.5)
  # x = 0, 0.5, 1 with PGR 0, 0.75, 1: 0.5 * 0.375 + 0.5 * 0.875.
  assert cq.apgr([1.0, 2.0, 3.0], [0.2, 0.5, 0.6], weak=WEAK, strong=STRONG) == pytest.approx(0.625)
  # One point at x = 0.5 with PGR 1: the line from the weak member, then flat: 0.25 + 0.5.
  assert cq.apgr([2.0], [0.6], weak=WEAK, strong=STRONG) == pytest.approx(0.75)
  # At equal cost the better point counts; a point past the strong cost is interpolated to x = 1.
  assert cq.apgr([2.0, 2.0, 5.0], [0.3, 0.6, 0.6], weak=WEAK, strong=STRONG) == pytest.approx(0.75)


def test_cpt_finds_the_first_crossing():
  costs, qualities = [1.0, 2.0, 3.0], [0.2, 0.5, 0.6]
  # PGR 0.5 on the segment (0, 0) -> (0.5, 0.75): x = 1/3, cost 1 + 2/3 of the strong member's 3.
  assert cq.cpt(costs, qualities, 0.5, weak=WEAK, strong=STRONG) == pytest.approx((1 + 2 / 3) / 3)
  # PGR 0.8 on (0.5, 0.75) -> (1, 1): x = 0.6, cost 2.2.
  assert cq.cpt(costs, qualities, 0.8, weak=WEAK, strong=STRONG) == pytest.approx(2.2 / 3)
  assert math.isnan(cq.cpt(costs, qualities, 1.1, weak=WEAK, strong=STRONG))
  assert cq.cpt(costs, qualities, 0.0, weak=WEAK, strong=STRONG) == pytest.approx(1 / 3)


def test_aiq_is_the_area_under_the_non_decreasing_convex_hull():
  # Hull (1, .2), (2.5, .55), (3, .6); (2, .3) lies under it: (1.5 * .375 + .5 * .575) / 2.
  costs, qualities = [1.0, 2.0, 2.5, 3.0], [0.2, 0.3, 0.55, 0.6]
  assert cq.aiq(costs, qualities) == pytest.approx(0.425)
  hx, hy = cq.upper_hull(costs, qualities)
  assert hx.tolist() == [1.0, 2.5, 3.0] and hy.tolist() == [0.2, 0.55, 0.6]
  # A best point at cost 2: the hull rises to it and stays flat: (0.45 + 0.7) / 2.
  assert cq.aiq([1.0, 2.0, 3.0], [0.2, 0.7, 0.6]) == pytest.approx(0.575)
  # The anchor joins the points; the range is given.
  assert cq.aiq([2.0], [0.7], cost_range=(1.0, 3.0), anchor=(1.0, 0.2)) == pytest.approx(0.575)
  with pytest.raises(ValueError, match="below the cheapest point"):
    cq.aiq([2.0], [0.7], cost_range=(1.0, 3.0))
  with pytest.raises(ValueError, match="high > low"):
    cq.aiq([2.0], [0.7], cost_range=(3.0, 3.0))


def test_category_table_and_plot(tmp_path):
  table = cq.category_table([0, 1, 1, 2, 0], [0, 0, 1, 1, 1], num_members=3, num_categories=3)
  np.testing.assert_allclose(table, [[0.5, 0.5, 0.0], [1 / 3, 1 / 3, 1 / 3], [0.0, 0.0, 0.0]])
  path = cq.plot_cost_quality(
    {"knn": ([0.1, 0.5, 1.0], [0.2, 0.5, 0.6])}, {"small": (0.1, 0.2), "large": (1.0, 0.6)}, str(tmp_path / "c.png")
  )
  with open(path, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
