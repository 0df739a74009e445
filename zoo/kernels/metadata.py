"""Tile-visit schedule (and problem dims) shared by the TPU and GPU grouped-matmul kernels.

The rows of `lhs` are cut into m-tiles of `tm` rows. A tile that straddles a group boundary is visited once per group
it touches (each visit masks the rows of its group), the scheme of MegaBlocks (Gale et al., 2022, Sec. 5.1) as
realised by the TPU "megablox" kernels: at most `tiles_m + g - 1` visits, the grid is static and visits past
`num_tiles` do no matmul work. In the forward schedule (empty groups skipped) those trailing visits walk the m-tiles
after the last group so the kernel can zero the rows that belong to no group.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp


class GroupMetadata(NamedTuple):
  """Schedule of (group, m-tile) visits.

  Attributes:
    group_offsets: [g + 1] int32, group i owns rows [group_offsets[i], group_offsets[i+1]) (clamped to m).
    group_ids: [num_visits] int32, the group of each visit (trailing visits repeat the last real group).
    m_tile_ids: [num_visits] int32, the m-tile of each visit.
    num_tiles: [1] int32, the number of visits that compute (the rest only zero rows past the last group).
  """

  group_offsets: jax.Array
  group_ids: jax.Array
  m_tile_ids: jax.Array
  num_tiles: jax.Array


def cdiv(a: int, b: int) -> int:
  """ceil(a / b) of two ints."""
  return -(-a // b)


def gmm_dims(lhs, rhs, *, transpose_rhs=False, row_ids=None):
  """(m, k, n, g) of gmm: out [m, n] from lhs [m, k] (with row_ids [m], the token matrix [t, k] read through them) and
  rhs [g, k, n] ([g, n, k] when transpose_rhs)."""
  m = lhs.shape[0] if row_ids is None else row_ids.shape[0]
  n = rhs.shape[1] if transpose_rhs else rhs.shape[2]
  return m, lhs.shape[1], n, rhs.shape[0]


def tgmm_dims(lhs, rhs, group_sizes):
  """(m, k, n, g) of tgmm: out [g, k, n] from the row-major grouped operand lhs [m, k] (or [t, k] read through row_ids
  [m]), rhs [m, n] and group_sizes [g]."""
  return rhs.shape[0], lhs.shape[1], rhs.shape[1], group_sizes.shape[0]


def num_visits(m: int, tm: int, num_groups: int) -> int:
  """Static grid length: every tile once plus one extra visit per group boundary."""
  return cdiv(m, tm) + num_groups - 1


def make_group_metadata(group_sizes, m: int, tm: int, *, visit_empty_groups: bool) -> GroupMetadata:
  """Builds the visit schedule.

  Args:
    group_sizes: [g] int32.
    m: rows of the grouped operand.
    tm: rows per tile.
    visit_empty_groups: give every empty group one visit (tgmm must write zeros for it).

  Returns:
    GroupMetadata with num_visits(m, tm, g) visits.
  """
  g = group_sizes.shape[0]
  tiles_m = cdiv(m, tm)
  visits = num_visits(m, tm, g)
  ends = jnp.minimum(jnp.cumsum(group_sizes.astype(jnp.int32)), m)
  starts = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends[:-1]])
  offsets = jnp.concatenate([jnp.zeros((1,), jnp.int32), ends])
  first_tile = jnp.minimum(starts // tm, tiles_m - 1)
  empty = ends <= starts
  tiles = jnp.where(empty, 1 if visit_empty_groups else 0, (ends - 1) // tm - starts // tm + 1)
  num_tiles = jnp.sum(tiles)
  visit = jnp.arange(visits, dtype=jnp.int32)
  real = visit < num_tiles
  group_ids = jnp.repeat(jnp.arange(g, dtype=jnp.int32), tiles, total_repeat_length=visits)
  first_visit = jnp.cumsum(tiles) - tiles
  real_tiles = first_tile[group_ids] + visit - first_visit[group_ids]
  last = jnp.maximum(num_tiles - 1, 0)
  last_tile = jnp.where(num_tiles > 0, real_tiles[last], -1)
  group_ids = jnp.clip(jnp.where(real, group_ids, group_ids[last]), 0, g - 1)
  m_tile_ids = jnp.where(real, real_tiles, jnp.minimum(last_tile + 1 + visit - num_tiles, tiles_m - 1))
  return GroupMetadata(offsets, group_ids, m_tile_ids.astype(jnp.int32), num_tiles.reshape(1).astype(jnp.int32))


def visit_schedule(group_sizes, m: int, tm: int, *, visit_empty_groups: bool) -> tuple[GroupMetadata, int]:
  """(make_group_metadata(...), num_visits(m, tm, g)): the schedule and its static grid length."""
  meta = make_group_metadata(group_sizes, m, tm, visit_empty_groups=visit_empty_groups)
  return meta, num_visits(m, tm, group_sizes.shape[0])
