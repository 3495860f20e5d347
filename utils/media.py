"""Writing what people look at: PNG grids, turntable MP4s (H.264 through imageio-ffmpeg, whose
wheel ships its own ffmpeg) and GIFs. Frames are uint8 arrays (H, W, 3)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image


def to_uint8(images) -> np.ndarray:
    """Float images in [0, 1], (..., 3, H, W) torch or numpy -> uint8 (..., H, W, 3)."""
    a = images.detach().float().cpu().numpy() if hasattr(images, "detach") else np.asarray(images, np.float32)
    return np.round(np.clip(np.moveaxis(a, -3, -1), 0, 1) * 255).astype(np.uint8)


def write_grid(path, frames: np.ndarray, cols: int) -> Path:
    """frames (N, H, W, 3) uint8 as a PNG of `cols` columns (the last row filled with white)."""
    n, h, w, _ = frames.shape
    rows = -(-n // cols)
    grid = np.full((rows * h, cols * w, 3), 255, np.uint8)
    for i, f in enumerate(frames):
        grid[(i // cols) * h:(i // cols + 1) * h, (i % cols) * w:(i % cols + 1) * w] = f
    path = Path(path)
    Image.fromarray(grid).save(path)
    return path


def write_mp4(path, frames: np.ndarray, fps: int = 15) -> Path:
    """H.264 MP4 (yuv420p, so any player opens it) of frames (N, H, W, 3) uint8; odd sizes are
    padded with white to even ones, as yuv420p needs."""
    import imageio.v2 as imageio

    n, h, w, _ = frames.shape
    if h % 2 or w % 2:
        frames = np.pad(frames, ((0, 0), (0, h % 2), (0, w % 2), (0, 0)), constant_values=255)
    path = Path(path)
    with imageio.get_writer(path, format="FFMPEG", fps=fps, codec="libx264", pixelformat="yuv420p",
                            macro_block_size=1, output_params=["-loglevel", "error"]) as writer:
        for f in frames:
            writer.append_data(f)
    return path


def write_gif(path, frames: np.ndarray, fps: int = 15) -> Path:
    """Looping GIF of frames (N, H, W, 3) uint8."""
    path = Path(path)
    images = [Image.fromarray(f) for f in frames]
    images[0].save(path, save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path
