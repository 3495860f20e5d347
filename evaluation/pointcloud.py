"""Point-cloud metrics of shape generation, as PointFlow (Yang et al. 2019) and LION (Zeng et al.
2022) define them, between a generated set (N, P, 3) and a reference set (M, P, 3) of shapes.

Distances between two clouds x, y of P points each:
- Chamfer distance (CD), PointFlow's convention: squared Euclidean distances, the sum of the two
  means, mean_i min_j |x_i - y_j|^2 + mean_j min_i |x_i - y_j|^2 (not halved, not square-rooted);
- earth mover's distance (EMD): the mean Euclidean distance |x_i - y_s(i)| under the bijection s
  that minimises it. Exact (scipy's linear_sum_assignment) up to EXACT_EMD_MAX_POINTS points;
  above, by default, approximate: the exact EMD between reductions of both clouds to
  EMD_REDUCED_POINTS points, each the mean of the points of one cell of a balanced k-d tree
  (cells of P // 512 points; 4 at 2048). Exact matching at 2048 points costs about a second a
  pair on a CPU core, and the 50 x 50 sets need about 5000 pairs. The reduction errs upwards,
  the most for near-identical shapes, whose EMD is smallest: on surface samples of boxes, spheres
  and cylinders at 2048 points it was 1-6% above the exact EMD between different primitives and
  11-22% above it between two samplings of one (see `emd_matrix`).

Metrics from the matrices D[g, r] (generated x reference), for either distance:
- COV: the fraction of reference shapes that are the nearest reference of some generated shape;
- MMD: the mean, over reference shapes, of the distance to the nearest generated shape;
- 1-NNA: the accuracy of the leave-one-out 1-nearest-neighbour classifier that labels each shape
  of the union of both sets by its nearest other shape. 50% when the sets are indistinguishable;
  100% when they are apart; below 50% when generated shapes copy reference ones (a copy's nearest
  neighbour is its original: two identical sets give 0%).

COV and 1-NNA are fractions in [0, 1]; CD is in squared units of the points, EMD in their units.
"""
from __future__ import annotations

import numpy as np
from scipy.optimize import linear_sum_assignment
from scipy.spatial import cKDTree
from scipy.spatial.distance import cdist

DISTANCES = ("cd", "emd")
EXACT_EMD_MAX_POINTS = 512
EMD_REDUCED_POINTS = 512
EMD_METHODS = ("auto", "exact", "reduced")


def normalise_box(points_NP3: np.ndarray) -> np.ndarray:
    """(N, P, 3) -> each shape's bounding-box centre moved to the origin and its largest
    half-extent scaled to 1, so that shapes are compared whatever their size and position.
    Papers' numbers may use other normalisations (PointFlow: the dataset's); compare like with like."""
    p = np.asarray(points_NP3, np.float64)
    lo, hi = p.min(1, keepdims=True), p.max(1, keepdims=True)
    half = ((hi - lo).max(-1, keepdims=True) / 2).clip(min=1e-12)
    return (p - (lo + hi) / 2) / half


def _check_sets(a, b) -> tuple:
    a = np.asarray(a, np.float64)
    b = a if b is None else np.asarray(b, np.float64)
    for name, s in (("first", a), ("second", b)):
        if s.ndim != 3 or s.shape[-1] != 3 or not len(s) or not s.shape[1]:
            raise ValueError(f"the {name} set of shapes should be (N, P, 3) with N, P >= 1, got {s.shape}")
        if not np.isfinite(s).all():
            raise ValueError(f"the {name} set of shapes holds NaN or infinite coordinates")
    return a, b


def chamfer_matrix(a_NP3: np.ndarray, b_MP3: np.ndarray | None = None, workers: int = 1) -> np.ndarray:
    """Chamfer distances (PointFlow's: squared, sum of the two means) between every shape of a and
    every shape of b, (N, M) float64; b None: a against itself (symmetric, zero diagonal).

    Exact nearest neighbours by k-d trees built once per shape: on a CPU an order of magnitude
    faster than dense (P, P) distance matrices at 2048 points. `workers`: threads per query
    (-1: all cores)."""
    a, b = _check_sets(a_NP3, b_MP3)
    same = b_MP3 is None
    trees_a = [cKDTree(x) for x in a]
    trees_b = trees_a if same else [cKDTree(y) for y in b]
    out = np.zeros((len(a), len(b)))
    for i, x in enumerate(a):
        for j in range(i + 1 if same else 0, len(b)):
            d_xy = trees_b[j].query(x, workers=workers)[0]
            d_yx = trees_a[i].query(b[j], workers=workers)[0]
            out[i, j] = np.mean(d_xy ** 2) + np.mean(d_yx ** 2)
    return out + out.T if same else out


def emd_exact(x_P3: np.ndarray, y_P3: np.ndarray) -> float:
    """Mean Euclidean distance under the optimal bijection between two clouds of P points each."""
    if len(x_P3) != len(y_P3):
        raise ValueError(f"EMD needs clouds of one size, got {len(x_P3)} and {len(y_P3)} points")
    cost = cdist(x_P3, y_P3)
    rows, cols = linear_sum_assignment(cost)
    return float(cost[rows, cols].mean())


def reduce_cloud(x_P3: np.ndarray, m: int, rng: np.random.Generator) -> np.ndarray:
    """(m, 3): the means of the points of the m cells of a balanced k-d tree (each split at the
    median of the cell's longest side), g = P // m points a cell; when m does not divide P, a
    random subset of m * g points is reduced. g = 1 is the subset itself."""
    n = len(x_P3)
    if not 1 <= m <= n:
        raise ValueError(f"cannot reduce {n} points to {m}")
    g = n // m
    x = x_P3 if n == m * g else x_P3[np.sort(rng.choice(n, m * g, replace=False))]
    if g == 1:
        return np.array(x, np.float64)
    out, cells = [], [np.arange(m * g)]
    while cells:
        idx = cells.pop()
        if len(idx) == g:
            out.append(x[idx].mean(0))
            continue
        p = x[idx]
        order = idx[np.argsort(p[:, np.ptp(p, 0).argmax()], kind="stable")]
        half = len(idx) // g // 2 * g               # whole cells on either side
        cells += [order[half:], order[:half]]
    return np.array(out)


def emd_method(num_points: int, method: str = "auto") -> str:
    """'exact' or 'reduced' for clouds of num_points under `method` (auto: exact up to
    EXACT_EMD_MAX_POINTS points)."""
    if method not in EMD_METHODS:
        raise ValueError(f"EMD method {method!r}: use one of {', '.join(EMD_METHODS)}")
    if method == "auto":
        return "exact" if num_points <= EXACT_EMD_MAX_POINTS else "reduced"
    return method


def describe_emd(num_points: int, method: str = "auto", reduced_points: int = EMD_REDUCED_POINTS) -> str:
    """The line that results carry to say which EMD was computed."""
    if emd_method(num_points, method) == "exact" or reduced_points >= num_points:
        return f"exact ({num_points} points)"
    return (f"approximate: exact EMD between {reduced_points}-point reductions (means of "
            f"{num_points // reduced_points}-point k-d tree cells) of the {num_points}-point clouds")


def _emd_rows(job) -> list:
    rows, a, b, same = job
    return [[emd_exact(a[i], b[j]) if not same or j > i else 0.0 for j in range(len(b))] for i in rows]


def emd_matrix(a_NP3: np.ndarray, b_MP3: np.ndarray | None = None, method: str = "auto",
               reduced_points: int = EMD_REDUCED_POINTS, workers: int = 1, seed: int = 0) -> np.ndarray:
    """EMD between every shape of a and every shape of b, (N, M) float64; b None: a against
    itself (symmetric, zero diagonal). method: 'exact', 'reduced' (exact between
    `reduced_points`-point reductions, `reduce_cloud`) or 'auto' (exact up to
    EXACT_EMD_MAX_POINTS points). `workers` > 1 shares the rows among processes.

    Accuracy of 'reduced' (2048 points to 512), on surface samples of boxes, spheres and
    cylinders of random proportions, each normalised to [-1, 1] (12 pairs of each kind): between
    different primitives 1-6% above the exact EMD (0.16-0.42), between two samplings of one shape
    11-22% above it (0.07-0.12). A pair then takes about 40 ms instead of about a second."""
    a, b = _check_sets(a_NP3, b_MP3)
    same = b_MP3 is None
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"EMD needs clouds of one size, got {a.shape[1]} and {b.shape[1]} points")
    if emd_method(a.shape[1], method) == "reduced" and reduced_points < a.shape[1]:
        rng = np.random.default_rng(seed)
        a = np.stack([reduce_cloud(x, reduced_points, rng) for x in a])
        b = a if same else np.stack([reduce_cloud(y, reduced_points, rng) for y in b])
    chunks = np.array_split(np.arange(len(a)), max(1, min(len(a), 4 * workers)))
    jobs = [(rows, a, b, same) for rows in chunks if len(rows)]
    if workers > 1:
        from concurrent.futures import ProcessPoolExecutor
        from multiprocessing import get_context
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:   # no fork of a threaded parent
            parts = list(pool.map(_emd_rows, jobs))
    else:
        parts = [_emd_rows(job) for job in jobs]
    out = np.array([row for part in parts for row in part], np.float64)
    return out + out.T if same else out


def coverage(d_GR: np.ndarray) -> float:
    """COV: the fraction of reference shapes (columns) that are the nearest one of a generated
    shape (row)."""
    d = np.asarray(d_GR)
    return float(len(np.unique(d.argmin(1))) / d.shape[1])


def minimum_matching_distance(d_GR: np.ndarray) -> float:
    """MMD: the mean over reference shapes (columns) of the distance to the nearest generated one."""
    return float(np.asarray(d_GR).min(0).mean())


def one_nn_accuracy(d_GG: np.ndarray, d_GR: np.ndarray, d_RR: np.ndarray) -> float:
    """1-NNA: leave-one-out 1-NN classification accuracy over the union of both sets, from the
    generated-generated (N, N), generated-reference (N, M) and reference-reference (M, M)
    distances. A tie goes to the reference set's shape."""
    d_GG, d_GR, d_RR = (np.array(d, np.float64) for d in (d_GG, d_GR, d_RR))
    n, m = d_GR.shape
    if d_GG.shape != (n, n) or d_RR.shape != (m, m):
        raise ValueError(f"1-NNA: matrices of shapes {d_GG.shape}, {d_GR.shape}, {d_RR.shape} do not fit")
    full = np.block([[d_RR, d_GR.T], [d_GR, d_GG]])         # reference shapes first
    np.fill_diagonal(full, np.inf)
    label = np.r_[np.ones(m, bool), np.zeros(n, bool)]
    return float((label[full.argmin(1)] == label).mean())


def set_metrics(d_GG: np.ndarray, d_GR: np.ndarray, d_RR: np.ndarray) -> dict:
    """{cov, mmd, 1nna} from one distance's three matrices."""
    return {"cov": coverage(d_GR), "mmd": minimum_matching_distance(d_GR), "1nna": one_nn_accuracy(d_GG, d_GR, d_RR)}


def generation_metrics(generated_NP3: np.ndarray, reference_MP3: np.ndarray, distances=DISTANCES,
                       emd: str = "auto", reduced_points: int = EMD_REDUCED_POINTS, workers: int = 1,
                       seed: int = 0) -> dict:
    """COV, MMD and 1-NNA of a generated set against a reference set under each of `distances`
    ('cd', 'emd') -> {"cov_cd", "mmd_cd", "1nna_cd", "cov_emd", ..., "emd": how EMD was computed}.
    The clouds are used as given (see `normalise_box`)."""
    unknown = set(distances) - set(DISTANCES)
    if unknown or not distances:
        raise ValueError(f"distances {sorted(unknown) or '(none)'}: use {' and/or '.join(DISTANCES)}")
    gen, ref = _check_sets(generated_NP3, reference_MP3)
    out = {}
    for name in distances:
        if name == "cd":
            pair = lambda x, y=None: chamfer_matrix(x, y, workers=workers)
        else:
            pair = lambda x, y=None: emd_matrix(x, y, emd, reduced_points, workers, seed)
            out["emd"] = describe_emd(gen.shape[1], emd, reduced_points)
        scores = set_metrics(pair(gen), pair(gen, ref), pair(ref))
        out.update({f"{k}_{name}": v for k, v in scores.items()})
    return out
