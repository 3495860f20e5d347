"""The 3D captioner (models/captioner.py, train_caption.py, caption.py, evaluation/captions.py) on a
tiny random LLaMA written here: the projected tokens sit where the placeholders were, stage 1
leaves the LLM untouched and stage 2 does not, the loss falls and the captions come back, a saved
captioner answers as the one in memory, resume is exact, two FSDP processes compute the losses of
one, the metrics match hand-computed values, and caption.py's failures are one line."""
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import caption
import train_caption
from datasets.gbuffer import TOKEN_FILES, write_gbuffer_object, write_index
from evaluation.captions import bleu4, caption_scores, cider_d, lcs_length, rouge_l, shape_and_colour
from models.captioner import VICUNA_SYSTEM, Captioner, CaptionerConfig, load_captioner
from models.layout import tokenizer_signature
from models.vqvae import TriplaneVQVAE, VQVAEConfig
from pipelines.caption import CaptionPipeline, object_tokens
from trainers.caption import CaptionRunConfig, CaptionTrainer
from trainers.loop import fit
from utils.checkpoint import save_model
from utils.cli import run
from utils.config import load_config, to_dict
from tests.helpers import torchrun, train_log

ROOT = Path(__file__).resolve().parents[1]
TINY = ROOT / "configs/caption/tiny.yaml"
CAPTIONS = {"box": ["a small red box", "a large red box"], "cone": ["a tall blue cone", "a flat blue cone"],
            "torus": ["a green torus next to a pink sphere", "a thin green torus"]}


def save_tiny_llm(folder: Path) -> Path:
    """A 2-block LLaMA (width 64) and a word-level tokenizer of the words the tests use, with
    BOS added in front as LLaMA's tokenizer does; no chat template (the vicuna_v1_1 layout)."""
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast
    text = " ".join([VICUNA_SYSTEM, "user : assistant give a concise interpretation of the 3d data presented here",
                     "what colour is it", *sum(CAPTIONS.values(), [])])
    words = sorted(set(text.lower().replace(".", " . ").replace("'", " ' ").replace(",", " , ").replace(":", " : ")
                       .split()))
    vocab = {w: i for i, w in enumerate(["<unk>", "<s>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    tok.decoder = decoders.WordPiece()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=len(vocab), hidden_size=64, intermediate_size=128,
                                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=4,
                                         max_position_embeddings=256, bos_token_id=1, eos_token_id=2))
    model.save_pretrained(folder)
    fast.save_pretrained(folder)
    return folder


def save_tiny_vqvae(folder: Path, overrides=()) -> TriplaneVQVAE:
    torch.manual_seed(0)
    cfg = load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml", list(overrides))
    model = TriplaneVQVAE(cfg).eval()
    save_model(folder, model.state_dict(), to_dict(cfg), kind="vqvae")
    return model


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    """(LLM folder, VQVAE folder, token dataset): 3 categories of 2 objects, random ids of the
    tiny VQVAE's layout (255 per object) and a caption each."""
    root = tmp_path_factory.mktemp("caption")
    llm = save_tiny_llm(root / "llm")
    vq = save_tiny_vqvae(root / "vqvae")
    data = root / "data"
    rng = np.random.default_rng(0)
    index = {}
    for cat, captions in CAPTIONS.items():
        index[cat] = []
        for i, text in enumerate(captions):
            d = data / cat / f"{i:04d}"
            d.mkdir(parents=True)
            np.save(d / TOKEN_FILES["gt_BL"], rng.integers(0, 64, 255).astype(np.int64))
            np.save(d / TOKEN_FILES["x_BLCv"], np.zeros((252, 2), np.float32))
            (d / "caption_3dtopia.txt").write_text(text)
            index[cat].append(f"{cat}/{i:04d}")
    write_index(data, index)
    (data / "tokenizer.json").write_text(json.dumps(tokenizer_signature(vq.quantizer)))
    return llm, root / "vqvae", data


def tiny_config(llm) -> CaptionerConfig:
    return CaptionerConfig(llm=str(llm), vocab_size=64, c_vae=2, patch_nums=(1, 2, 4, 8), num_scales=3,
                           hidden=(32, 32), max_new_tokens=16)


def _train(llm, vqvae, data, out, steps, *extra) -> int:
    with pytest.raises(SystemExit) as e:
        run(lambda: train_caption.main(["--config", str(TINY), "--set", f"llm={llm}", "--data-dir", str(data),
                                        "--vqvae", str(vqvae), "--out-dir", str(out), "--max-steps", str(steps),
                                        *extra]))
    return e.value.code


@pytest.fixture(scope="module")
def stage1_run(setup, tmp_path_factory):
    """A stage-1 run of 4 steps (the straight run of the resume test, caption.py's checkpoint)."""
    out = tmp_path_factory.mktemp("runs") / "stage1"
    assert _train(*setup, out, 4) == 0
    return out


def test_point_tokens_replace_the_placeholders_between_start_and_end(setup):
    model = Captioner(tiny_config(setup[0]))
    model.set_codebook(torch.randn(64, 2))
    N = model.num_point_tokens
    assert N == 3 * (1 + 4 + 16)
    ids = torch.randint(0, 64, (2, 255))
    prompt = torch.tensor(model.prompt_ids()).expand(2, -1)
    start, end, patch = model.point_ids
    first = prompt[0].tolist().index(start)
    assert prompt[0, first + 1:first + 1 + N].eq(patch).all() and prompt[0, first + 1 + N] == end
    assert (prompt == patch).sum() == 2 * N
    with torch.no_grad():
        x = model.embed(ids, prompt)
        projected = model.projector(F.normalize(model.codebook, dim=-1)[ids[:, :N]])
        text = model.llm.get_input_embeddings()(prompt)
    assert torch.equal(x[:, first + 1:first + 1 + N], projected)
    assert torch.equal(x[:, first], model.point_embed.weight[0].expand(2, -1).detach())
    assert torch.equal(x[:, first + 1 + N], model.point_embed.weight[1].expand(2, -1).detach())
    others = torch.ones(prompt.shape[1], dtype=torch.bool)
    others[first:first + N + 2] = False
    assert torch.equal(x[:, others], text[:, others])
    tokens = model.tokenizer.convert_ids_to_tokens(model.prompt_ids())
    assert tokens[0] == "<s>" and tokens[first - 2:first] == ["user", ":"] and tokens[-3:] == [".", "assistant", ":"]
    answer = model.answer_ids("a small red box")
    assert answer[-1] == model.tokenizer.eos_token_id and model.tokenizer.decode(answer[:-1]) == "a small red box"
    with pytest.raises(ValueError, match="reads the first 63"):
        model.embed(ids[:, :10], prompt)
    # A tokenizer with a chat template lays the turn out with it; the answer follows the prompt.
    model.tokenizer.chat_template = ("{% for m in messages %}{{ m['role'] }} : {{ m['content'] }} </s>{% endfor %}"
                                     "{% if add_generation_prompt %}assistant :{% endif %}")
    model._heads.clear()
    assert model.tokenizer.convert_ids_to_tokens(model.prompt_ids()[-2:]) == ["assistant", ":"]
    assert model.prompt_ids().count(patch) == N and model.answer_ids("a thin green torus")[-1] == 2


def _step(model, ids, captions, lr=1e-2):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model(ids, captions).backward()
    opt.step()
    return opt


def test_stage_1_trains_the_projector_and_point_rows_only_and_stage_2_everything(setup):
    model = Captioner(tiny_config(setup[0]))
    model.set_codebook(torch.randn(64, 2))
    ids, captions = torch.randint(0, 64, (2, 255)), ["a small red box", "a thin green torus"]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.freeze_llm(1)
    opt = _step(model, ids, captions)
    assert sum(p.numel() for g in opt.param_groups for p in g["params"]) == \
        sum(p.numel() for p in [*model.projector.parameters(), model.point_embed.weight])
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in after if k.startswith("llm."))
    assert all(not torch.equal(before[k], after[k]) for k in after if k.startswith("projector."))
    assert all(not torch.equal(before["point_embed.weight"][i], after["point_embed.weight"][i]) for i in range(2))
    model.freeze_llm(2)
    _step(model, ids, captions)
    changed = [k for k, v in model.state_dict().items() if k.startswith("llm.") and not torch.equal(before[k], v)]
    assert "llm.lm_head.weight" in changed and "llm.model.layers.1.mlp.down_proj.weight" in changed


def test_the_loss_falls_the_captions_come_back_and_a_saved_captioner_answers_the_same(setup, tmp_path):
    llm, vqvae, data = setup
    cfg = load_config(CaptionRunConfig, TINY, [f"llm={llm}", "train.stage=2", "train.lr=1e-2", "train.holdout=1",
                                               "train.max_steps=60", "train.eval_every=60", "train.warmup=0",
                                               "train.hold=1"])
    trainer = CaptionTrainer(cfg, data, vqvae, tmp_path / "run")
    history = fit(trainer, resume=False)["history"]
    assert np.mean([r["loss"] for r in history[-3:]]) < 0.2 * np.mean([r["loss"] for r in history[:3]])
    ids = torch.stack([trainer.train_ds[i]["gt_BL"] for i in range(3)])
    texts = trainer.model.generate(ids)
    assert texts == [CAPTIONS[c][0] for c in ("box", "cone", "torus")]
    loaded = load_captioner(tmp_path / "run")
    assert loaded.generate(ids) == texts
    assert loaded.generate(ids, greedy=False, seed=3) == trainer.model.generate(ids, greedy=False, seed=3)
    metrics = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[-1])
    assert {"val_loss", "bleu4", "rouge_l", "cider_d", "family_acc", "colour_acc", "examples"} <= set(metrics)


def test_resume_gives_the_weights_of_a_straight_run(setup, stage1_run, tmp_path):
    assert _train(*setup, tmp_path / "split", 4, "--stop-at", "2") == 0
    assert _train(*setup, tmp_path / "split", 4, "--resume") == 0
    a, b = (load_file(str(d / "model.safetensors")) for d in (stage1_run, tmp_path / "split"))
    assert a.keys() == b.keys() and not any(k.startswith("llm.") for k in a)      # stage 1: the LLM is the base's
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["loss"] for r in train_log(stage1_run)] == [r["loss"] for r in train_log(tmp_path / "split")]
    # Stage 2 starts from stage 1's weights.
    llm, vqvae, data = setup
    cfg = load_config(CaptionRunConfig, TINY, [f"llm={llm}", "train.stage=2", f"train.init_from={stage1_run}"])
    state = CaptionTrainer(cfg, data, vqvae, tmp_path / "stage2").model.state_dict()
    assert all(torch.equal(state[k], a[k]) for k in a)


def test_two_fsdp_processes_compute_the_losses_of_one(setup, tmp_path):
    llm, vqvae, data = setup
    common = ["--config", str(TINY), "--set", f"llm={llm}", "--data-dir", str(data), "--vqvae", str(vqvae),
              "--batch-size", "4", "--max-steps", "3", "--set", "train.stage=2", "--set", "train.parallel=fsdp",
              "--set", "train.lr=1e-3"]
    with pytest.raises(SystemExit):
        run(lambda: train_caption.main([*common, "--out-dir", str(tmp_path / "one")]))
    torchrun("train_caption.py", [*common, "--out-dir", tmp_path / "two"])
    one, two = train_log(tmp_path / "one"), train_log(tmp_path / "two")
    assert len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert b["loss"] == pytest.approx(a["loss"], rel=1e-4), a["step"]
    w1, w2 = (load_file(str(tmp_path / d / "model.safetensors")) for d in ("one", "two"))
    assert w1.keys() == w2.keys() and any(k.startswith("llm.") for k in w1)
    assert all(torch.allclose(w1[k], w2[k], atol=1e-5) for k in w1)


def test_caption_metrics_match_hand_computed_values():
    cand, ref = "the cat sat on the mat", "the cat is on the mat"
    # Precisions 5/6, 3/5, 1/4, 0/3 -> 0.1/3 (method 1); equal lengths: no brevity penalty.
    assert bleu4([cand], [[ref]]) == pytest.approx((5 / 6 * 3 / 5 * 1 / 4 * 0.1 / 3) ** 0.25)
    # 2 words against 6: 1, 1, 0.1 / 1, 0.1 / 1 (no trigram at all counts 1), penalty exp(1 - 6/2).
    assert bleu4(["the cat"], [[cand]]) == pytest.approx(np.exp(-2) * 0.01 ** 0.25)
    assert bleu4(["dog"], [[cand]]) == 0.0
    # Corpus level: counts summed before the precisions; the closest reference length is taken.
    assert bleu4([cand, cand], [[ref], [cand, "a mat"]]) == pytest.approx(
        ((5 + 6) / 12 * (3 + 5) / 10 * (1 + 4) / 8 * (0 + 3) / 6) ** 0.25)
    assert lcs_length("abcbdab", "bdcaba") == 4
    assert rouge_l([cand], [[ref]]) == pytest.approx(5 / 6)                  # LCS "the cat on the mat"
    assert rouge_l(["red box"], [["a small red box", "a box"]]) == pytest.approx(2 / 3)   # best: 2·1·½/1.5, not ½
    assert rouge_l(["a red box"], [["a small red box"]], beta=1.2) == pytest.approx(
        (1 + 1.44) * 1 * 0.75 / (0.75 + 1.44 * 1))
    # CIDEr-D over 2 objects, every reference n-gram in one document: each weight log 2. Object 1
    # shares "red" of 2 unigrams (cosine 1/2) and no bigram; object 2 equals its reference
    # (cosines 1, 1 and no trigram or 4-gram): (1/2 / 4 + 2 / 4) / 2 x 10.
    assert cider_d(["red cone", "blue ball"], [["red box"], ["blue ball"]]) == pytest.approx(3.125)
    assert cider_d(["a red box"], [["a red box"]]) == 0.0                    # one document: no weights
    assert shape_and_colour(["a red box", "a small green cone", "a pink sphere next to a red cone"],
                            ["a small red box", "a blue box", "a red cone next to a pink sphere"]) == \
        {"family_acc": 2 / 3, "colour_acc": 2 / 3}
    scores = caption_scores([cand], [[cand]])
    assert scores["bleu4"] == pytest.approx(1.0) and scores["rouge_l"] == 1.0 and "family_acc" not in scores
    with pytest.raises(ValueError, match="one list"):
        bleu4([cand], [])


def test_caption_py_captions_objects_tokens_and_meshes(setup, stage1_run, tmp_path, capsys):
    import trimesh
    from datasets.builder import RenderConfig, camera_rig
    from datasets.precompute import precompute
    from models.vqvae import load_vqvae
    from renderers.mesh_render import ColoredMesh, render_views
    _, vqvae, data = setup
    box = tmp_path / "box.obj"
    m = trimesh.creation.box(extents=(0.6, 0.4, 0.3))
    m.export(box)
    views = tmp_path / "views"                                     # a G-buffer object without token files
    cams = camera_rig(RenderConfig(res=16))
    r = render_views(ColoredMesh(m.vertices.astype(np.float32), m.faces, np.full((8, 3), 0.7, np.float32)), cams, 16)
    write_gbuffer_object(views / "box" / "0000", r["rgb"], r["alpha"], r["depth"], r["normal"], cams, "a box", "b")
    write_index(views, {"box": ["box/0000"]})
    tokens = tmp_path / "tokens.npy"
    np.save(tokens, np.load(data / "box" / "0000" / TOKEN_FILES["gt_BL"]))
    args = ["--ckpt", str(stage1_run), "--vqvae", str(vqvae), "--object", str(data / "box" / "0000"),
            "--object", str(views / "box" / "0000"), "--tokens", str(tokens), "--mesh", str(box), "--device", "cpu"]
    assert caption.main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    names = [str(data / "box" / "0000"), str(views / "box" / "0000"), str(tokens), str(box)]
    assert [line.split(": ")[0] for line in lines] == names
    assert lines[0].split(": ", 1)[1] == lines[2].split(": ", 1)[1]      # the same ids, the same caption
    folder = tmp_path / "meshes"                                    # a folder: each mesh file in it, sorted
    folder.mkdir()
    m.export(folder / "b.ply")
    (folder / "a.obj").write_bytes(box.read_bytes())
    (folder / "notes.txt").write_text("not a mesh")
    assert caption.main(["--ckpt", str(stage1_run), "--vqvae", str(vqvae), "--mesh", str(folder), "--device", "cpu"]) == 0
    again = capsys.readouterr().out.strip().splitlines()
    assert [line.split(": ")[0] for line in again] == [str(folder / "a.obj"), str(folder / "b.ply")]
    assert again[0].split(": ", 1)[1] == lines[3].split(": ", 1)[1]
    pipe = CaptionPipeline.from_pretrained(stage1_run, vqvae)          # the web demo's way: the same caption
    assert pipe.caption_mesh(folder / "a.obj") == again[0].split(": ", 1)[1]
    # Views are encoded as scripts/precompute.py encodes them.
    vq = load_vqvae(vqvae)
    encoded = object_tokens(views / "box" / "0000", vq, tokenizer_signature(vq.quantizer)["fingerprint"], (63, 255))
    precompute(views, vqvae, batch_size=1)
    assert torch.equal(encoded, torch.from_numpy(np.load(views / "box" / "0000" / TOKEN_FILES["gt_BL"])))


def test_eval_captions_scores_the_held_out_objects(setup, stage1_run, tmp_path, capsys):
    """scripts/eval_captions.py captions the last --holdout objects of each category, greedily, and
    writes what caption.py says of the same ids with the scores of evaluation/captions.py."""
    from scripts.eval_captions import main as eval_captions
    _, vqvae, data = setup
    out = tmp_path / "eval.json"
    assert eval_captions(["--ckpt", str(stage1_run), "--data-dir", str(data), "--holdout", "1", "--batch-size", "2",
                          "--device", "cpu", "--out", str(out)]) == 0
    report = json.loads(out.read_text())
    held = [f"{cat}/0001" for cat in CAPTIONS]
    assert report["num_objects"] == 3 and [o["object"] for o in report["per_object"]] == held
    assert [o["reference"] for o in report["per_object"]] == [c[1] for c in CAPTIONS.values()]
    captions = [o["caption"] for o in report["per_object"]]
    assert report["scores"] == caption_scores(captions, [[c[1]] for c in CAPTIONS.values()])
    capsys.readouterr()
    assert caption.main(["--ckpt", str(stage1_run), "--vqvae", str(vqvae), "--device", "cpu",
                         *[a for h in held for a in ("--object", str(data / h))]]) == 0
    assert [line.split(": ", 1)[1] for line in capsys.readouterr().out.strip().splitlines()] == captions


def _one_line_error(args, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        run(lambda: caption.main(args))
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def test_caption_py_failures_are_one_line(setup, stage1_run, tmp_path, capsys):
    _, vqvae, data = setup
    tokens = ["--tokens", str(data / "box" / "0000" / TOKEN_FILES["gt_BL"])]
    err = _one_line_error(["--ckpt", str(stage1_run), "--vqvae", str(vqvae), "--llm", str(tmp_path / "gone"),
                           *tokens], capsys)
    assert "no language model folder" in err and str(tmp_path / "gone") in err and "--llm" in err
    save_tiny_vqvae(tmp_path / "vq32", ["quantizer.vocab_size=32"])
    err = _one_line_error(["--ckpt", str(stage1_run), "--vqvae", str(tmp_path / "vq32"), *tokens], capsys)
    assert "vocab_size" in err and "vq32" in err
    torch.manual_seed(1)
    other = TriplaneVQVAE(load_config(VQVAEConfig, ROOT / "configs/vqvae/tiny.yaml"))
    save_model(tmp_path / "other", other.state_dict(), to_dict(other.cfg), kind="vqvae")
    err = _one_line_error(["--ckpt", str(stage1_run), "--vqvae", str(tmp_path / "other"), *tokens], capsys)
    assert "another VQVAE" in err
    bad = tmp_path / "broken.glb"
    bad.write_bytes(b"glTF\x02\x00\x00\x00garbage")
    err = _one_line_error(["--ckpt", str(stage1_run), "--vqvae", str(vqvae), "--mesh", str(bad)], capsys)
    assert "broken.glb" in err and "mesh" in err
    err = _one_line_error(["--ckpt", str(tmp_path / "nothing"), "--vqvae", str(vqvae), *tokens], capsys)
    assert "nothing" in err
    (tmp_path / "empty").mkdir()
    err = _one_line_error(["--ckpt", str(stage1_run), "--vqvae", str(vqvae), "--mesh", str(tmp_path / "empty")], capsys)
    assert "no mesh files" in err and "empty" in err


def test_id_noise_is_a_function_of_seed_step_and_position():
    """train.id_noise: about the asked share of ids replaced, the same draw for the same (seed,
    step, sample position) whatever the batch it sits in (resume, several processes)."""
    from trainers.caption import noisy_ids
    ids = torch.arange(2000).reshape(4, 500) % 100
    a = noisy_ids(ids, torch.tensor([0, 1, 2, 3]), 0.2, 100, seed=0, step=5)
    changed = (a != ids).float().mean()
    assert 0.1 < changed < 0.25 and a.max() < 100                   # a random id may equal the old one
    assert torch.equal(noisy_ids(ids[2:], torch.tensor([2, 3]), 0.2, 100, 0, 5), a[2:])
    assert not torch.equal(noisy_ids(ids, torch.tensor([0, 1, 2, 3]), 0.2, 100, 0, 6), a)
    assert torch.equal(noisy_ids(ids, torch.tensor([0, 1, 2, 3]), 0.0, 100, 0, 5), ids)
