"""Procedural 3D shapes: signed distance functions, captions, class labels, meshes.

Eight primitive families plus two-part compositions ("a blue box on top of a yellow
cylinder", "a red sphere next to a green cone"). Every object is drawn from a seeded
generator, so (seed, index) fixes it. Its surface is the zero set of its SDF: occupancy is
exact (sdf < 0), the mesh is marching cubes of the same SDF, surface points are projected
onto the zero set. World frame: +z up, object centred and inside the +-0.45 box.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import mcubes
import numpy as np

from renderers.mesh_render import ColoredMesh, sample_surface

FAMILIES = ("sphere", "box", "cylinder", "cone", "torus", "capsule", "pyramid", "octahedron")
COMPOSITIONS = ("stack", "pair")           # "A on top of B", "A next to B"
LABELS = FAMILIES + COMPOSITIONS
PALETTE = {
    "red": (0.85, 0.12, 0.10), "orange": (0.98, 0.50, 0.05), "yellow": (0.95, 0.85, 0.10),
    "green": (0.15, 0.65, 0.20), "cyan": (0.10, 0.75, 0.80), "blue": (0.12, 0.25, 0.85),
    "purple": (0.50, 0.18, 0.70), "pink": (0.98, 0.50, 0.70),
}
SIZES = {"small": 0.55, "": 0.78, "large": 1.0}   # largest half-extent as a fraction of 0.45
# Per family: proportion word -> range of its shape parameter (see _params).
PROPORTIONS = {
    "sphere": {"": (1.0, 1.0)},
    "box": {"flat": (0.25, 0.45), "": (0.75, 1.25), "tall": (1.8, 2.5)},        # height / width
    "cylinder": {"flat": (0.2, 0.4), "": (0.8, 1.25), "tall": (1.8, 2.6)},     # height / diameter
    "cone": {"flat": (0.4, 0.6), "": (0.9, 1.3), "tall": (1.8, 2.5)},          # height / diameter
    "torus": {"thin": (0.15, 0.22), "": (0.3, 0.42), "thick": (0.5, 0.62)},    # tube / ring radius
    "capsule": {"": (0.5, 1.2), "tall": (2.2, 3.2)},                           # shaft / radius
    "pyramid": {"flat": (0.35, 0.5), "": (0.8, 1.2), "tall": (1.6, 2.2)},      # height / base
    "octahedron": {"flat": (0.5, 0.65), "": (0.9, 1.1), "tall": (1.6, 2.0)},   # height / width
}
STACK_BOTTOMS = ("box", "cylinder", "sphere", "capsule")


@dataclass
class Part:
    family: str
    param: float                         # the proportion parameter of PROPORTIONS (half height
                                         # over half width; tube radius for the torus)
    aux: float                           # a second free proportion (box depth)
    color: str
    offset: np.ndarray = field(default_factory=lambda: np.zeros(3))
    scale: float = 1.0

    def half_extent(self) -> np.ndarray:
        """Axis-aligned half extents in the part's own frame, before `scale`."""
        f, q = self.family, self.param
        return {"sphere": (1, 1, 1), "box": (1, self.aux, q), "cylinder": (1, 1, q), "cone": (1, 1, q),
                "torus": (1 + q, 1 + q, q), "capsule": (1, 1, 1 + q), "pyramid": (1, 1, q),
                "octahedron": (1, 1, q)}[f] * np.ones(3)

    def sdf(self, p: np.ndarray) -> np.ndarray:
        return self.scale * primitive_sdf(self.family, self.param, self.aux, (p - self.offset) / self.scale)


def primitive_sdf(family: str, q: float, aux: float, p: np.ndarray) -> np.ndarray:
    """Signed distance (exact or a sign-correct bound) of a unit-width primitive; p (..., 3)."""
    x, y, z = p[..., 0], p[..., 1], p[..., 2]
    rxy = np.hypot(x, y)
    if family == "sphere":
        return np.linalg.norm(p, axis=-1) - 1.0
    if family == "box":
        d = np.abs(p) - np.array([1.0, aux, q])
        return np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0)
    if family == "cylinder":
        d = np.stack([rxy - 1.0, np.abs(z) - q], -1)
        return np.linalg.norm(np.maximum(d, 0), axis=-1) + np.minimum(d.max(-1), 0)
    if family == "cone":  # base radius 1 at z = -q, apex at z = +q (exact capped-cone distance)
        h, r1 = q, 1.0
        ca = np.stack([rxy - np.minimum(rxy, np.where(z < 0, r1, 0.0)), np.abs(z) - h], -1)
        k1, k2 = np.array([0.0, h]), np.array([-r1, 2 * h])
        qv = np.stack([rxy, z], -1)
        t = np.clip(((k1 - qv) @ k2) / (k2 @ k2), 0, 1)
        cb = qv - k1 + t[..., None] * k2
        s = np.where((cb[..., 0] < 0) & (ca[..., 1] < 0), -1.0, 1.0)
        return s * np.sqrt(np.minimum((ca ** 2).sum(-1), (cb ** 2).sum(-1)))
    if family == "torus":
        return np.hypot(rxy - 1.0, z) - q
    if family == "capsule":
        return np.linalg.norm(p - np.stack([0 * x, 0 * y, np.clip(z, -q, q)], -1), axis=-1) - 1.0
    if family == "pyramid":  # square base half-width 1 at z = -q, apex at z = +q
        h2 = 2 * q
        n = math.hypot(h2, 1.0)
        sides = [(s * c * h2 + (z + q) - h2) / n for c in (x, y) for s in (1, -1)]
        return np.maximum.reduce(sides + [-(z + q)])
    if family == "octahedron":
        return (np.abs(x) + np.abs(y) + np.abs(z) / q - 1.0) * min(1.0, q) / math.sqrt(3)
    raise ValueError(f"unknown family {family!r}")


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _draw_part(rng, family: str, word: str | None = None) -> tuple:
    """A part of `family` with a random (or the given) proportion word -> (Part, word)."""
    words = list(PROPORTIONS[family])
    word = words[rng.integers(len(words))] if word is None else word
    lo, hi = PROPORTIONS[family][word]
    q = float(rng.uniform(lo, hi))   # every ratio above equals half height / half width
    aux = float(rng.uniform(0.7, 1.3)) if family == "box" else 1.0
    return Part(family, q, aux, color=""), word


def _rotation(yaw: float, tilt: float, tilt_axis: float) -> np.ndarray:
    cz, sz = math.cos(yaw), math.sin(yaw)
    Rz = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1.0]])
    a = np.array([math.cos(tilt_axis), math.sin(tilt_axis), 0.0])
    K = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    Rt = np.eye(3) + math.sin(tilt) * K + (1 - math.cos(tilt)) * K @ K
    return Rt @ Rz


class ProceduralShape:
    """One procedural object: caption, label, exact SDF in world coordinates, mesh, samples."""

    def __init__(self, parts, label: str, caption: str, size: float, R: np.ndarray, mc_res: int = 128):
        self.parts, self.label, self.caption, self.R = parts, label, caption, R
        lo = np.min([p.offset - p.scale * p.half_extent() for p in parts], 0) - 0.05
        hi = np.max([p.offset + p.scale * p.half_extent() for p in parts], 0) + 0.05
        verts, faces = self._marching_cubes(lo, hi, mc_res)
        rotated = verts @ R.T
        bmin, bmax = rotated.min(0), rotated.max(0)
        self.center = (bmin + bmax) / 2                         # in rotated design units
        self.s = 0.45 * size / ((bmax - bmin).max() / 2)        # design -> world scale
        self._design_verts, self.faces = verts, faces

    def _design_sdf(self, p):
        return np.minimum.reduce([part.sdf(p) for part in self.parts])

    def _to_design(self, p_world):
        return (p_world / self.s + self.center) @ self.R

    def sdf(self, p_world: np.ndarray) -> np.ndarray:
        """Signed distance in world units (negative inside), p (N, 3)."""
        return self.s * self._design_sdf(self._to_design(np.asarray(p_world, np.float64)))

    def inside(self, p_world: np.ndarray) -> np.ndarray:
        return self.sdf(p_world) < 0

    def gradient(self, p_world: np.ndarray, h: float = 1e-5) -> np.ndarray:
        g = np.stack([self.sdf(p_world + h * e) - self.sdf(p_world - h * e) for e in np.eye(3)], -1) / (2 * h)
        return g / np.maximum(np.linalg.norm(g, axis=-1, keepdims=True), 1e-12)

    def _marching_cubes(self, lo, hi, res):
        axes = [np.linspace(lo[i], hi[i], res) for i in range(3)]
        grid = np.stack(np.meshgrid(*axes, indexing="ij"), -1)
        vol = self._design_sdf(grid.reshape(-1, 3)).reshape(res, res, res)
        verts, faces = mcubes.marching_cubes(-vol, 0.0)        # mcubes wants positive inside
        verts = lo + verts * (hi - lo) / (res - 1)
        return verts, faces.astype(np.int64)

    def _world_verts(self) -> np.ndarray:
        return self.s * (self._design_verts @ self.R.T - self.center)

    def mesh(self) -> ColoredMesh:
        verts = self._world_verts()
        part = np.argmin([p.sdf(self._design_verts) for p in self.parts], 0)
        colors = np.array([PALETTE[p.color] for p in self.parts])[part]
        return ColoredMesh(verts.astype(np.float32), self.faces, colors.astype(np.float32),
                           normals=self.gradient(verts).astype(np.float32))

    def surface_samples(self, n: int, rng) -> tuple:
        """n points on the surface (marching-cubes samples projected onto the zero set) and
        their outward unit normals, world units."""
        pts, _ = sample_surface(self._world_verts(), self.faces, n, rng)
        for _ in range(3):                                       # Newton steps onto sdf = 0
            pts = pts - self.sdf(pts)[:, None] * self.gradient(pts)
        return pts, self.gradient(pts)


def sample_shape(seed: int, index: int, label: str | None = None, mc_res: int = 128,
                 upright: bool = False) -> ProceduralShape:
    """Object `index` of the dataset drawn with `seed`; label defaults to LABELS round-robin.
    Objects are turned by a random yaw and single primitives tilted by up to 15 degrees; with
    `upright` they keep their design frame (axis-aligned, +z up) and are otherwise the same
    objects, with the same captions, proportions, colours and sizes."""
    rng = np.random.default_rng([seed, index])
    label = LABELS[index % len(LABELS)] if label is None else label
    colors = list(PALETTE)
    yaw = rng.uniform(0, 2 * math.pi)
    if label in FAMILIES:
        part, word = _draw_part(rng, label)
        part.color = colors[rng.integers(len(colors))]
        size_word = list(SIZES)[rng.integers(len(SIZES))]
        words = " ".join(w for w in (size_word, word, part.color, label) if w)
        R = np.eye(3) if upright else _rotation(yaw, math.radians(rng.uniform(0, 15)), rng.uniform(0, 2 * math.pi))
        return ProceduralShape([part], label, f"{article(words)} {words}", SIZES[size_word], R, mc_res)
    if label not in COMPOSITIONS:
        raise ValueError(f"unknown shape label {label!r}; known: {LABELS}")
    first = rng.choice(FAMILIES) if label == "pair" else rng.choice(STACK_BOTTOMS)
    second = rng.choice(FAMILIES)
    (a, _), (b, _) = _draw_part(rng, str(first), ""), _draw_part(rng, str(second), "")
    ca, cb = rng.choice(len(colors), 2, replace=False)
    a.color, b.color = colors[ca], colors[cb]
    b.scale = float(rng.uniform(0.55, 0.9))
    ea, eb = a.half_extent(), b.scale * b.half_extent()
    if label == "stack":   # b rests on a, overlapping slightly so the union is one solid
        b.offset = np.array([0.0, 0.0, ea[2] + eb[2] - 0.04])
        caption = f"{article(b.color)} {b.color} {b.family} on top of {article(a.color)} {a.color} {a.family}"
    else:                  # b beside a along x, a small gap between them
        b.offset = np.array([ea[0] + eb[0] + 0.15, 0.0, eb[2] - ea[2]])
        caption = f"{article(a.color)} {a.color} {a.family} next to {article(b.color)} {b.color} {b.family}"
    R = np.eye(3) if upright else _rotation(yaw, 0.0, 0.0)
    return ProceduralShape([a, b], label, caption, 1.0, R, mc_res)
