"""scripts/precompute.py on the tiny dataset with a random tiny VQVAE and tiny DINOv2 / CLIP:
file names, shapes and dtypes, the AR token order, read-back, resuming, one-line errors."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from datasets.gbuffer import (CONDITION_FILES, EMPTY_FILES, IMAGE_VARIANT_FILE, TEXT_VARIANT_FILES, TOKEN_FILES,
                             GBufferDataset, dino_view, read_caption_variants, read_gbuffer_object)
from models.inputs import encoder_input, input_view_sets
from models.conditioners import load_conditioner
from models.vqvae import TriplaneVQVAE, VQVAEConfig
from models.layout import planes_to_sequence, sequence_to_planes
from scripts.precompute import main
from tests.test_conditioners import CLIP_DIM, DINO_DIM, save_tiny_clip, save_tiny_dino
from tests.helpers import make_tiny_dataset
from utils.checkpoint import save_model
from utils.cli import run
from utils.config import load_config, to_dict

ROOT = Path(__file__).resolve().parents[1]
TINY = load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml")
# One more encoder level: 32 px views, the size of the tiny dataset, so nothing is resized.
TINY32 = load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml", ["encoder.ch_mult=[1, 2, 2]"])
ALL_FILES = [*TOKEN_FILES.values(), *CONDITION_FILES["image"].values(), *CONDITION_FILES["text"].values()]


def _save_vqvae(path, cfg, seed=0):
    torch.manual_seed(seed)
    model = TriplaneVQVAE(cfg).eval()
    save_model(path, model.state_dict(), to_dict(cfg), kind="vqvae")
    return model


@pytest.fixture
def data(shapes_root, tmp_path):
    """A private copy of the tiny dataset: precompute writes into the object folders."""
    return Path(shutil.copytree(shapes_root, tmp_path / "data"))


@pytest.fixture(scope="module")
def encoders(tmp_path_factory):
    root = tmp_path_factory.mktemp("encoders")
    return str(save_tiny_dino(root / "dino")), str(save_tiny_clip(root / "clip"))


def test_encoder_input_size():
    assert VQVAEConfig().input_size == 256 and TINY.input_size == 16 and TINY32.input_size == 32


def test_precompute_writes_the_official_files_in_the_ar_order(data, encoders, tmp_path, capsys):
    vqvae = _save_vqvae(tmp_path / "vqvae", TINY32)
    dino, clip = encoders
    args = ["--data-dir", str(data), "--vqvae", str(tmp_path / "vqvae"), "--image-encoder", dino,
            "--text-encoder", clip, "--batch-size", "3", "--device", "cpu"]
    assert main(args) == 0
    assert "wrote 10 objects (0 already done)" in capsys.readouterr().out

    pn = TINY32.quantizer.patch_nums                       # (1, 2, 4, 8): 85 tokens per plane
    L = sum(p * p for p in pn)
    image_cond, text_cond = load_conditioner("image", dino), load_conditioner("text", clip)
    views = GBufferDataset(data, split="all")
    tokens = GBufferDataset(data, split="all", mode="tokens", condition="image")
    texts = GBufferDataset(data, split="all", mode="tokens", condition="text")
    for i in range(len(views)):
        s = views[i]
        d = Path(s["path"])
        assert not list(d.glob("*.tmp"))
        gt = np.load(d / TOKEN_FILES["gt_BL"])
        x = np.load(d / TOKEN_FILES["x_BLCv"])
        emb = np.load(d / CONDITION_FILES["image"]["tokens_and_pooled"])
        t_tok, t_pool = (np.load(d / CONDITION_FILES["text"][k]) for k in ("tokens", "pooled"))
        assert gt.shape == (3 * L,) and gt.dtype == np.int64
        assert x.shape == (3 * (L - 1), 2) and x.dtype == np.float32
        assert emb.shape == (257, DINO_DIM) and emb.dtype == np.float32
        assert t_tok.shape == (77, CLIP_DIM) and t_pool.shape == (CLIP_DIM,) and t_tok.dtype == np.float32

        # Tokens of views 0 and 3 (set 0 for 2 encoder views), this object alone; per scale
        # plane 0, plane 1, plane 2.
        v = input_view_sets(2)[0]
        with torch.no_grad():
            idx = vqvae.tokenize(encoder_input(s["rgb"][v], s["plucker"][v], s["depth"][v]))
            var_in = vqvae.quantizer.idx_to_var_input(idx)      # (3, L - 1, C), scales per plane
        off = x_off = 0
        for si, p in enumerate(pn):
            for plane in range(3):
                assert np.array_equal(gt[off + plane * p * p: off + (plane + 1) * p * p], idx[si][plane].numpy())
                if si > 0:
                    rows = x[x_off + plane * p * p: x_off + (plane + 1) * p * p]
                    src = var_in[plane, x_off // 3: x_off // 3 + p * p].numpy()
                    assert np.allclose(rows, src, atol=1e-6)
            off += 3 * p * p
            x_off += 3 * p * p if si > 0 else 0

        # DINO of view (id % 4) + 1 (folder names are numbers), stored [pooled; patch tokens].
        e_tok, e_pool = image_cond.encode(s["rgb"][int(d.name) % 4 + 1])
        assert np.allclose(emb[0], e_pool[0].numpy(), atol=1e-5) and np.allclose(emb[1:], e_tok[0].numpy(), atol=1e-5)
        c_tok, c_pool = text_cond.encode(s["caption"])
        assert np.allclose(t_tok, c_tok[0].numpy(), atol=1e-5) and np.allclose(t_pool, c_pool[0].numpy(), atol=1e-5)
        # Every caption of caption_variants.json (make_shapes wrote 8, the caption first).
        variants = read_caption_variants(d)
        v_tok, v_pool = (np.load(d / TEXT_VARIANT_FILES[k]) for k in ("tokens", "pooled"))
        e_tok, e_pool = text_cond.encode(variants)
        assert len(variants) == 8 and variants[0] == s["caption"] and v_tok.shape == (8, 77, CLIP_DIM)
        assert np.allclose(v_tok, e_tok.numpy(), atol=1e-5) and np.allclose(v_pool, e_pool.numpy(), atol=1e-5)
        assert np.allclose(v_pool[0], t_pool, atol=1e-5)

        # What the AR model reads back.
        r = tokens[i]
        assert torch.equal(r["gt_BL"], torch.from_numpy(gt)) and torch.equal(r["x_BLCv"], torch.from_numpy(x))
        assert torch.equal(r["cond_tokens"], torch.from_numpy(emb[1:])) and r["cond_pooled"].shape == (DINO_DIM,)
        r = texts[i]
        assert r["cond_tokens"].shape == (77, CLIP_DIM) and torch.equal(r["cond_pooled"], torch.from_numpy(t_pool))

    # The unconditional embeddings at the root, as the official files/: image [pooled; tokens].
    for kind, cond in (("image", image_cond), ("text", text_cond)):
        tok, pool = (x.numpy() for x in cond.empty())
        seq, pooled = (np.load(data / name) for name in EMPTY_FILES[kind])
        assert np.allclose(seq, np.concatenate([pool[None], tok]) if kind == "image" else tok, atol=1e-5)
        assert np.allclose(pooled, pool, atol=1e-5)


def test_all_views_give_the_image_variants(data, encoders, tmp_path, capsys):
    """--all-views: every view's [pooled; tokens] in one file, the official view among them, read
    back as the image generator's condition variants."""
    _save_vqvae(tmp_path / "vqvae", TINY32)
    dino, _ = encoders
    args = ["--data-dir", str(data), "--vqvae", str(tmp_path / "vqvae"), "--image-encoder", dino, "--device", "cpu"]
    assert main(args + ["--all-views"]) == 0
    variants = GBufferDataset(data, split="all", mode="tokens", condition="image_variants")
    for i, (rel, _) in enumerate(variants.items):
        d = data / rel
        emb = np.load(d / IMAGE_VARIANT_FILE)
        assert emb.shape == (12, 257, DINO_DIM)
        assert np.allclose(emb[dino_view(d)], np.load(d / CONDITION_FILES["image"]["tokens_and_pooled"]), atol=1e-5)
        r = variants[i]
        assert torch.equal(r["cond_tokens_variants"], torch.from_numpy(emb[:, 1:]))
        assert torch.equal(r["cond_pooled_variants"], torch.from_numpy(emb[:, 0]))
    capsys.readouterr()
    assert "--image-encoder" in _cli_error(args[:4] + ["--all-views"], capsys)

    # The same objects upright, conditioned on the views of the turned ones: the same embeddings.
    upright = make_tiny_dataset(tmp_path / "upright", extra=["--upright"])
    assert main(["--data-dir", str(upright), "--vqvae", str(tmp_path / "vqvae"), "--image-encoder", dino,
                 "--all-views", "--views-from", str(data), "--device", "cpu"]) == 0
    for rel, _ in variants.items:
        for name in (IMAGE_VARIANT_FILE, CONDITION_FILES["image"]["tokens_and_pooled"]):
            assert np.array_equal(np.load(upright / rel / name), np.load(data / rel / name))
    assert any(not np.array_equal(read_gbuffer_object(upright / rel)["rgb"], read_gbuffer_object(data / rel)["rgb"])
               for rel, _ in variants.items)


def test_precompute_resumes_and_overwrites(data, encoders, tmp_path, capsys, caplog):
    _save_vqvae(tmp_path / "vqvae", TINY)                   # 16 px input: the 32 px views are resized
    dino, clip = encoders
    args = ["--data-dir", str(data), "--vqvae", str(tmp_path / "vqvae"), "--batch-size", "4", "--device", "cpu"]
    with caplog.at_level("INFO"):
        assert main(args) == 0
    assert "views of 32 px, the VQVAE encodes 16 px: resizing them" in caplog.text
    objs = [data / rel for rel, _ in GBufferDataset(data, split="all").items]
    assert all((d / f).is_file() for d in objs for f in TOKEN_FILES.values())
    assert not any((d / f).exists() for d in objs for f in ALL_FILES[2:])
    capsys.readouterr()

    def stamps():
        return {d / f: (d / f).stat().st_mtime_ns for d in objs for f in ALL_FILES if (d / f).exists()}

    # Adding the text embeddings writes only them; the tokens stay untouched.
    before = stamps()
    assert main(args + ["--text-encoder", clip]) == 0
    assert "wrote 10 objects (0 already done)" in capsys.readouterr().out
    after = stamps()
    assert all(after[f] == t for f, t in before.items()) and len(after) == 10 * 4

    # Nothing missing: nothing written. One file missing: that object's text files only.
    assert main(args + ["--text-encoder", clip]) == 0
    assert "nothing to do: all 10 objects" in capsys.readouterr().out and stamps() == after
    lost = objs[3] / CONDITION_FILES["text"]["pooled"]
    kept = np.load(lost)
    lost.unlink()
    assert main(args + ["--text-encoder", clip]) == 0
    assert "wrote 1 objects (9 already done)" in capsys.readouterr().out
    assert np.array_equal(np.load(lost), kept)
    assert {f for f, t in stamps().items() if t != after[f]} == {objs[3] / f for f in CONDITION_FILES["text"].values()}

    # --overwrite redoes every object with what it was given (here the image embeddings too).
    assert main(args + ["--image-encoder", dino, "--overwrite"]) == 0
    assert "wrote 10 objects (0 already done)" in capsys.readouterr().out
    final = stamps()
    assert len(final) == 10 * 5 and all(final[d / f] != after[d / f] for d in objs for f in TOKEN_FILES.values())


def _cli_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run(lambda: main(argv))
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2 and "\n" not in err and err.startswith("error: "), err
    return err


def test_missing_vqvae_or_encoder_is_one_line(data, tmp_path, capsys):
    base = ["--data-dir", str(data), "--device", "cpu"]
    err = _cli_error(base + ["--vqvae", str(tmp_path / "none")], capsys)
    assert f"no checkpoint at {tmp_path / 'none'}" in err
    _save_vqvae(tmp_path / "vqvae", TINY)
    err = _cli_error(base + ["--vqvae", str(tmp_path / "vqvae"), "--image-encoder", str(tmp_path / "dino")], capsys)
    assert f"cannot load the DINOv2 image encoder: no directory {tmp_path / 'dino'}" in err
    assert "pass --image-encoder DIR" in err
    err = _cli_error(["--data-dir", str(tmp_path / "nodata"), "--vqvae", str(tmp_path / "vqvae")], capsys)
    assert "dataset.json: missing file" in err
    assert not any(Path(data).rglob(TOKEN_FILES["gt_BL"]))


def test_sequence_to_planes_inverts_planes_to_sequence():
    pn = (1, 2, 3)
    per_scale = [torch.randint(0, 100, (6, p * p)) for p in pn]       # 2 objects x 3 planes
    seq = planes_to_sequence(per_scale)
    assert seq.shape == (2, 3 * 14) and torch.equal(seq[1, 3:7], per_scale[1][3])   # scale 1, object 1, plane 0
    assert all(torch.equal(a, b) for a, b in zip(sequence_to_planes(seq, pn), per_scale))
    with pytest.raises(ValueError, match="expected 42"):
        sequence_to_planes(seq[:, :-1], pn)


def test_eval_prompts_reconstruct_checks_the_held_out_objects_own_tokens(data, tmp_path):
    from datasets.errors import DatasetError
    from datasets.gbuffer import load_index, read_text
    from datasets.shapes import FAMILIES, PALETTE
    from scripts.eval_prompts import main as eval_prompts
    _save_vqvae(tmp_path / "vqvae", TINY32)
    args = ["--reconstruct", "--data-dir", str(data), "--holdout", "1", "--vqvae", str(tmp_path / "vqvae"),
            "--mesh-resolution", "12", "--device", "cpu", "--out-dir", str(tmp_path / "eval")]
    with pytest.raises(DatasetError, match=TOKEN_FILES["gt_BL"]):     # no tokens yet
        eval_prompts(args)
    with pytest.raises(FileNotFoundError, match="--vqvae: no checkpoint at"):
        eval_prompts([*args, "--vqvae", str(tmp_path / "missing")])
    assert main(["--data-dir", str(data), "--vqvae", str(tmp_path / "vqvae"), "--device", "cpu"]) == 0
    assert eval_prompts(args) == 0
    index = load_index(data)
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["per_object"]
    assert [(r["prompt"], r["family"]) for r in results] == \
        [(read_text(data / index[f][-1] / "caption_3dtopia.txt"), f) for f in FAMILIES if f in index]
    assert all(r["colour"] in PALETTE and r["colour"] in r["prompt"] for r in results)
