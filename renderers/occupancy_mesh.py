"""Argus-3D mesh extraction from an occupancy field: MISE + marching cubes, as the official generation.

The occupancy network answers logits (unitless); the surface is the level set logit = tau of the
probability threshold t, tau = ln t - ln(1 - t) (t = 0.2 officially, tau ~ -1.386).

Lattice and world units. MISE works on the integer lattice 0..R of the finest level
(R = resolution_0 * 2**depth = 128 officially, so 129^3 points). Lattice point p sits at world
position box * (p / R - 0.5), box = 1 + padding = 1.1, so the lattice spans [-0.55, 0.55]^3.

MISE (multi-resolution iso-surface extraction). The coarse voxels have edge 2**depth fine
cells. Every round, each known point marks the (up to 8) leaf voxels that contain the fine
cells point + {-1, 0}^3: "next to positive" if its value >= tau, "next to negative" if
<= tau. Every leaf voxel below the finest level that is marked both ways is split into 8
children (in voxel creation order), adding those of its 27 corner/mid points (i, j, k
order, k fastest) that are new. Only one level is split per round, and rounds continue until
no point is unknown. Unknown points of the final dense grid copy their lower neighbour's
value, along x, then y, then z.

Marching cubes: the grid is padded by one layer of -1e6 (a watertight box), then PyMCubes
runs at tau rounded to float32 (its isovalue argument is a C float, as the official one's).
Its corner test already puts v == iso with the values below (below: v <= iso, inside: v > iso),
as the official library does, so nothing is negated or shifted. Its vertices are in padded
index units without the official library's half-cell offset: world = box * ((v - 1) / (n - 1) - 0.5).
"""
from __future__ import annotations

import itertools
import math
from typing import Callable

import mcubes
import numpy as np
import torch

LogitsFn = Callable[[torch.Tensor], torch.Tensor]
_CHILD = np.array(list(itertools.product(range(2), repeat=3)), np.int64)    # (8, 3)
_POINT = np.array(list(itertools.product(range(3), repeat=3)), np.int64)    # (27, 3)
_TOUCH = np.array(list(itertools.product((-1, 0), repeat=3)), np.int64)     # (8, 3)


def logit_threshold(prob: float) -> float:
    """The logit of an occupancy probability, ln(p) - ln(1 - p), in float64 (0.2 -> -1.386...)."""
    return math.log(prob) - math.log(1.0 - prob)


class MISE:
    """Octree refinement of the lattice {0..R}^3, R = resolution_0 * 2**depth (numpy).

    Points are (N, 3) integer lattice coordinates; values are float64 logits.
    """

    def __init__(self, resolution_0: int = 32, depth: int = 2, threshold: float = logit_threshold(0.2)):
        self.resolution_0, self.depth, self.threshold = resolution_0, depth, float(threshold)
        self.voxel_size_0 = 1 << depth
        self.resolution = resolution_0 * self.voxel_size_0
        n = self.resolution + 1
        self._values = np.full(n ** 3, np.nan)            # float64, by flat point index
        self._known = np.zeros(n ** 3, bool)
        self._exists = np.zeros(n ** 3, bool)
        coarse = self._lattice(resolution_0 + 1) * self.voxel_size_0
        first = self._flat(coarse)
        self._exists[first] = True
        self._order = first                                 # flat indices, insertion order
        # voxels, in creation order: origin (fine cells), level, leaf flag
        self._origin = self._lattice(resolution_0) * self.voxel_size_0
        self._level = np.zeros(resolution_0 ** 3, np.int64)
        self._leaf = np.ones(resolution_0 ** 3, bool)
        # leaf voxel owning each fine cell (R, R, R)
        ids = np.arange(resolution_0 ** 3).reshape((resolution_0,) * 3)
        for axis in range(3):
            ids = ids.repeat(self.voxel_size_0, axis=axis)
        self._cell_voxel = ids

    @staticmethod
    def _lattice(n: int) -> np.ndarray:
        """All points of {0..n-1}^3 as (n^3, 3) int64, x outermost, z innermost."""
        return np.stack(np.meshgrid(*(np.arange(n),) * 3, indexing="ij"), -1).reshape(-1, 3)

    def _flat(self, points: np.ndarray) -> np.ndarray:
        n = self.resolution + 1
        p = np.asarray(points, np.int64)
        return (p[:, 0] * n + p[:, 1]) * n + p[:, 2]

    def _unflat(self, flat: np.ndarray) -> np.ndarray:
        n = self.resolution + 1
        return np.stack([flat // (n * n), flat // n % n, flat % n], 1)

    def query(self) -> np.ndarray:
        """The unknown lattice points, (N, 3) int64, in the order they were added."""
        return self._unflat(self._order[~self._known[self._order]])

    def update(self, points: np.ndarray, values: np.ndarray) -> None:
        """Record logits `values` (N,) at lattice `points` (N, 3), then split voxels once."""
        flat = self._flat(points)
        if not self._exists[flat].all():
            raise ValueError("update() got points that MISE never asked for")
        self._values[flat] = np.asarray(values, np.float64).reshape(-1)
        self._known[flat] = True
        self._subdivide()

    def _subdivide(self) -> None:
        flat = np.flatnonzero(self._known)
        pts, vals = self._unflat(flat), self._values[flat]
        pos, neg = vals >= self.threshold, vals <= self.threshold
        next_pos = np.zeros(len(self._level), bool)
        next_neg = np.zeros(len(self._level), bool)
        for offset in _TOUCH:
            cell = pts + offset
            ok = ((cell >= 0) & (cell < self.resolution)).all(1)
            vox = self._cell_voxel[cell[ok, 0], cell[ok, 1], cell[ok, 2]]
            next_pos[vox[pos[ok]]] = True
            next_neg[vox[neg[ok]]] = True
        split = np.flatnonzero(self._leaf & (self._level < self.depth) & next_pos & next_neg)
        if split.size == 0:
            return
        origin, level = self._origin[split], self._level[split]
        half = (self.voxel_size_0 >> (level + 1))[:, None, None]          # child edge, (S, 1, 1)
        # children, 8 per split voxel in (i, j, k) order
        first_id = len(self._level)
        child_origin = (origin[:, None] + _CHILD[None] * half).reshape(-1, 3)
        child_level = np.repeat(level + 1, 8)
        child_id = first_id + np.arange(len(child_level))
        for lvl in np.unique(child_level):
            size = self.voxel_size_0 >> int(lvl)
            sel = child_level == lvl
            cells = child_origin[sel][:, None] + self._lattice(size)[None]  # (C, size^3, 3)
            self._cell_voxel[cells[..., 0], cells[..., 1], cells[..., 2]] = child_id[sel][:, None]
        self._leaf[split] = False
        self._origin = np.concatenate([self._origin, child_origin])
        self._level = np.concatenate([self._level, child_level])
        self._leaf = np.concatenate([self._leaf, np.ones(len(child_level), bool)])
        # new lattice points, 27 per split voxel, first occurrence wins
        cand = self._flat((origin[:, None] + _POINT[None] * half).reshape(-1, 3))
        cand = cand[~self._exists[cand]]
        _, first = np.unique(cand, return_index=True)
        new = cand[np.sort(first)]
        self._exists[new] = True
        self._order = np.concatenate([self._order, new])

    def to_dense(self) -> np.ndarray:
        """The (R+1)^3 float64 grid of logits; unknown points copy index-1 along x, then y, then z."""
        n = self.resolution + 1
        out = self._values.reshape(n, n, n).copy()
        for axis in range(3):
            view = np.moveaxis(out, axis, 0)
            for i in range(1, n):
                hole = np.isnan(view[i])
                view[i][hole] = view[i - 1][hole]
        return out


def _evaluate(logits_fn: LogitsFn, points: np.ndarray, resolution: int, box: float, batch: int) -> np.ndarray:
    """Logits (N,) float64 at lattice points (N, 3) of {0..resolution}^3; world = box * (p / resolution - 0.5),
    computed in float64 and given to `logits_fn` as float32, `batch` points per call."""
    world = torch.from_numpy((box * (points / resolution - 0.5)).astype(np.float32))
    with torch.no_grad():
        out = [logits_fn(chunk).reshape(-1).float().cpu() for chunk in torch.split(world, batch)]
    return torch.cat(out).numpy().astype(np.float64)


def mise_grid(logits_fn: LogitsFn, resolution_0: int = 32, upsampling_steps: int = 2,
              threshold_prob: float = 0.2, padding: float = 0.1, batch: int = 100_000):
    """MISE driven by `logits_fn(points (N, 3) float32 world) -> (N,) logits`.

    Returns (grid, rounds): grid (R+1)^3 float64 logits with R = resolution_0 * 2**upsampling_steps,
    rounds a list of the (N_j, 3) int64 lattice points queried in each round.
    """
    mise = MISE(resolution_0, upsampling_steps, logit_threshold(threshold_prob))
    rounds = []
    points = mise.query()
    while len(points):
        rounds.append(points)
        mise.update(points, _evaluate(logits_fn, points, mise.resolution, 1.0 + padding, batch))
        points = mise.query()
    return mise.to_dense(), rounds


def dense_grid(logits_fn: LogitsFn, resolution: int = 129, padding: float = 0.1, batch: int = 100_000) -> np.ndarray:
    """Logits at every point of a resolution^3 lattice spanning [-box/2, box/2]^3, (res, res, res) float64.

    Uses the same world positions as MISE with R = resolution - 1, so a fully refined MISE grid
    equals it. (The official upsampling_steps=0 path builds its points with a float32 linspace
    instead; they can differ from these in the last float32 bit.)
    """
    points = MISE._lattice(resolution)
    values = _evaluate(logits_fn, points, resolution - 1, 1.0 + padding, batch)
    return values.reshape((resolution,) * 3)


def grid_to_mesh(grid: np.ndarray, threshold_prob: float = 0.2, padding: float = 0.1):
    """Marching cubes of a logit grid (n_x, n_y, n_z) whose nodes span [-box/2, box/2]^3, box = 1 + padding.

    Returns (vertices (V, 3) float64 world units, faces (F, 3) int64), the official extract_mesh
    (padded with -1e6, iso = tau as float32, no normals, simplification or refinement).
    """
    grid = np.asarray(grid, np.float64)
    iso = float(np.float32(logit_threshold(threshold_prob)))
    padded = np.pad(grid, 1, "constant", constant_values=-1e6)
    vertices, faces = mcubes.marching_cubes(padded, iso)
    vertices = (vertices - 1.0) / (np.array(grid.shape, np.float64) - 1.0)
    vertices = (1.0 + padding) * (vertices - 0.5)
    return vertices, np.asarray(faces, np.int64)


def extract_occupancy_mesh(logits_fn: LogitsFn, resolution_0: int = 32, upsampling_steps: int = 2,
                           threshold_prob: float = 0.2, padding: float = 0.1, batch: int = 100_000):
    """The official generation's mesh: MISE grid (dense resolution_0^3 when upsampling_steps is 0)
    then grid_to_mesh. Returns (vertices (V, 3) float64 world units, faces (F, 3) int64)."""
    if upsampling_steps == 0:
        grid = dense_grid(logits_fn, resolution_0, padding, batch)
    else:
        grid, _ = mise_grid(logits_fn, resolution_0, upsampling_steps, threshold_prob, padding, batch)
    return grid_to_mesh(grid, threshold_prob, padding)
