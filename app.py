#!/usr/bin/env python
"""The web demo: text, image and class to 3D, and 3D to caption, in the browser.

    pip install --no-deps -r requirements-app.txt     # once: Gradio, an optional dependency
    python app.py                                     # http://127.0.0.1:7860 with the embedded demo models
    python app.py --official                          # the official SAR3D weights in checkpoints/
    python app.py --vqvae V --ar-text T --ar-image I --argus-generator G --argus-tokenizer A --captioner C

Every model loads once, at start-up (a model that cannot load leaves its tab with the reason,
not the app dead). Requests queue, one at a time. Each answer is written to
OUTPUT_DIR/<tab>-<n>/ as sample.py writes it (mesh.glb and mesh.obj, turntable.mp4, preview.png,
tokens.npy) and shown in the page: the mesh in an interactive viewer, the turntable, the files
to download and the seconds of each stage. Bad input (an empty prompt, a file that is not an image
or a mesh) gives a message in the page. Works offline; nothing is sent anywhere.
"""
from __future__ import annotations

import itertools
import logging
import os
import time
from pathlib import Path

os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")        # offline: no telemetry calls

import torch  # noqa: E402

from models.precision import PRECISIONS  # noqa: E402
from pipelines.argus import ArgusPipeline, ArgusSampling  # noqa: E402
from pipelines.caption import CaptionPipeline  # noqa: E402
from pipelines.sar3d import DEMO_DIR, OFFICIAL_DIR, SamplingConfig, SAR3DPipeline, check_prompt, load_image  # noqa: E402
from utils.cli import EXPECTED, ArgumentParser, check_device, error_line, run  # noqa: E402

log = logging.getLogger("app")


class Studio:
    """The models and what each tab does; the Gradio page (build_ui) only lays them out."""

    def __init__(self, args):
        self.args, self.device = args, check_device(args.device)
        self.out = Path(args.output_dir)
        self.counter = itertools.count()
        self.pipes, self.errors, self.folders = {}, {}, {}
        folder = OFFICIAL_DIR if args.official else None
        self.default_folder = str(OFFICIAL_DIR if args.official else DEMO_DIR)     # the page's model folder box
        self._load("text", lambda: self.sar3d(folder, "text", args.vqvae, args.ar_text))
        self._load("image", lambda: self.sar3d(folder, "image", args.vqvae, args.ar_image))
        self._load("class", lambda: ArgusPipeline.from_pretrained(tokenizer=args.argus_tokenizer,
                                                                  generator=args.argus_generator, device=self.device))
        self._load("caption", lambda: CaptionPipeline.from_pretrained(args.captioner, args.caption_vqvae,
                                                                      device=self.device))

    def _load(self, tab: str, make) -> None:
        try:
            self.pipes[tab] = make()
        except Exception as e:       # noqa: BLE001 -- the tab shows why; the other tabs still work
            self.errors[tab] = error_line(e) if isinstance(e, EXPECTED) else f"{type(e).__name__}: {e}"
            log.warning("%s tab: %s", tab, self.errors[tab])

    def sar3d(self, folder, condition: str, vqvae=None, ar=None) -> SAR3DPipeline:
        key = (str(folder), condition)
        if key not in self.folders:
            self.folders[key] = SAR3DPipeline.from_pretrained(folder, condition, vqvae=vqvae, ar=ar,
                                                              device=self.device, precision=self.args.precision)
        return self.folders[key]

    def pipe(self, tab: str):
        if tab not in self.pipes:
            raise ValueError(f"the {tab} model did not load: {self.errors.get(tab, 'unknown reason')}")
        return self.pipes[tab]

    def folder_pipe(self, tab: str, folder: str):
        """The tab's pipeline, or that of another pipeline folder typed into the page."""
        folder = (folder or "").strip()
        if not folder or folder == self.default_folder:
            return self.pipe(tab)
        if not Path(folder).is_dir():
            raise ValueError(f"model folder {folder}: no such folder; give a folder holding vqvae/ and ar_{tab}/")
        return self.sar3d(Path(folder), tab)

    def _save(self, tab: str, obj) -> tuple:
        """Write one object; returns what the page shows: GLB, MP4, files and the timings."""
        folder = self.out / f"{tab}-{os.getpid()}-{next(self.counter)}"
        obj.save(folder, (".glb", ".obj"), video=True)
        glb = folder / "mesh.glb"
        files = [str(p) for p in (glb, folder / "mesh.obj") if p.is_file()]
        if obj.mesh_error:
            raise ValueError(f"the sample is empty (no surface to mesh: {obj.mesh_error}); try another seed")
        times = " · ".join(f"{k} {v:.2f} s" for k, v in obj.times.items())
        return str(glb), str(folder / "turntable.mp4"), files, f"**{folder.name}**: {times}"

    def text(self, prompt, *sampling) -> tuple:
        return self.generate("text", check_prompt(prompt or "", "prompt"), *sampling)

    def image(self, path, *sampling) -> tuple:
        if not path:
            raise ValueError("no image: drop an image (PNG, JPEG, ...) into the box first")
        image = load_image(Path(path), name=f"the upload {Path(path).name}")   # not an image: one clear line
        return self.generate("image", image, *sampling)

    def generate(self, tab: str, x, seed, guidance, top_k, top_p, folder) -> tuple:
        """One SAR3D object for a checked prompt or image, with the page's sampling controls."""
        pipe = self.folder_pipe(tab, folder)
        sampling = SamplingConfig(float(guidance), int(top_k), float(top_p))
        obj = pipe(x, 1, int(seed or 0), sampling, mesh_resolution=self.args.mesh_resolution,
                   frames=self.args.frames, render_resolution=self.args.render_resolution)[0]
        return self._save(tab, obj)

    def category(self, name, seed, top_k) -> tuple:
        pipe = self.pipe("class")
        pipe.generator.class_index(name or "")          # an unknown one: the list of valid ones
        obj = pipe(name, 1, int(seed or 0), ArgusSampling(top_k=int(top_k)), frames=self.args.frames,
                   render_resolution=self.args.render_resolution)[0]
        return self._save("class", obj)

    def caption(self, mesh_file, question) -> str:
        if not mesh_file:
            raise ValueError("no mesh: upload a .glb, .obj, .ply or .stl file first")
        question = check_prompt(question, "question") if question and question.strip() else None
        t = time.perf_counter()
        text = self.pipe("caption").caption_mesh(Path(mesh_file), question)
        return f"{text}\n\n({time.perf_counter() - t:.1f} s)"

    def categories(self) -> list[str]:
        return list(self.pipes["class"].generator.cfg.classes) if "class" in self.pipes else []


def friendly(fn):
    """A handler whose errors reach the page as a message (gr.Error), never as a dead page."""
    import gradio as gr

    def wrapped(*args):
        try:
            return fn(*args)
        except EXPECTED as e:
            raise gr.Error(error_line(e)) from None
        except Exception as e:       # noqa: BLE001
            log.exception("request failed")
            raise gr.Error(f"internal error ({type(e).__name__}: {e}); the console has the details") from None
    return wrapped


def build_ui(studio: Studio):
    import gradio as gr
    d, a = SamplingConfig(), ArgusSampling()

    def results(tab: str):
        with gr.Column():
            viewer = gr.Model3D(label="mesh (drag to turn)", elem_id=f"{tab}-model", height=360)
            video = gr.Video(label="turntable", elem_id=f"{tab}-video", autoplay=True, loop=True, height=260)
            files = gr.File(label="download", file_count="multiple", elem_id=f"{tab}-files")
            timing = gr.Markdown(elem_id=f"{tab}-times")
        return [viewer, video, files, timing]

    def controls(tab: str):
        with gr.Accordion("sampling", open=False):
            seed = gr.Number(0, label="seed", precision=0, elem_id=f"{tab}-seed")
            guidance = gr.Slider(0, 10, d.guidance, step=0.5, label="guidance")
            top_k = gr.Slider(0, 100, d.top_k, step=1, label="top-k (0: all)")
            top_p = gr.Slider(0, 1, d.top_p, step=0.05, label="top-p (0: all)")
            folder = gr.Textbox(studio.default_folder, label="model folder")
        return [seed, guidance, top_k, top_p, folder]

    def unavailable(tab: str) -> None:
        if tab in studio.errors:
            gr.Markdown(f"**Not available:** {studio.errors[tab]}")

    with gr.Blocks(title="SAR3D / Argus-3D demo") as demo:
        gr.Markdown("# 3D generation and understanding\nText, image or category in, a mesh out; a mesh in, "
                    "a caption out. The embedded demo models know eight primitive families in ten colours "
                    "(README).")
        for tab, title in (("text", "Text to 3D"), ("image", "Image to 3D")):
            with gr.Tab(title, elem_id=f"tab-{tab}"):
                unavailable(tab)
                with gr.Row():
                    with gr.Column():
                        if tab == "text":
                            given = gr.Textbox(label="prompt", placeholder="a red torus", elem_id="prompt")
                        else:
                            given = gr.File(label="image", file_count="single", elem_id="image-input")
                        inputs = [given, *controls(tab)]
                        go = gr.Button("Generate", variant="primary", elem_id=f"{tab}-generate")
                    outputs = results(tab)
                handler = friendly(getattr(studio, tab))
                go.click(handler, inputs, outputs)
                if tab == "text":
                    given.submit(handler, inputs, outputs)
        with gr.Tab("Class to 3D (Argus-3D)", elem_id="tab-class"):
            unavailable("class")
            with gr.Row():
                with gr.Column():
                    names = studio.categories()
                    cate = gr.Dropdown(names, value=names[0] if names else None, label="category",
                                       elem_id="class-name")
                    seed = gr.Number(0, label="seed", precision=0)
                    top_k = gr.Slider(0, 1000, a.top_k, step=1, label="top-k (0: all)")
                    go = gr.Button("Generate", variant="primary", elem_id="class-generate")
                outputs = results("class")
            go.click(friendly(studio.category), [cate, seed, top_k], outputs)
        with gr.Tab("3D to caption", elem_id="tab-caption"):
            unavailable("caption")
            with gr.Row():
                with gr.Column():
                    mesh = gr.File(label="mesh (.glb, .obj, .ply, .stl)", elem_id="caption-input")
                    question = gr.Textbox(label="question (empty: describe the object)")
                    go = gr.Button("Caption", variant="primary", elem_id="caption-go")
                answer = gr.Textbox(label="caption", elem_id="caption-output", lines=3)
            go.click(friendly(studio.caption), [mesh, question], answer)
    return demo.queue(default_concurrency_limit=1)


def parse_args(argv=None):
    ap = ArgumentParser(description=__doc__)
    ap.add_argument("--host", default="127.0.0.1", help="0.0.0.0 to serve other machines")
    ap.add_argument("--port", type=int, default=7860)
    ap.add_argument("--official", action="store_true", help="the official SAR3D checkpoints in checkpoints/")
    ap.add_argument("--vqvae", help="SAR3D VQVAE folder or official file (default: the demo's)")
    ap.add_argument("--ar-text", help="text generator folder or official file")
    ap.add_argument("--ar-image", help="image generator folder or official file")
    ap.add_argument("--argus-tokenizer", help="Argus-3D tokenizer folder (default: the demo's)")
    ap.add_argument("--argus-generator", help="Argus-3D class-guided generator folder (default: the demo's)")
    ap.add_argument("--captioner", help="captioner folder (default: the demo's)")
    ap.add_argument("--caption-vqvae", help="the VQVAE the captioner reads (default: the demo's)")
    ap.add_argument("--mesh-resolution", type=int, default=96, help="marching-cubes grid of the SAR3D meshes")
    ap.add_argument("--frames", type=int, default=24, help="turntable frames")
    ap.add_argument("--render-resolution", type=int, default=128, help="turntable size")
    ap.add_argument("--precision", default="fp32", choices=PRECISIONS, help="the SAR3D generators' (int8: CPU)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--output-dir", type=Path, default=Path("outputs/app"), help="each answer's files go here")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        import gradio  # noqa: F401
    except ImportError:
        raise ValueError("the web demo needs Gradio: pip install --no-deps -r requirements-app.txt") from None
    t = time.perf_counter()
    studio = Studio(args)
    args.output_dir.mkdir(parents=True, exist_ok=True)
    print(f"loaded models in {time.perf_counter() - t:.1f} s", flush=True)
    build_ui(studio).launch(server_name=args.host, server_port=args.port, allowed_paths=[str(args.output_dir.resolve())],
                            footer_links=[], quiet=False)
    return 0


if __name__ == "__main__":
    run(main)
