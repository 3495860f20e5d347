"""Inference pipelines: models loaded once, inputs in, 3D objects out."""
from pipelines.sar3d import Decoder3D, Object3D, SamplingConfig, SAR3DPipeline, load_image

__all__ = ["SAR3DPipeline", "Decoder3D", "Object3D", "SamplingConfig", "load_image"]
