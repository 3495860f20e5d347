"""The checks of scripts/eval_prompts.py on ground truth: the procedural meshes are classified
as their family, shaded palette colours as their palette entry, and held-out prompts avoid the
training captions."""
import numpy as np

from datasets.shapes import FAMILIES, PALETTE, SIZES, sample_shape
from renderers.mesh_render import sample_surface
from evaluation.shape_check import (NUM_POINTS, classify_colour, classify_family, held_out_prompts, similarity_fit,
                                  templates)
from tests.helpers import make_tiny_dataset


def test_ground_truth_meshes_are_classified_as_their_family():
    refs = templates()
    got = []
    for i in range(8, 16):                                   # one per family; random proportions, size, yaw and tilt
        shape = sample_shape(1000, i, label=FAMILIES[i % len(FAMILIES)], mc_res=48)
        mesh = shape.mesh()
        got.append(classify_family(sample_surface(mesh.verts, mesh.faces, NUM_POINTS, np.random.default_rng(i))[0], refs))
    # Matching turns about z alone, on a bounding box taken before the turn, read this cylinder as
    # a capsule and this pyramid as a cone.
    assert got == [FAMILIES[i % len(FAMILIES)] for i in range(8, 16)], got


def test_a_lump_is_placed_nowhere():
    import mcubes
    from evaluation.shape_check import MAX_DISTANCE, place_family
    g = np.linspace(-1.5, 1.5, 48)
    X, Y, Z = np.meshgrid(g, g, g, indexing="ij")
    blobs = [np.sqrt((X - a) ** 2 + (Y - b) ** 2 + (Z - c) ** 2) - r
             for a, b, c, r in ((0.5, 0, 0, 0.7), (-0.4, 0.2, 0.3, 0.6))]
    verts, faces = mcubes.marching_cubes(-np.minimum(*blobs), 0)
    pts = sample_surface(verts.astype(np.float64), faces.astype(np.int64), NUM_POINTS, np.random.default_rng(0))[0]
    refs = templates()
    nearest, distance = place_family(pts, refs, max_distance=np.inf)
    assert nearest in FAMILIES and distance > MAX_DISTANCE and classify_family(pts, refs) == "none"


def test_similarity_fit_recovers_a_known_transform():
    rng = np.random.default_rng(0)
    q, _ = np.linalg.qr(rng.normal(size=(3, 3)))
    R_true = q * np.sign(np.linalg.det(q))                 # a proper rotation
    src = rng.normal(size=(50, 3))
    R, scale, t = similarity_fit(src, 1.7 * src @ R_true.T + np.array([0.3, -0.2, 0.5]))
    np.testing.assert_allclose(R, R_true, atol=1e-10)
    np.testing.assert_allclose([scale, *t], [1.7, 0.3, -0.2, 0.5], atol=1e-10)


def test_shaded_palette_colours_keep_their_name():
    rng = np.random.default_rng(0)
    for name, rgb in PALETTE.items():
        shade = rng.uniform(0.5, 1.0, (200, 1))             # lit and shadowed vertices
        colours = np.round(np.clip(np.array(rgb) * shade, 0, 1) * 255).astype(np.uint8)
        assert classify_colour(colours) == name


def test_held_out_prompts_skip_training_captions(tmp_path):
    data = make_tiny_dataset(tmp_path / "data", num=8, seed=3)
    train_caption = (data / "sphere" / "000000" / "caption_3dtopia.txt").read_text().strip()
    # Same seed as the training set: its captions are drawn again, and skipped.
    prompts = held_out_prompts(16, 3, data)
    assert len(prompts) == 16 and train_caption not in [p for p, _, _ in prompts]
    assert [f for _, f, _ in prompts[:8]] == list(FAMILIES)
    assert all(p.split()[-1] == f and c in p for p, f, c in prompts)
    assert len({p for p, _, _ in prompts}) == 16


def test_held_out_prompts_are_distinct_and_a_spent_family_leaves_the_rotation():
    prompts = held_out_prompts(200, 3, None)
    assert len({p for p, _, _ in prompts}) == 200
    # a sphere's caption is only size and colour: 3 x 8 of them, then the other families go on
    assert sum(f == "sphere" for _, f, _ in prompts) == len(SIZES) * len(PALETTE)


def test_paraphrase_mode_asks_the_demo_with_held_out_phrasings(tmp_path):
    import json
    from datasets.captions import mentions
    from scripts.eval_prompts import main as eval_prompts
    assert eval_prompts(["--num", "2", "--paraphrase", "--mesh-resolution", "32", "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert results["paraphrase"] is True and len(results["per_object"]) == 2
    canonical = [p for p, _, _ in held_out_prompts(2, 1000, None)]
    for r, plain in zip(results["per_object"], canonical):
        assert r["prompt"] != plain and sorted(mentions(r["prompt"])) == sorted(mentions(plain)), (r["prompt"], plain)
