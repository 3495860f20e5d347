"""scripts/render_meshes.py and datasets/meshes.py on tiny meshes written with trimesh."""
import contextlib
import io
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import trimesh
from PIL import Image

from datasets.gbuffer import VIEW_FILES, read_gbuffer_object
from datasets.meshes import MeshObject, read_mesh
from datasets.occupancy import ZUP_TO_YUP, read_pointcloud, read_points
from renderers.mesh_render import ColoredMesh
from scripts import render_meshes

TINY = ["--set", "occupancy.num_points=4000", "--set", "occupancy.num_surface=4000", "--res", "32", "--workers", "1"]
BOX_SIZE, BOX_CENTER = np.array([0.6, 0.3, 0.4]), np.array([0.1, -0.2, 0.3])   # file frame (y-up)


def _box(color=(255, 0, 0, 255)):
    box = trimesh.creation.box(BOX_SIZE, transform=trimesh.transformations.translation_matrix(BOX_CENTER))
    box.visual.vertex_colors = color
    return box


def _textured_cube():
    """A cube whose texture is green in its top half and blue below; every uv lies in the top half."""
    cube = trimesh.creation.box((1.0, 1.0, 1.0))
    tex = np.zeros((16, 16, 3), np.uint8)
    tex[:8, :, 1], tex[8:, :, 2] = 255, 255
    uv = np.random.default_rng(0).uniform([0.1, 0.6], [0.9, 0.95], (len(cube.vertices), 2))
    mat = trimesh.visual.material.PBRMaterial(baseColorTexture=Image.fromarray(tex))
    cube.visual = trimesh.visual.TextureVisuals(uv=uv, material=mat)
    return cube


def _write_bad(folder: Path):
    trimesh.Trimesh([[0, 0, 0], [1, 0, 0], [0, 1, 0]], [[0, 1, 2]]).export(folder / "sheet.obj")
    (folder / "garbage.obj").write_text("this is not\x00 a mesh\n")
    (folder / "nan.obj").write_text("v 0 0 0\nv 1 0 0\nv nan 1 0\nv 0 0 1\nf 1 2 3\nf 1 2 4\nf 1 3 4\nf 2 3 4\n")
    (folder / "point.obj").write_text("v 1 1 1\nv 1 1 1\nv 1 1 1\nv 1 1 1\nf 1 2 3\nf 1 3 4\n")


def _run(argv):
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = render_meshes.main([str(a) for a in argv])
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    meshes = tmp_path_factory.mktemp("meshes")
    for sub in ("textured", "parts", "chairs"):
        (meshes / sub).mkdir()
    _box().export(meshes / "red_box.ply")
    _box().export(meshes / "red_box.stl")                     # same stem: a suffixed id
    holey = _box()
    holey.update_faces(np.arange(1, len(holey.faces)))        # one triangle missing
    holey.export(meshes / "holey_box.ply")
    _textured_cube().export(meshes / "textured" / "green_cube.glb")
    trimesh.creation.cylinder(0.3, 0.8).export(meshes / "parts" / "cylinder.stl")
    trimesh.creation.icosphere(2).export(meshes / "chairs" / "chair.obj")
    (meshes / "chairs" / "chair.txt").write_text("a wooden chair\n  with four legs\n")
    (meshes / "captions.json").write_text(json.dumps({"parts/cylinder.stl": "a gray cylinder"}))
    _write_bad(meshes)
    out = tmp_path_factory.mktemp("out")
    rc, stdout, stderr = _run(["--meshes", meshes, "--out", out, *TINY])
    return meshes, out, rc, stdout, stderr


def _box_sdf(q):
    """Signed distance of the normalised box, q (N, 3) in the file's orientation."""
    d = np.abs(q) - BOX_SIZE * (0.9 / BOX_SIZE.max()) / 2
    return np.linalg.norm(np.maximum(d, 0), axis=1) + np.minimum(d.max(1), 0)


def _check_box_occupancy(obj_dir, to_file=np.eye(3), exclude_near=None):
    pts, occ, _ = read_points(obj_dir / "points.npz")
    q = pts.astype(np.float64) @ to_file.T
    sdf = _box_sdf(q)
    far = np.abs(sdf) > 0.02
    if exclude_near is not None:
        far &= np.linalg.norm(q - exclude_near, axis=1) > 0.2
    assert far.sum() > 1000 and 0.1 < occ.mean() < 0.3
    assert (occ[far] == (sdf[far] < 0)).mean() >= 0.99
    surf, normals = read_pointcloud(obj_dir / "pointcloud.npz")
    s, n = surf.astype(np.float64) @ to_file.T, normals.astype(np.float64) @ to_file.T
    assert np.abs(_box_sdf(s)).max() < 2e-3
    assert (_box_sdf(s + 0.01 * n) > _box_sdf(s - 0.01 * n)).mean() > 0.99     # outward


def test_layout_names_and_indices(built):
    meshes, out, rc, stdout, stderr = built
    assert rc == 0, stdout + stderr
    index = json.loads((out / "dataset.json").read_text())
    assert index == {"chairs": ["chairs/chair"], "meshes": ["meshes/holey_box", "meshes/red_box", "meshes/red_box_1"],
                     "parts": ["parts/cylinder"], "textured": ["textured/green_cube"]}
    for rel in sum(index.values(), []):
        for name in (*VIEW_FILES, "normal.png", "points.npz", "pointcloud.npz"):
            assert (out / rel / name).is_file(), rel + "/" + name
        assert read_gbuffer_object(out / rel)["ins"] == rel
    for cat in index:
        assert all((out / cat / f"{s}.lst").is_file() for s in ("train", "val", "test"))
    names = json.loads((out / "meshes.json").read_text())["objects"]
    assert names["red_box.ply"] == "meshes/red_box" and names["red_box.stl"] == "meshes/red_box_1"


def test_captions(built):
    _, out, *_ = built
    caption = lambda rel: (out / rel / "caption_3dtopia.txt").read_text()
    assert caption("chairs/chair") == "a wooden chair with four legs"       # sidecar
    assert caption("parts/cylinder") == "a gray cylinder"                   # captions.json
    assert caption("meshes/red_box") == "red box"                           # file name


def _foreground_rgb(obj_dir):
    views = read_gbuffer_object(obj_dir)
    return views["rgb"][views["alpha"] > 0.98].astype(np.float64) / 255


def test_vertex_colour_and_texture_reach_the_pixels(built):
    _, out, *_ = built
    red = _foreground_rgb(out / "meshes" / "red_box").mean(0)
    assert red[0] > 0.4 and red[1] < 0.1 and red[2] < 0.1, red
    green = _foreground_rgb(out / "textured" / "green_cube").mean(0)     # blue would mean flipped v
    assert green[1] > 0.4 and green[0] < 0.1 and green[2] < 0.1, green


def test_occupancy_matches_the_box(built):
    _, out, *_ = built
    _check_box_occupancy(out / "meshes" / "red_box")
    _check_box_occupancy(out / "meshes" / "red_box_1")


def test_occupancy_with_z_up(tmp_path):
    (tmp_path / "in").mkdir()
    _box().export(tmp_path / "in" / "box.ply")
    rc, *_ = _run(["--meshes", tmp_path / "in", "--out", tmp_path / "out", "--up", "z", *TINY])
    assert rc == 0
    # The world is the file's frame: stored ONet points are ZUP_TO_YUP of the file's.
    _check_box_occupancy(tmp_path / "out" / "meshes" / "box", to_file=ZUP_TO_YUP.T)


def test_non_watertight_box(built):
    meshes, out, _, stdout, _ = built
    assert f"note {meshes / 'holey_box.ply'}: not watertight" in stdout
    hole = _box().triangles_center[0] - BOX_CENTER
    _check_box_occupancy(out / "meshes" / "holey_box", exclude_near=hole * 0.9 / BOX_SIZE.max())


def test_bad_meshes_are_skipped(tmp_path, capsys):
    folder = tmp_path / "in"
    folder.mkdir()
    _write_bad(folder)
    _box().export(folder / "box.ply")
    assert render_meshes.main(["--meshes", str(folder), "--out", str(tmp_path / "out"), *TINY]) == 0
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    for name in ("sheet.obj", "garbage.obj", "nan.obj", "point.obj"):
        assert f"skipped {folder / name}: " in out
        assert not (tmp_path / "out" / "meshes" / Path(name).stem).exists()
    assert not list((tmp_path / "out").glob("*/*.partial"))      # a rejected object leaves nothing
    assert "no interior" in out and "NaN" in out and "zero extent" in out
    assert json.loads((tmp_path / "out" / "dataset.json").read_text()) == {"meshes": ["meshes/box"]}
    (folder / "box.ply").unlink()
    assert render_meshes.main(["--meshes", str(folder), "--out", str(tmp_path / "bad"), *TINY]) == 2
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err and "error: none of the 4 meshes" in err


def test_resume_keeps_names(built, tmp_path):
    meshes, out, *_ = built
    shutil.copytree(meshes, tmp_path / "in")
    shutil.copytree(out, tmp_path / "out")
    meshes_json = json.loads((tmp_path / "out" / "meshes.json").read_text())
    meshes_json["meshes"] = str((tmp_path / "in").resolve())      # the copied folder
    (tmp_path / "out" / "meshes.json").write_text(json.dumps(meshes_json))
    _box().export(tmp_path / "in" / "red_box.glb")               # sorts before red_box.ply
    rc, stdout, _ = _run(["--meshes", tmp_path / "in", "--out", tmp_path / "out", *TINY])
    assert rc == 0 and "wrote 1 objects" in stdout                # the bad meshes are retried
    names = json.loads((tmp_path / "out" / "meshes.json").read_text())["objects"]
    assert names["red_box.ply"] == "meshes/red_box" and names["red_box.glb"] == "meshes/red_box_2"
    with pytest.raises(ValueError, match="other settings"):
        render_meshes.main(["--meshes", str(tmp_path / "in"), "--out", str(tmp_path / "out"), *TINY[:-4]])


def test_inward_faces_and_scene_instances(tmp_path):
    move = trimesh.transformations.translation_matrix
    scene = trimesh.Scene()     # one geometry, two instances
    scene.add_geometry(trimesh.creation.box((1.0, 1.0, 1.0)), geom_name="box", transform=move([-2, 0, 0]))
    scene.graph.update(frame_to="right", matrix=move([2, 0, 0]), geometry="box")
    scene.export(tmp_path / "pair.glb")
    mesh = read_mesh(tmp_path / "pair.glb")
    # Inward-facing faces, and a stray unreferenced vertex that must not move the bounding box.
    inward = ColoredMesh(np.vstack([mesh.verts, [[50, 50, 50]]]), mesh.faces[:, ::-1],
                         np.vstack([mesh.colors, [[0, 0, 0]]]))
    for m in (mesh, inward):
        obj = MeshObject(m, "two boxes", "pair", up="z")
        s = 0.9 / 5.0                                              # x spans [-2.5, 2.5]
        assert obj.inside(np.array([[-2 * s, 0, 0], [2 * s, 0, 0], [0, 0, 0]])).tolist() == [True, True, False]
        pts, n = obj.surface_samples(500, np.random.default_rng(0))
        assert (np.einsum("ij,ij->i", n, pts - np.sign(pts[:, :1]) * [2 * s, 0, 0]) > 0).all()  # outward
