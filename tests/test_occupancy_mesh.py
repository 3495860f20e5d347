"""Argus-3D occupancy mesh extraction (renderers/occupancy_mesh.py) against the official MISE +
marching-cubes references (argus/refs/s1_d_mise_*.safetensors), plus a synthetic sphere."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from renderers.occupancy_mesh import (MISE, dense_grid, extract_occupancy_mesh, grid_to_mesh,
                                      logit_threshold, mise_grid)
from tests.official import OFFICIAL_DIR

REFS = OFFICIAL_DIR / "argus" / "refs"
needs_refs = pytest.mark.skipif(not (REFS / "s1_d_mise_alt_grid.safetensors").is_file(),
                                reason=f"Argus-3D references not found at {REFS}")


def _load(name: str) -> dict:
    from safetensors.numpy import load_file
    return load_file(str(REFS / f"s1_d_mise_{name}.safetensors"))


def _stats(x) -> np.ndarray:
    """[sum, abs_sum, sum_sq, min, max, sum x[i] * ((i mod 251) + 1)] of the C-order flattening."""
    x = np.asarray(x, np.float64).ravel()
    weight = np.arange(x.size) % 251 + 1
    return np.array([x.sum(), np.abs(x).sum(), (x * x).sum(), x.min(), x.max(), (x * weight).sum()])


@pytest.fixture(scope="module")
def alt():
    return _load("alt_grid")


def _grid_lookup(grid: np.ndarray):
    """A logits_fn answering from a 129^3 grid at the MISE world points (box 1.1, R = 128)."""
    def logits_fn(world: torch.Tensor) -> torch.Tensor:
        p = np.rint((world.double().numpy() / 1.1 + 0.5) * 128).astype(np.int64)
        return torch.from_numpy(grid[p[:, 0], p[:, 1], p[:, 2]])
    return logits_fn


def test_logit_threshold():
    assert logit_threshold(0.2) == np.log(0.2) - np.log(0.8)
    assert float(np.float32(logit_threshold(0.2))) == -1.3862943649291992


@needs_refs
def test_mise_rounds_and_dense_grid_match_reference(alt):
    ref = alt["alt_dense_grid"]
    grid, rounds = mise_grid(_grid_lookup(ref), threshold_prob=float(alt["alt_threshold_prob"][0]))
    counts = alt["alt_query_counts"]
    assert [len(r) for r in rounds] + [0] == counts.tolist()
    for j, points in enumerate(rounds):
        np.testing.assert_array_equal(points, alt[f"alt_query_round{j}"], err_msg=f"round {j}")
    assert grid.dtype == np.float64 and grid.shape == (129,) * 3
    assert not np.isnan(grid).any()
    np.testing.assert_array_equal(grid, ref.astype(np.float64))


@needs_refs
def test_official_threshold_round0_and_box_mesh():
    ref = _load("official")
    mise = MISE(32, 2, logit_threshold(float(ref["official_threshold_prob"][0])))
    points = mise.query()
    np.testing.assert_array_equal(points, ref["official_query_round0"])
    mise.update(points, ref["official_round0_values"].astype(np.float64))
    assert len(mise.query()) == ref["official_query_counts"][1] == 0
    grid = mise.to_dense()
    np.testing.assert_array_equal(_stats(grid), ref["official_dense_grid__stats"])
    vertices, faces = grid_to_mesh(grid, 0.2)
    assert faces.shape == tuple(ref["official_faces_shape"]) and vertices.shape == (99846, 3)
    np.testing.assert_allclose(vertices[:16], ref["official_vertices_first16"], rtol=0, atol=1e-12)
    np.testing.assert_allclose(vertices[-16:], ref["official_vertices_last16"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(faces[:16], ref["official_faces_first16"])
    np.testing.assert_array_equal(faces[-16:], ref["official_faces_last16"])
    want = ref["official_vertices__stats"]
    np.testing.assert_allclose(_stats(vertices), want, rtol=0, atol=1e-9 * want[1])


@needs_refs
def test_grid_to_mesh_matches_reference_alt_mesh(alt):
    mesh = _load("alt_mesh")
    vertices, faces = grid_to_mesh(alt["alt_dense_grid"], float(mesh["alt_threshold_prob"][0]))
    assert vertices.dtype == np.float64 and faces.dtype == np.int64
    assert vertices.shape == mesh["alt_vertices"].shape
    np.testing.assert_allclose(vertices, mesh["alt_vertices"], rtol=0, atol=1e-12)
    np.testing.assert_array_equal(faces, mesh["alt_faces"])


def test_iso_equality_counts_as_outside():
    """A node exactly at the float32 iso level groups with the nodes below it (official `v <= iso`)."""
    iso = float(np.float32(logit_threshold(0.2)))
    grid = np.full((5, 5, 5), -10.0)
    grid[2, 2, 2] = iso
    vertices, faces = grid_to_mesh(grid)
    assert len(vertices) == len(faces) == 0
    grid[2, 2, 2] = np.nextafter(iso, 1.0)
    vertices, faces = grid_to_mesh(grid)
    assert len(vertices) == 6 and len(faces) == 8
    np.testing.assert_allclose(np.abs(vertices).max(1), 0.0, atol=1e-12)   # the centre node, world 0


def test_sphere_mise_equals_dense_and_fits_radius():
    radius, slope = 0.3, 10.0                         # logit = slope * (radius - |x|)
    logits_fn = lambda world: slope * (radius - world.norm(dim=1))
    grid, rounds = mise_grid(logits_fn)
    dense = dense_grid(logits_fn, 129)
    assert len(rounds) >= 3 and sum(map(len, rounds)) < 129 ** 3 // 5
    v_mise, f_mise = grid_to_mesh(grid)
    v_dense, f_dense = grid_to_mesh(dense)
    np.testing.assert_array_equal(v_mise, v_dense)
    np.testing.assert_array_equal(f_mise, f_dense)
    v_conv, f_conv = extract_occupancy_mesh(logits_fn)
    np.testing.assert_array_equal(v_conv, v_mise)
    np.testing.assert_array_equal(f_conv, f_mise)
    iso_radius = radius - logit_threshold(0.2) / slope  # where sigmoid(logit) = 0.2
    r = np.linalg.norm(v_mise, axis=1)
    assert len(f_mise) > 10_000 and np.abs(r - iso_radius).max() < 2e-3
    # closed surface: every edge shared by exactly two faces
    edges = np.sort(f_mise[:, [0, 1, 1, 2, 2, 0]].reshape(-1, 2), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()
