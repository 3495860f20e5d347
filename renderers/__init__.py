"""Renderers: a triangle rasterizer (pure PyTorch, or nvdiffrast on CUDA) and mesh shading."""
