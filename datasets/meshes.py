"""Mesh files (OBJ, PLY, STL, GLB, GLTF) as objects for datasets/builder.py.

`read_mesh` loads a file with trimesh into one ColoredMesh (a scene's geometries with their
transforms applied; vertex or face colours, base-colour textures, material colours, else gray).
`MeshObject` puts it in the builder's world (+z up, bounding box centred, longest side 0.9) and
answers occupancy by the generalized winding number, which also works for meshes with holes.
The folder helpers name the objects of a mesh folder and find their captions.
"""
from __future__ import annotations

import json
import re
from pathlib import Path

import igl
import numpy as np
import trimesh
from PIL import Image
from trimesh.visual.material import PBRMaterial, SimpleMaterial

from datasets.errors import DatasetError, short_message
from datasets.occupancy import ZUP_TO_YUP
from renderers.mesh_render import ColoredMesh, sample_surface

MESH_SUFFIXES = (".obj", ".ply", ".stl", ".glb", ".gltf")
GRAY = 0.7
EXTENT = 0.9            # longest bounding-box side in the world, inside the builder's +-0.45 box
MAX_TEXTURE = 2048      # a float texture of 8k x 8k would take 800 MB; views are at most 768 px
YUP_TO_ZUP = ZUP_TO_YUP.T                       # (x, y, z) -> (x, -z, y)


def _rgb(color) -> np.ndarray:
    return trimesh.visual.color.to_rgba(color)[:3] / 255.0


def _material_color(mat):
    """-> (texture PIL image or None, base colour (3,) in [0, 1] or None) of a trimesh material."""
    if isinstance(mat, PBRMaterial):            # glTF: the factor multiplies the texture
        base = None if mat.baseColorFactor is None else _rgb(mat.baseColorFactor)
        if mat.baseColorTexture is not None:
            return mat.baseColorTexture, np.ones(3) if base is None else base
        return None, base
    if isinstance(mat, SimpleMaterial):         # OBJ: viewers (and trimesh) show map_Kd as is
        if mat.image is not None:
            return mat.image, np.ones(3)
        return None, None if mat.diffuse is None else _rgb(mat.diffuse)
    return None, None


def _texture_array(image: Image.Image) -> np.ndarray:
    image = image.convert("RGB")
    if max(image.size) > MAX_TEXTURE:
        image.thumbnail((MAX_TEXTURE, MAX_TEXTURE), Image.BOX)
    return np.asarray(image, np.float32) / 255


def _parts(loaded) -> list:
    """(Trimesh with the scene transform applied, its visual) for each triangle mesh of a
    trimesh load result. The visual is the loaded one, so parts can share texture images."""
    if isinstance(loaded, trimesh.Trimesh):
        return [(loaded, loaded.visual)]
    if not isinstance(loaded, trimesh.Scene):
        return []
    parts = []
    for node in loaded.graph.nodes_geometry:
        transform, name = loaded.graph[node]
        geom = loaded.geometry[name]
        if isinstance(geom, trimesh.Trimesh):
            # A copy per node: one geometry may be instanced by several nodes. The cache holds
            # the file's vertex normals, which apply_transform rotates.
            moved = geom.copy(include_cache=True, include_visual=False).apply_transform(transform)
            parts.append((moved, geom.visual))
    return parts


def read_mesh(path) -> ColoredMesh:
    """Load a mesh file in its own frame: verts (N, 3), faces (F, 3), colors (N, 3), normals
    (N, 3) (the file's, else trimesh's), and uv / face_texture / textures when textured."""
    try:
        with np.errstate(all="ignore"):         # NaN vertices are reported by MeshObject
            loaded = trimesh.load(path, process=False)  # unprocessed: keep NaNs, hard edges, seams
            parts = _parts(loaded)
            normals = [np.asarray(m.vertex_normals, np.float64) for m, _ in parts]
    except Exception as e:  # trimesh raises anything from ValueError to struct.error on bad files
        raise DatasetError(path, f"unreadable mesh file ({type(e).__name__}: {short_message(e)})") from None
    if not parts:
        raise DatasetError(path, "no triangle faces (an empty file, or not a mesh)")
    verts, faces, colors, uvs, face_tex, textures, tex_index = [], [], [], [], [], [], {}
    offset = 0
    for (part, vis), nrm in zip(parts, normals):
        n, f = len(part.vertices), len(part.faces)
        color, uv, tex = np.full(3, GRAY), np.zeros((n, 2)), -1
        if isinstance(vis, trimesh.visual.ColorVisuals) and vis.kind in ("vertex", "face"):
            color = vis.vertex_colors[:, :3] / 255.0    # face colours come averaged onto vertices
        elif isinstance(vis, trimesh.visual.TextureVisuals):
            image, base = _material_color(vis.material)
            if image is not None and vis.uv is not None and len(vis.uv) == n:
                if id(image) not in tex_index:  # primitives often share one image
                    tex_index[id(image)] = len(textures)
                    textures.append(_texture_array(image))
                tex, uv = tex_index[id(image)], np.asarray(vis.uv, np.float64)
            if base is not None:
                color = base
        verts.append(np.asarray(part.vertices, np.float64))
        faces.append(np.asarray(part.faces, np.int64) + offset)
        colors.append(np.broadcast_to(color, (n, 3)))
        uvs.append(uv)
        face_tex.append(np.full(f, tex, np.int64))
        offset += n
    textured = bool(textures)
    return ColoredMesh(np.concatenate(verts), np.concatenate(faces), np.concatenate(colors).astype(np.float32),
                       normals=np.concatenate(normals), uv=np.concatenate(uvs) if textured else None,
                       face_texture=np.concatenate(face_tex) if textured else None, textures=textures)


class MeshObject:
    """A mesh in the builder's world, with occupancy and surface samples (the object protocol
    of datasets/builder.py).

    `mesh` is in the file's frame; up="y" rotates its +y to the world's +z, up="z" keeps it.
    Raises DatasetError (with `path`) for meshes that cannot make an object: no faces, face
    indices out of range, NaN or inf vertices, a zero-extent bounding box.
    """

    def __init__(self, mesh: ColoredMesh, caption: str, label: str, up: str = "y", path=""):
        if up not in ("y", "z"):
            raise ValueError(f"up must be 'y' or 'z', got {up!r}")
        self.caption, self.label, self.path = caption, label, str(path)
        V, F = np.asarray(mesh.verts, np.float64), np.asarray(mesh.faces, np.int64)
        if F.ndim != 2 or len(F) == 0:
            raise DatasetError(path, "no faces")
        if F.min() < 0 or F.max() >= len(V):
            raise DatasetError(path, "face indices out of range")
        if not np.isfinite(V).all():
            raise DatasetError(path, "NaN or inf vertex coordinates")
        R = YUP_TO_ZUP if up == "y" else np.eye(3)
        V = V @ R.T
        used = V[np.unique(F)]                  # stray unreferenced vertices do not move the box
        lo, hi = used.min(0), used.max(0)
        if not (hi - lo).max() > 1e-12:
            raise DatasetError(path, "degenerate bounds (zero extent)")
        V = (V - (lo + hi) / 2) * (EXTENT / (hi - lo).max())
        tri = V[F]
        if np.einsum("ij,ij->", tri[:, 0], np.cross(tri[:, 1], tri[:, 2])) < 0:
            F = F[:, ::-1].copy()               # inward-facing export: winding numbers would be -1
        normals = None
        if mesh.normals is not None:
            normals = mesh.normals @ R.T
            if not (np.isfinite(normals).all() and (np.linalg.norm(normals, axis=1) > 1e-6).all()):
                normals = None                  # broken file normals: let ColoredMesh compute them
        self.V, self.F = np.ascontiguousarray(V), np.ascontiguousarray(F)
        self.watertight = trimesh.Trimesh(self.V, self.F).is_watertight  # merges coincident vertices
        self._mesh = ColoredMesh(self.V.astype(np.float32), self.F, mesh.colors, normals=normals,
                                 uv=mesh.uv, face_texture=mesh.face_texture, textures=mesh.textures)

    def mesh(self) -> ColoredMesh:
        return self._mesh

    def inside(self, points_N3: np.ndarray) -> np.ndarray:
        """(N,) bool: generalized winding number above 0.5 at the world points (N, 3).

        Raises DatasetError when no point is inside: the builder's query points fill the whole
        box around the object, so that means the mesh encloses no volume (an open sheet)."""
        q = np.ascontiguousarray(points_N3, dtype=np.float64)
        occ = igl.fast_winding_number(self.V, self.F, q) > 0.5
        if not occ.any():
            raise DatasetError(self.path, f"no interior: the winding number stays below 0.5 at all "
                               f"{len(q)} occupancy points (an open surface?)")
        return occ

    def surface_samples(self, n: int, rng) -> tuple:
        """n points (n, 3) drawn uniformly over the surface area, and their face unit normals (n, 3)."""
        return sample_surface(self.V, self.F, n, rng)


# ----------------------------------------------------------------------------- mesh folders

def find_meshes(root) -> list:
    """Mesh files under `root`, recursively, sorted by relative path."""
    root = Path(root)
    return sorted((p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in MESH_SUFFIXES),
                  key=lambda p: p.relative_to(root).as_posix())


def safe_name(text: str) -> str:
    """A file-system-safe name: no separators, no leading dot (hidden files, '..')."""
    return re.sub(r"[^\w.-]+", "_", text).strip("._-") or "mesh"


def category_of(path, root) -> str:
    """The folder of `path` relative to `root`, as one name ('meshes' at the root)."""
    parts = Path(path).parent.relative_to(root).parts
    return safe_name("_".join(parts)) if parts else "meshes"


def assign_names(root, paths, previous: dict) -> dict:
    """{relative path: "category/obj_id"}: the `previous` names are kept (so that a resumed run
    maps every file to the same directory), new files get their stem, suffixed on a clash."""
    names = {}
    taken = {n.lower() for n in previous.values()}  # case-insensitive file systems
    for p in paths:
        rel = Path(p).relative_to(root).as_posix()
        if rel in previous:
            names[rel] = previous[rel]
            continue
        cat, stem = category_of(p, root), safe_name(Path(p).stem)
        name, k = f"{cat}/{stem}", 0
        while name.lower() in taken:
            k += 1
            name = f"{cat}/{stem}_{k}"
        taken.add(name.lower())
        names[rel] = name
    return names


def read_captions(root) -> dict:
    """captions.json in the mesh folder ({relative path or stem: caption}), or {} without one."""
    path = Path(root) / "captions.json"
    if not path.is_file():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DatasetError(path, f"not valid JSON ({e})") from None
    if not isinstance(data, dict) or not all(isinstance(v, str) for v in data.values()):
        raise DatasetError(path, "expected {relative path or stem: caption}")
    return data


def caption_for(path, root, captions: dict) -> str:
    """The sidecar <stem>.txt, else captions.json by relative path or stem, else the file name
    ("red_chair-02.obj" -> "red chair 02"). Whitespace is collapsed to single spaces."""
    path = Path(path)
    sidecar = path.with_suffix(".txt")
    text = sidecar.read_text(encoding="utf-8", errors="replace") if sidecar.is_file() else ""
    if not text.strip():
        text = captions.get(path.relative_to(root).as_posix(), captions.get(path.stem, ""))
    if not text.strip():
        text = re.sub(r"[_\-]+", " ", path.stem)
    return " ".join(text.split()) or path.stem
