"""sample.py end to end on tiny random models (the whole pipeline and every output file), its
one-line errors, and the shipped demo model when it is there."""
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import sample
from models.ar import ARConfig, NextScaleAR
from models.conditioners import EncoderUnavailable
from models.vqvae import TriplaneVQVAE, VQVAEConfig
from pipelines.sar3d import DEMO_DIR, load_image
from tests.test_conditioners import save_tiny_bert
from utils.checkpoint import CheckpointError, save_model
from utils.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """A tiny random VQVAE whose density is high everywhere (so there is a surface), tiny text and
    image generators over its tokens, and the tiny BERT and random MobileNetV2 they are conditioned on."""
    from models.mobilenet import MobileNetV2
    root = tmp_path_factory.mktemp("models")
    bert = save_tiny_bert(root / "bert")
    torch.manual_seed(0)
    vcfg = load_config(VQVAEConfig, ROOT / "configs" / "vqvae" / "tiny.yaml")
    vq = TriplaneVQVAE(vcfg)
    with torch.no_grad():
        vq.renderer.decoder.net[-1].bias[0] = 30.0           # sigma: an occupied box
    save_model(root / "vqvae", vq.state_dict(), to_dict(vcfg), "vqvae")
    acfg = ARConfig(condition="text", depth=1, width=32, num_heads=2, pooled_dim=16, seq_dim=16,
                    cross_attn="after_self", patch_nums=vcfg.quantizer.patch_nums, vocab_size=vcfg.quantizer.vocab_size,
                    c_vae=vcfg.quantizer.c_vae, encoder=str(bert))
    save_model(root / "ar", NextScaleAR(acfg).state_dict(), to_dict(acfg), "ar")
    torch.save(MobileNetV2().eval().state_dict(), root / "mnv2.pth")
    icfg = ARConfig(condition="image", depth=1, width=32, num_heads=2, pooled_dim=1280, seq_dim=1280,
                    cross_attn="first", patch_nums=acfg.patch_nums, vocab_size=acfg.vocab_size, c_vae=acfg.c_vae,
                    encoder=str(root / "mnv2.pth"))
    save_model(root / "ar_image", NextScaleAR(icfg).state_dict(), to_dict(icfg), "ar")
    return root


def run_sample(models, out, *extra):
    return sample.main(["--vqvae", str(models / "vqvae"), "--ar", str(models / "ar"), "--output-dir", str(out),
                        "--render-resolution", "16", "--frames", "4", "--mesh-resolution", "12", *extra])


def test_prompt_writes_mesh_video_preview_and_tokens(models, tmp_path):
    import imageio.v2 as imageio
    import trimesh
    assert run_sample(models, tmp_path, "--prompt", "a red torus", "--formats", "glb,ply") == 0
    out = tmp_path / "a_red_torus_0"
    mesh = trimesh.load(out / "mesh.glb", force="mesh")
    assert len(mesh.faces) > 0 and mesh.visual.kind == "vertex"
    assert mesh.visual.vertex_colors.shape == (len(mesh.vertices), 4)
    assert (out / "mesh.ply").is_file()
    with imageio.get_reader(out / "turntable.mp4") as r:
        assert r.count_frames() == 4
    assert Image.open(out / "turntable.gif").n_frames == 4
    assert Image.open(out / "preview.png").size == (4 * 16, 16)
    pn = load_config(VQVAEConfig, ROOT / "configs" / "vqvae" / "tiny.yaml").quantizer.patch_nums
    tokens = np.load(out / "tokens.npy")
    assert tokens.shape == (3 * sum(p * p for p in pn),) and tokens.dtype == np.int64


def test_same_seed_same_tokens_and_prompt_files(models, tmp_path):
    (tmp_path / "p.json").write_text(json.dumps({"test_promts": ["a blue box", "a green cone"]}))
    (tmp_path / "list.json").write_text(json.dumps(["a blue box"]))
    run_sample(models, tmp_path / "a", "--prompts", str(tmp_path / "p.json"), "--no-video", "--num-samples", "2")
    run_sample(models, tmp_path / "b", "--prompts", str(tmp_path / "list.json"), "--no-video", "--num-samples", "2")
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["a_blue_box_0", "a_blue_box_1", "a_green_cone_0", "a_green_cone_1"]
    assert not (tmp_path / "a" / "a_blue_box_0" / "turntable.mp4").exists()
    for k in (0, 1):
        np.testing.assert_array_equal(np.load(tmp_path / "a" / f"a_blue_box_{k}" / "tokens.npy"),
                                      np.load(tmp_path / "b" / f"a_blue_box_{k}" / "tokens.npy"))


def test_image_input_rgba_composited_and_padded(tmp_path):
    rgba = np.zeros((20, 40, 4), np.uint8)
    rgba[5:15, 10:30] = (255, 0, 0, 255)                  # an opaque red block, the rest transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "x.png")
    x = load_image(tmp_path / "x.png")
    assert x.shape == (3, 40, 40)
    np.testing.assert_allclose(x[:, 0, 0], 1.0)                 # padding and transparency: white
    np.testing.assert_allclose(x[:, 20, 20], [1.0, 0.0, 0.0])   # the block, centred vertically


def test_bad_inputs_are_clear_errors(models, tmp_path):
    (tmp_path / "not_an_image.png").write_text("hello")
    Image.new("RGB", (1, 1)).save(tmp_path / "tiny.png")
    (tmp_path / "cut").mkdir()
    (tmp_path / "cut" / "config.json").write_text((models / "vqvae" / "config.json").read_text())
    (tmp_path / "cut" / "model.safetensors").write_bytes((models / "vqvae" / "model.safetensors").read_bytes()[:5000])
    cases = [(["--prompt", "  "], ValueError, "--prompt: empty prompt"),
             (["--image", str(tmp_path / "not_an_image.png")], ValueError, "not a readable image file"),
             (["--image", str(tmp_path / "tiny.png")], ValueError, "1x1 pixels is too small"),
             (["--prompt", "a box", "--decoder", "mesh"], ValueError, "--decoder 'mesh': use nerf or flexicubes"),
             (["--prompt", "a box", "--ar", str(tmp_path / "missing")], FileNotFoundError,
              "--ar: no checkpoint at .*missing"),
             (["--prompt", "a box", "--vqvae", str(tmp_path / "cut")], CheckpointError, "cut"),
             (["--prompt", "a box", "--decoder", "flexicubes"], ValueError, "decodes with nerf"),
             (["--prompt", "a box", "--text-encoder", str(tmp_path / "nowhere")], EncoderUnavailable, "nowhere")]
    for argv, exc, match in cases:
        with pytest.raises(exc, match=match):
            run_sample(models, tmp_path / "out", *argv)
    # Through the command line: one line, no traceback, exit status 2.
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), "--prompt", "", "--output-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and r.stderr.strip().startswith("error: --prompt: empty prompt")
    assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1


def test_test_text_sh_runs_every_prompt_of_the_official_file(models, tmp_path):
    r = subprocess.run(["bash", str(ROOT / "test_text.sh"), "--vqvae", str(models / "vqvae"), "--ar", str(models / "ar"),
                        "--output-dir", str(tmp_path), "--no-video", "--render-resolution", "16", "--frames", "2",
                        "--mesh-resolution", "12"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    prompts = json.loads((ROOT / "test_files" / "test_text.json").read_text())["test_promts"]
    for p in prompts:
        assert (tmp_path / f"{sample.slug(p)}_0" / "mesh.glb").is_file()


def test_test_image_sh_runs_every_image_of_test_files(models, tmp_path):
    r = subprocess.run(["bash", str(ROOT / "test_image.sh"), "--vqvae", str(models / "vqvae"), "--ar",
                        str(models / "ar_image"), "--output-dir", str(tmp_path), "--no-video", "--render-resolution", "16",
                        "--frames", "2", "--mesh-resolution", "12"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    images = sorted((ROOT / "test_files" / "images").glob("*.png"))
    assert images
    for p in images:
        out = tmp_path / f"{sample.slug(p.stem)}_0"
        assert (out / "mesh.glb").is_file() and (out / "preview.png").is_file()
        assert Image.open(out / "input.png").mode == "RGB"


def test_eval_prompts_writes_accuracies_and_a_contact_sheet(models, tmp_path, capsys):
    from scripts.eval_prompts import main
    assert main(["--num", "2", "--vqvae", str(models / "vqvae"), "--ar", str(models / "ar"), "--mesh-resolution", "12",
                 "--out-dir", str(tmp_path)]) == 0
    results = json.loads((tmp_path / "results.json").read_text())
    assert len(results["per_object"]) == 2 and set(results["overall"]) == {"family", "colour"}
    assert [r["family"] for r in results["per_object"]] == ["sphere", "box"]
    assert Image.open(tmp_path / "contact_sheet.png").size[0] > 0
    assert "overall        2" in capsys.readouterr().out
    assert main(["--num", "2", "--vqvae", str(models / "vqvae"), "--ar", str(models / "ar"), "--mesh-resolution", "12",
                 "--out-dir", str(tmp_path / "int8"), "--precision", "int8"]) == 0       # the faster CPU path
    int8 = json.loads((tmp_path / "int8" / "results.json").read_text())
    assert [r["prompt"] for r in int8["per_object"]] == [r["prompt"] for r in results["per_object"]]
    assert (results["precision"], int8["precision"]) == ("fp32", "int8")


def test_eval_prompts_images_shows_the_image_generator_the_held_out_objects(models, shapes_root, tmp_path):
    import shutil
    from datasets.gbuffer import load_index, read_text
    from models.conditioners import pil_to_tensor
    from evaluation.shape_check import condition_view
    from scripts.eval_prompts import main
    from datasets.gbuffer import dino_view
    data = Path(shutil.copytree(shapes_root, tmp_path / "data"))
    index = {f: rels for f, rels in load_index(data).items() if f in ("sphere", "box")}
    (data / "dataset.json").write_text(json.dumps(index))
    args = ["--images", "--data-dir", str(data), "--holdout", "1", "--vqvae", str(models / "vqvae"),
            "--ar", str(models / "ar_image"), "--mesh-resolution", "12", "--out-dir", str(tmp_path / "eval")]
    assert main(args) == 0
    summary = json.loads((tmp_path / "eval" / "results.json").read_text())
    results = summary["per_object"]
    assert [(r["prompt"], r["family"]) for r in results] == \
        [(read_text(data / index[f][-1] / "caption_3dtopia.txt"), f) for f in ("sphere", "box")]
    d, v = data / index["box"][-1], dino_view(data / index["box"][-1])
    with Image.open(d / "raw_img.png") as im:
        crops = [pil_to_tensor(im.crop((32 * k, 0, 32 * (k + 1), 32))) for k in range(12)]
    assert torch.equal(condition_view(d), crops[v]) and summary["random_views"] is False
    drawn = [[k for k in range(12) if torch.equal(condition_view(d, seed), crops[k])] for seed in range(8)]
    assert all(drawn) and len({k[0] for k in drawn}) > 2                  # --random-views: any of the 12
    with pytest.raises(ValueError, match="--random-views is for --images"):
        main(["--random-views"])
    with pytest.raises(ValueError, match="--images needs --data-dir"):
        main(["--images"])
    with pytest.raises(ValueError, match="pick one"):
        main(["--images", "--reconstruct", "--data-dir", str(data)])


@pytest.mark.skipif(not (DEMO_DIR / "ar_text" / "model.safetensors").is_file(), reason="no shipped demo model")
def test_shipped_demo_model_makes_the_prompted_family(tmp_path):
    from evaluation.shape_check import classify_family, normalise, templates
    from renderers.mesh_render import sample_surface
    assert sample.main(["--prompt", "a large red sphere", "--output-dir", str(tmp_path), "--no-video",
                        "--mesh-resolution", "48"]) == 0
    import trimesh
    mesh = trimesh.load(tmp_path / "a_large_red_sphere_0" / "mesh.glb", force="mesh")
    pts = normalise(sample_surface(np.asarray(mesh.vertices), np.asarray(mesh.faces), 2000,
                                   np.random.default_rng(0))[0])
    assert classify_family(pts, templates()) == "sphere"


def test_pipeline_from_python_equals_sample_py(models, tmp_path):
    """The README's few lines of Python give the tokens and mesh sample.py writes for that seed."""
    import trimesh
    from pipelines import SAR3DPipeline
    pipe = SAR3DPipeline.from_pretrained(vqvae=models / "vqvae", ar=models / "ar", condition="text", device="cpu")
    obj = pipe("a red torus", num_samples=1, seed=3, mesh_resolution=12, frames=4, render_resolution=16)[0]
    obj.save(tmp_path / "py")
    assert run_sample(models, tmp_path / "cli", "--prompt", "a red torus", "--seed", "3", "--no-video") == 0
    cli = tmp_path / "cli" / "a_red_torus_0"
    np.testing.assert_array_equal(obj.tokens, np.load(cli / "tokens.npy"))
    a, b = (trimesh.load(p / "mesh.glb", force="mesh") for p in (tmp_path / "py", cli))
    np.testing.assert_array_equal(a.vertices, b.vertices)
    np.testing.assert_array_equal(a.faces, b.faces)


def test_batched_prompts_draw_what_one_by_one_draws_greedily(models, tmp_path):
    """Several prompts in one batch: greedy draws (top-k 1) do not depend on the random stream,
    so each object's tokens equal those of its prompt sampled alone; sample.py --batch-size
    groups the prompts and names the folders as one by one; int8 samples too."""
    from pipelines import SAR3DPipeline
    from pipelines.sar3d import SamplingConfig
    from sample import plan_batches
    prompts = ["a red torus", "a blue box", "a green cone"]
    greedy = SamplingConfig(top_k=1)
    pipe = SAR3DPipeline.from_pretrained(vqvae=models / "vqvae", ar=models / "ar", condition="text", device="cpu")
    alone = [o.tokens for p in prompts for o in pipe(p, 2, sampling=greedy, mesh=False, frames=0)]
    batch = pipe(prompts, 2, sampling=greedy, mesh=False, frames=0)
    assert len(batch) == 6 and all(np.array_equal(a, b.tokens) for a, b in zip(alone, batch))
    with pytest.raises(ValueError, match="between 1 and 64 objects in one batch"):
        pipe(prompts, 22)
    fast = SAR3DPipeline.from_pretrained(vqvae=models / "vqvae", ar=models / "ar", condition="text", device="cpu",
                                         precision="int8")
    assert fast("a red torus", 2, mesh=False, frames=0)[1].tokens.shape == alone[0].shape
    assert plan_batches(3, None, 8, "sar3d") == (1, 8) and plan_batches(1, None, 16, "argus") == (16, 1)
    assert plan_batches(3, 2, 5, "sar3d") == (2, 2) and plan_batches(3, 4, None, "sar3d") == (4, 1)
    (tmp_path / "p.json").write_text(json.dumps(prompts))
    assert run_sample(models, tmp_path / "cli", "--prompts", str(tmp_path / "p.json"), "--batch-size", "2",
                      "--no-video", "--top-k", "1") == 0
    for k, p in enumerate(prompts):
        np.testing.assert_array_equal(np.load(tmp_path / "cli" / f"{p.replace(' ', '_')}_0" / "tokens.npy"),
                                      alone[2 * k])


def test_a_generator_of_another_vqvae_is_refused_in_one_line(models, tmp_path):
    from models.layout import tokenizer_signature
    from models.vqvae import load_vqvae
    own = tokenizer_signature(load_vqvae(models / "vqvae").quantizer)["fingerprint"]
    cfg = json.loads((models / "ar" / "config.json").read_text())
    cfg.pop("kind")
    for name, change, message in (("other", {"tokenizer": "0" * 16}, "trained on the tokens of another VQVAE"),
                                  ("vocab", {"vocab_size": cfg["vocab_size"] * 2}, "vocab_size"),
                                  ("same", {"tokenizer": own}, None)):
        acfg = ARConfig(**{**cfg, **change})
        save_model(tmp_path / name, NextScaleAR(acfg).state_dict(), to_dict(acfg), "ar")
        argv = [sys.executable, str(ROOT / "sample.py"), "--prompt", "a box", "--vqvae", str(models / "vqvae"),
                "--ar", str(tmp_path / name), "--output-dir", str(tmp_path / f"out_{name}"), "--no-video",
                "--frames", "1", "--render-resolution", "8", "--mesh-resolution", "8"]
        r = subprocess.run(argv, capture_output=True, text=True, timeout=300)
        if message is None:
            assert r.returncode == 0, r.stderr
            continue
        lines = r.stderr.strip().splitlines()
        assert r.returncode == 2 and len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
        assert message in lines[0] and str(models / "vqvae") in lines[0] and str(tmp_path / name) in lines[0]


def test_official_generator_file_samples_directly(models, tmp_path):
    """sample.py --ar FILE.pth with an official-layout file (the generator under trainer/var_wo_ddp,
    with its derived buffers; sizes read from its tensors, here a reduced depth and width) runs to
    a mesh, with the tokens of the same model loaded from our own checkpoint."""
    from tests.test_ar import official_state_of
    ours = json.loads((models / "ar" / "config.json").read_text())
    ours.pop("kind")
    ours.update(depth=2, num_heads=4, patch_nums=tuple(ours["patch_nums"]))
    torch.manual_seed(0)
    model = NextScaleAR(ARConfig(**ours)).eval()
    torch.save({"epoch": 1, "trainer": {"var_wo_ddp": official_state_of(model)}}, tmp_path / "text-condition-ckpt.pth")
    save_model(tmp_path / "ours", model.state_dict(), to_dict(model.cfg), "ar")
    for name, ar in (("official", tmp_path / "text-condition-ckpt.pth"), ("ours", tmp_path / "ours")):
        assert sample.main(["--prompt", "a red torus", "--vqvae", str(models / "vqvae"), "--ar", str(ar),
                            "--text-encoder", ours["encoder"], "--output-dir", str(tmp_path / name), "--no-video",
                            "--render-resolution", "16", "--frames", "2", "--mesh-resolution", "12"]) == 0
    out = tmp_path / "official" / "a_red_torus_0"
    assert (out / "mesh.glb").is_file()
    np.testing.assert_array_equal(np.load(out / "tokens.npy"), np.load(tmp_path / "ours" / "a_red_torus_0" / "tokens.npy"))


def test_no_video_renders_only_the_preview_views(models, tmp_path, monkeypatch):
    """--no-video renders the 8 views preview.png shows instead of all 24 turntable frames (from
    the mesh: no volume rendering), writes no MP4 or GIF, and its preview is the full turntable's."""
    import pipelines.sar3d as sar3d
    from pipelines import Object3D, SAR3DPipeline
    mesh_views, field_views = [], []
    render_views, field_render = sar3d.render_views, TriplaneVQVAE.render

    def count_mesh(mesh, cams, *args, **kw):
        mesh_views.append(len(cams))
        return render_views(mesh, cams, *args, **kw)

    def count_field(self, triplane, c, **kw):
        field_views.append(len(c))
        return field_render(self, triplane, c, **kw)

    monkeypatch.setattr(sar3d, "render_views", count_mesh)
    monkeypatch.setattr(TriplaneVQVAE, "render", count_field)
    assert run_sample(models, tmp_path / "cli", "--prompt", "a red torus", "--no-video", "--frames", "24") == 0
    out = tmp_path / "cli" / "a_red_torus_0"
    assert sum(mesh_views) == 8 and not field_views
    assert not (out / "turntable.mp4").exists() and not (out / "turntable.gif").exists()
    assert Image.open(out / "preview.png").size == (4 * 16, 2 * 16)

    assert Object3D.preview_indices(24) == [0, 3, 6, 9, 12, 15, 18, 21]
    assert Object3D.preview_indices(4) == [0, 1, 2, 3]
    pipe = SAR3DPipeline.from_pretrained(vqvae=models / "vqvae", ar=models / "ar", condition="text", device="cpu")
    kw = dict(seed=2, mesh_resolution=12, frames=24, render_resolution=16)
    full, short = pipe("a red torus", **kw)[0], pipe("a red torus", video=False, **kw)[0]
    assert full.frames.shape == (24, 16, 16, 3) and short.frames.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(short.frames, full.frames[Object3D.preview_indices(24)])
    full.save(tmp_path / "full")
    short.save(tmp_path / "short", video=False)
    assert (tmp_path / "full" / "turntable.mp4").is_file() and not (tmp_path / "short" / "turntable.gif").exists()
    np.testing.assert_array_equal(np.asarray(Image.open(tmp_path / "full" / "preview.png")),
                                  np.asarray(Image.open(tmp_path / "short" / "preview.png")))


def test_mesh_turntable_puts_the_object_where_the_field_render_does(models, capsys):
    """The turntable rasterised from the extracted mesh (the default) and the volume render of the
    same triplane (the tiny VQVAE's density is the whole render cube) agree: same silhouette,
    similar colours, white background; with no mesh the field is rendered."""
    from pipelines import SAR3DPipeline
    pipe = SAR3DPipeline.from_pretrained(vqvae=models / "vqvae", ar=models / "ar", condition="text", device="cpu")
    obj = pipe("a red torus", frames=0, mesh_resolution=24)[0]
    field = pipe.turntable(obj.triplane, 6, 32, mesh=obj.mesh, source="field")
    mesh = pipe.turntable(obj.triplane, 6, 32, mesh=obj.mesh, progress=True)
    assert "6/6" in capsys.readouterr().err
    assert field.shape == mesh.shape == (6, 32, 32, 3) and mesh.dtype == np.uint8
    fg_field, fg_mesh = (field < 250).any(-1), (mesh < 250).any(-1)
    iou = (fg_field & fg_mesh).sum() / (fg_field | fg_mesh).sum()
    assert iou > 0.9, iou
    both = fg_field & fg_mesh
    assert np.abs(field.astype(int) - mesh.astype(int))[both].mean() < 20
    # White background: pure white wherever the field render is, one pixel away from its silhouette.
    near = fg_field.copy()
    for axis in (1, 2):
        for shift in (1, -1):
            near |= np.roll(fg_field, shift, axis)
    assert (mesh[~near] == 255).all() and (~near).mean() > 0.15
    assert (mesh[:, -1, 0] == 255).all() and (mesh[:, -1, -1] == 255).all()      # the bottom corners
    np.testing.assert_array_equal(pipe.turntable(obj.triplane, 6, 32, indices=[4, 1], mesh=obj.mesh), mesh[[4, 1]])
    np.testing.assert_array_equal(pipe.turntable(obj.triplane, 6, 32, indices=[0]), field[:1])   # no mesh: field
    with pytest.raises(ValueError, match="needs a mesh"):
        pipe.turntable(obj.triplane, 2, 16, source="mesh")
    with pytest.raises(ValueError, match="unknown render source"):
        pipe.turntable(obj.triplane, 2, 16, mesh=obj.mesh, source="nerf")
