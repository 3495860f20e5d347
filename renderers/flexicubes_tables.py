"""FlexiCubes lookup tables, derived at import from the cube's corner and edge layout.

Corner k of a cube sits at offset (k & 1, (k >> 1) & 1, (k >> 2) & 1) along (x, y, z). The 12
edges are numbered as in the official FlexiCubes code, because the per-cube weights beta
(one per edge) and alpha (one per corner) of the official network are stored in that order:
edges 0-3 go round the y = 0 face (x, z, x, z directed), edges 4-7 are the same loop on the
y = 1 face, and edges 8-11 are the y-directed edges, each from its y = 1 corner to its y = 0 one.

A corner is *inside* when its SDF is negative; a marching-cubes case id is the 8-bit mask of
inside corners. For each case the dual-marching-cubes table lists the groups of sign-changing
edges that one surface patch crosses; each group becomes one dual vertex. The groups are the
closed loops the surface traces on the cube's faces: on a face with two sign-changing edges the
surface joins them, and on an ambiguous face (four of them, corners alternating) it cuts off each
inside corner separately. The rule depends only on the face's signs, so two cubes that share a
face agree on it and the extracted surface is watertight.

Two classes of cases with exactly one ambiguous face (six inside corners, or five) get one
patch where their complement gets two. When two such cubes meet, FlexiCubes switches each of
them to the grouping of its complement (Sec. 1.3 of the paper's supplement): `CHECK_TABLE`
marks these cases and the direction of their ambiguous face.
"""
from __future__ import annotations

import torch

CUBE_CORNERS = torch.tensor([[k & 1, (k >> 1) & 1, (k >> 2) & 1] for k in range(8)])      # (8, 3)

_Y0_LOOP = [(0, 1), (1, 5), (4, 5), (0, 4)]
CUBE_EDGES = torch.tensor(_Y0_LOOP + [(a + 2, b + 2) for a, b in _Y0_LOOP]                  # (12, 2)
                          + [(c + 2, c) for c in (0, 1, 5, 4)])

MAX_GROUPS, MAX_GROUP_EDGES = 4, 7       # the most patches in one case, and edges in one patch

_FACES = [(axis, side) for axis in range(3) for side in (0, 1)]


def _face_corners(axis: int, side: int) -> list:
    return [k for k in range(8) if int(CUBE_CORNERS[k, axis]) == side]


def _face_edges(axis: int, side: int) -> list:
    corners = set(_face_corners(axis, side))
    return [e for e, (a, b) in enumerate(CUBE_EDGES.tolist()) if a in corners and b in corners]


def edge_groups(case: int) -> tuple:
    """-> (groups: sorted lists of edge ids, one per surface patch; ambiguous faces as (axis, side))."""
    inside = [(case >> k) & 1 for k in range(8)]
    edges = CUBE_EDGES.tolist()
    crossing = [e for e, (a, b) in enumerate(edges) if inside[a] != inside[b]]
    parent = list(range(12))

    def root(e):
        while parent[e] != e:
            e = parent[e]
        return e

    ambiguous = []
    for axis, side in _FACES:
        on_face = [e for e in _face_edges(axis, side) if e in crossing]
        if len(on_face) == 2:
            parent[root(on_face[0])] = root(on_face[1])
        elif len(on_face) == 4:
            ambiguous.append((axis, side))
            for corner in _face_corners(axis, side):
                if inside[corner]:   # cut this corner off: join its two edges on this face
                    a, b = [e for e in on_face if corner in edges[e]]
                    parent[root(a)] = root(b)
    groups = {}
    for e in crossing:
        groups.setdefault(root(e), []).append(e)
    return sorted(sorted(g) for g in groups.values()), ambiguous


def _build():
    dmc = torch.full((256, MAX_GROUPS, MAX_GROUP_EDGES), -1, dtype=torch.long)
    num = torch.zeros(256, dtype=torch.long)
    check = torch.zeros(256, 4, dtype=torch.long)
    for case in range(256):
        groups, ambiguous = edge_groups(case)
        num[case] = len(groups)
        for i, g in enumerate(groups):
            dmc[case, i, :len(g)] = torch.tensor(g)
        if len(ambiguous) == 1 and len(groups) < len(edge_groups(255 - case)[0]):
            axis, side = ambiguous[0]
            check[case, 0] = 1
            check[case, 1 + axis] = 1 if side else -1
    return dmc, num, check


# DMC_TABLE (256, 4, 7): edge ids per patch, -1 padded. NUM_VD_TABLE (256,): patches per case.
# CHECK_TABLE (256, 4): [is a case to check, neighbour offset (dx, dy, dz) across its ambiguous face].
DMC_TABLE, NUM_VD_TABLE, CHECK_TABLE = _build()
