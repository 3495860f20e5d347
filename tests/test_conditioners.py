"""Condition encoders: tiny random DINOv2 / CLIP models saved with save_pretrained and loaded
back through load_conditioner, shapes, the official preprocessing, empty embeddings, errors."""
import numpy as np
import pytest
import torch
from PIL import Image

import models.conditioners as conditioners
from models.conditioners import EncoderUnavailable, dino_preprocess, load_conditioner
from scripts.make_random_clip import char_vocab, save_random_clip

DINO_DIM, CLIP_DIM = 32, 16


def save_tiny_dino(path):
    """A 1-layer random DINOv2 (patch 14, width 32) in `path`."""
    from transformers import Dinov2Config, Dinov2Model
    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=DINO_DIM, num_hidden_layers=1, num_attention_heads=2, mlp_ratio=2,
                             image_size=224, patch_size=14)).save_pretrained(path)
    return path


def save_tiny_clip(path, with_tokenizer: bool = True):
    """A 1-layer random CLIP text model (width 16, 77 positions) and its character tokenizer in `path`."""
    return save_random_clip(path, width=CLIP_DIM, layers=1, heads=2, with_tokenizer=with_tokenizer)


@pytest.fixture(scope="module")
def dino_dir(tmp_path_factory):
    return save_tiny_dino(tmp_path_factory.mktemp("dino"))


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return save_tiny_clip(tmp_path_factory.mktemp("clip"))


def test_dino_preprocess_matches_the_official_processor():
    from transformers.models.bit.image_processing_pil_bit import BitImageProcessorPil
    # The facebook/dinov2-large preprocessor settings.
    proc = BitImageProcessorPil(size={"shortest_edge": 256}, crop_size={"height": 224, "width": 224}, resample=3,
                                image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225])
    rng = np.random.default_rng(0)
    for h, w in ((256, 256), (300, 260)):
        noise = Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8))
        ref = proc(images=noise, return_tensors="pt")["pixel_values"]
        ours = dino_preprocess(torch.from_numpy(np.asarray(noise, np.float32) / 255).permute(2, 0, 1)[None])
        assert ours.shape == ref.shape == (1, 3, 224, 224)
        # Exact without a resize. With one, PIL rounds and clips to uint8 after its bicubic: a
        # mean error of 0.006 (a bilinear resize or a shifted crop would be 0.1 and more).
        err = (ours - ref).abs()
        assert err.max() < 1e-5 if h == 256 else err.mean() < 0.01


def test_dino_conditioner_shapes_empty_and_inputs(dino_dir):
    cond = load_conditioner("image", str(dino_dir))
    assert (cond.kind, cond.dim, cond.seq_len) == ("image", DINO_DIM, 256)
    assert not cond.model.training and not any(p.requires_grad for p in cond.model.parameters())
    x = torch.rand(2, 3, 64, 80)
    tokens, pooled = cond.encode(x)
    assert tokens.shape == (2, 256, DINO_DIM) and pooled.shape == (2, DINO_DIM)
    assert tokens.dtype == pooled.dtype == torch.float32 and not tokens.requires_grad
    with torch.no_grad():
        full = cond.model(pixel_values=dino_preprocess(x)).last_hidden_state
    assert torch.allclose(tokens, full[:, 1:], atol=1e-6) and torch.allclose(pooled, full[:, 0], atol=1e-6)
    # A PIL image, a list of any sizes, a single (3, H, W) tensor: the same embeddings.
    pils = [Image.fromarray((x[i].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)) for i in range(2)]
    t_pil, _ = cond.encode(pils)
    t_one, _ = cond.encode(torch.from_numpy(np.asarray(pils[1], np.float32) / 255).permute(2, 0, 1))
    assert t_pil.shape == (2, 256, DINO_DIM) and torch.allclose(t_pil[1:], t_one, atol=1e-5)
    # The unconditional embedding is a white image, as the official (a 128-px white PIL image);
    # a fully transparent image is white too; computed once.
    e_tokens, e_pooled = cond.empty()
    w_tokens, w_pooled = cond.encode(Image.new("RGB", (128, 128), (255, 255, 255)))
    assert e_tokens.shape == (256, DINO_DIM) and e_pooled.shape == (DINO_DIM,)
    assert torch.allclose(e_tokens, w_tokens[0], atol=1e-5) and torch.allclose(e_pooled, w_pooled[0], atol=1e-5)
    clear, _ = cond.encode(Image.new("RGBA", (100, 100), (10, 200, 30, 0)))
    assert torch.allclose(clear[0], e_tokens, atol=1e-5)
    assert cond.empty()[0] is e_tokens
    with pytest.raises(ValueError, match=r"images must be \(B, 3, H, W\)"):
        cond.encode(torch.rand(2, 4, 32, 32))


def test_clip_conditioner_shapes_padding_and_empty(clip_dir):
    cond = load_conditioner("text", str(clip_dir))
    assert (cond.kind, cond.dim, cond.seq_len) == ("text", CLIP_DIM, 77)
    tokens, pooled = cond.encode(["ab", "x" * 200])              # the long one is truncated to 77
    assert tokens.shape == (2, 77, CLIP_DIM) and pooled.shape == (2, CLIP_DIM)
    # Token ids written out by hand: <start> a b</w> <end>, padded with <end> to 77, no mask.
    vocab = char_vocab()
    ids = torch.tensor([[0, vocab["a"], vocab["b</w>"]] + [1] * 74])
    with torch.no_grad():
        ref = cond.model(input_ids=ids)
    assert torch.allclose(tokens[0], ref.last_hidden_state[0], atol=1e-6)
    assert torch.allclose(pooled[0], ref.pooler_output[0], atol=1e-6)
    assert torch.allclose(cond.encode("ab")[0], tokens[:1], atol=1e-6)
    e_tokens, e_pooled = cond.empty()
    with torch.no_grad():
        ref = cond.model(input_ids=torch.tensor([[0] + [1] * 76]))
    assert e_tokens.shape == (77, CLIP_DIM) and e_pooled.shape == (CLIP_DIM,)
    assert torch.allclose(e_tokens, ref.last_hidden_state[0], atol=1e-6)
    assert torch.allclose(e_pooled, ref.pooler_output[0], atol=1e-6)
    assert torch.allclose(cond.encode("")[1][0], e_pooled)


def _one_line(exc_info) -> str:
    msg = str(exc_info.value)
    assert "\n" not in msg
    return msg


def test_load_errors_are_one_line_and_say_where_to_put_the_model(tmp_path, dino_dir, clip_dir, monkeypatch):
    with pytest.raises(EncoderUnavailable) as e:
        load_conditioner("image", str(tmp_path / "nowhere"))
    msg = _one_line(e)
    assert msg.startswith(f"cannot load the DINOv2 image encoder: no directory {tmp_path / 'nowhere'}")
    assert "hf download facebook/dinov2-large --local-dir DIR" in msg and msg.endswith("pass --image-encoder DIR")
    assert isinstance(e.value, FileNotFoundError)                 # utils.cli.run prints it as one line

    # A hub id with no cached copy while the hub is unreachable: fails at once.
    monkeypatch.setattr(conditioners, "_hub_reachable", lambda: False)
    with pytest.raises(EncoderUnavailable) as e:
        load_conditioner("text", "nobody/no-such-clip")
    assert _one_line(e) == ("cannot load the CLIP text encoder 'nobody/no-such-clip': no local copy and the hub is "
                            "unreachable; download it on a machine with internet (hf download nobody/no-such-clip "
                            "--local-dir DIR), copy DIR here and pass --text-encoder DIR")

    # Directories holding something else: an empty one, another model, a model without tokenizer.
    (tmp_path / "empty").mkdir()
    with pytest.raises(EncoderUnavailable, match=r"cannot load the CLIP text encoder from .*empty: .*save_pretrained"):
        load_conditioner("text", str(tmp_path / "empty"))
    with pytest.raises(EncoderUnavailable, match=r"from .*: \d+ weights missing from the checkpoint .*another model"):
        load_conditioner("image", str(clip_dir))
    with pytest.raises(EncoderUnavailable, match=r"the tokenizer has \d+ tokens but the model \d+: tokenizer files"):
        load_conditioner("text", str(save_tiny_clip(tmp_path / "no_tok", with_tokenizer=False)))
    with pytest.raises(ValueError, match="unknown condition kind 'audio'"):
        load_conditioner("audio", str(dino_dir))


def test_half_precision_checkpoint_runs_in_float32(tmp_path):
    from transformers import Dinov2Model
    Dinov2Model.from_pretrained(str(save_tiny_dino(tmp_path / "f32"))).half().save_pretrained(tmp_path / "f16")
    cond = load_conditioner("image", str(tmp_path / "f16"))
    tokens, pooled = cond.encode(torch.rand(1, 3, 224, 224))
    assert cond.model.dtype == tokens.dtype == pooled.dtype == torch.float32


def test_make_random_clip_writes_an_encoder_that_loads_offline(tmp_path, capsys):
    from scripts.make_random_clip import main
    assert main(["--out", str(tmp_path / "clip"), "--width", "16", "--layers", "1"]) == 0
    assert "16-wide, 1-layer" in capsys.readouterr().out
    cond = load_conditioner("text", str(tmp_path / "clip"))
    tokens, pooled = cond.encode(["a red cube", "a blue cube"])
    assert tokens.shape == (2, 77, 16) and pooled.shape == (2, 16)
    assert not torch.allclose(pooled[0], pooled[1])        # the caption changes the embedding


# ----------------------------------------------------------------------------- demo encoders

def save_tiny_bert(path, width: int = 16):
    """A 1-layer random BERT sentence encoder (the all-MiniLM-L6-v2 architecture, tiny) with a
    word-piece tokenizer over a few words, in `path`."""
    from transformers import BertConfig, BertModel, BertTokenizerFast
    path.mkdir(parents=True, exist_ok=True)
    words = "a an red blue green torus box cone sphere tall small large on top of next to".split()
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + words) + "\n")
    BertTokenizerFast(vocab_file=str(path / "vocab.txt")).save_pretrained(path)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=5 + len(words), hidden_size=width, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=2 * width)).save_pretrained(path)
    return path


def test_sentence_conditioner_mean_pools_the_unpadded_word_states(tmp_path):
    cond = load_conditioner("text", str(save_tiny_bert(tmp_path / "bert")))
    assert isinstance(cond, conditioners.SentenceTextConditioner)
    assert (cond.kind, cond.dim, cond.seq_len) == ("text", 16, 32)
    tokens, pooled = cond.encode(["a red torus", "a tall blue box on top of a green cone"])
    assert tokens.shape == (2, 32, 16) and pooled.shape == (2, 16)
    # Reference: the caption alone, no padding at all, mean over its word pieces, unit length.
    for i, text in enumerate(["a red torus", "a tall blue box on top of a green cone"]):
        ids = cond.tokenizer(text, return_tensors="pt")
        with torch.no_grad():
            h = cond.model(**ids).last_hidden_state[0]
        torch.testing.assert_close(tokens[i, :len(h)], h, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(pooled[i], torch.nn.functional.normalize(h.mean(0), dim=0), atol=1e-5, rtol=1e-5)
    assert not torch.allclose(pooled[0], pooled[1])
    assert cond.empty()[0].shape == (32, 16)


def test_mobilenet_conditioner_loads_torchvision_state_dicts(tmp_path):
    from models.mobilenet import MobileNetV2
    torch.manual_seed(0)
    torch.save(MobileNetV2().eval().state_dict(), tmp_path / "mnv2.pth")
    cond = load_conditioner("image", str(tmp_path / "mnv2.pth"))
    assert (cond.kind, cond.dim, cond.seq_len) == ("image", 1280, 49)
    x = torch.rand(2, 3, 64, 64)
    tokens, pooled = cond.encode(x)
    assert tokens.shape == (2, 49, 1280) and pooled.shape == (2, 1280)
    torch.testing.assert_close(pooled, tokens.mean(1), atol=1e-5, rtol=1e-5)
    # A list of images of different sizes: each is resized to 224 alone.
    lt, _ = cond.encode([x[0], torch.nn.functional.interpolate(x[1:], size=(96, 80))[0]])
    torch.testing.assert_close(lt[0], tokens[0])
    # Foreign and truncated files: one line naming the file.
    torch.save({"weight": torch.zeros(3)}, tmp_path / "foreign.pth")
    (tmp_path / "cut.pth").write_bytes((tmp_path / "mnv2.pth").read_bytes()[:1000])
    for name in ("foreign.pth", "cut.pth"):
        with pytest.raises(EncoderUnavailable, match=rf"MobileNetV2 image encoder from .*{name}: "):
            load_conditioner("image", str(tmp_path / name))
    with pytest.raises(ValueError, match="'minilm' is a text encoder, not a image one"):
        load_conditioner("image", "minilm")


@pytest.mark.parametrize("name,kind", [("minilm", "text"), ("mobilenet_v2", "image")])
def test_packaged_demo_encoders_load_offline(name, kind, monkeypatch):
    package = conditioners.PACKAGED[name][0]
    pytest.importorskip(package)
    monkeypatch.setattr(conditioners, "_hub_reachable", lambda: False)
    cond = load_conditioner(kind, name)
    tokens, pooled = cond.encode(["a red torus"] if kind == "text" else torch.rand(1, 3, 64, 64))
    assert pooled.shape == (1, {"text": 384, "image": 1280}[kind]) and torch.isfinite(tokens).all()
    # Without the package: one line that says what to install.
    monkeypatch.setattr(conditioners.importlib, "import_module", lambda m: (_ for _ in ()).throw(ImportError(m)))
    with pytest.raises(EncoderUnavailable, match=r"pip install --no-deps -r requirements-encoders.txt"):
        load_conditioner(kind, name)
