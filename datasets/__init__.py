"""Dataset readers and writers.

- `gbuffer`: the official SAR3D G-buffer layout (12 views per object, cameras, precomputed
  tokens and condition embeddings);
- `occupancy`: the ONet / Argus-3D occupancy layout (points.npz, pointcloud.npz, split .lst);
- `shapes`, `meshes`, `builder`: procedural shapes and mesh folders written in both layouts;
- `verify`: file-level checks shared by scripts/verify_dataset.py and the readers.

This folder shadows Hugging Face's `datasets` package when the repository root is on sys.path;
nothing here is imported by transformers, and tests/test_imports.py checks that it still loads.
"""
