"""The Argus-3D raster-order GPT: official sizes and names, parity with the reduced official
transformer (official/argus/refs/s2_b_logits), and its sampler (cache, official draw protocol)."""
import json
import math
import zlib

import pytest
import torch

from models.ar import Condition
from models.raster_ar import SHAPENET55, RasterAR, RasterARConfig, convert_official
from tests.official import OFFICIAL_DIR, rel_err

ARGUS = OFFICIAL_DIR / "argus"
needs_argus = pytest.mark.skipif(not (ARGUS / "refs").is_dir(), reason=f"Argus-3D references not found at {ARGUS}")
TINY = RasterARConfig(width=32, depth=2, num_heads=4, vocab_size=64, num_tokens=16, classes=("a", "b", "c"))


def stage2_fill(key: str, shape, norm_keys: set) -> torch.Tensor:
    """The references' fill rule for stage-2 tensors (key with its transformer_model. prefix)."""
    g = torch.Generator("cpu").manual_seed(zlib.crc32(key.encode()))
    if len(shape) == 1:
        mean, std = (1.0, 0.02) if key in norm_keys else (0.0, 0.02)
    else:
        mean, std = 0.0, 1 / math.sqrt(math.prod(shape[1:]))
    return torch.randn(shape, generator=g, dtype=torch.float32) * std + mean


@pytest.fixture(scope="module")
def reduced():
    checks = json.loads((ARGUS / "refs" / "fill_check.json").read_text())
    norm_keys = set(checks["norm_weight_keys"])
    model = RasterAR(RasterARConfig(width=128, depth=2, num_heads=4)).eval()
    state = {k: stage2_fill("transformer_model." + k, tuple(v.shape), norm_keys) for k, v in model.state_dict().items()}
    for k, want in checks["stage2_reduced"].items():
        name = k[len("transformer_model."):]
        if name in state:
            assert state[name].double().sum().item() == pytest.approx(want["sum"], rel=1e-9), k
    official = {**state, "z_value_dec.weight": state["emb.weight"]}
    model.load_state_dict(convert_official(official, model), strict=True)
    return model


def test_the_paper_config_has_the_official_tensors():
    with torch.device("meta"):
        model = RasterAR(RasterARConfig())
    assert sum(p.numel() for p in model.parameters()) == 3_663_104_000
    if (ARGUS / "stage2_keys.json").is_file():
        keys = json.loads((ARGUS / "stage2_keys.json").read_text())["transformer_keys"]
        theirs = {k[len("transformer_model."):]: tuple(s) for k, s, _, _ in keys}
        del theirs["z_value_dec.weight"]
        assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == theirs
    assert model.cfg.classes.index("chair") == 18 and len(SHAPENET55) == 55


@needs_argus
@torch.no_grad()
def test_logits_and_hidden_states_match_the_official(reduced):
    from safetensors.torch import load_file
    r = load_file(str(ARGUS / "refs" / "s2_b_logits.safetensors"))
    hidden = {}
    hooks = [reduced.blocks[0].register_forward_pre_hook(lambda m, a: hidden.__setitem__("x_in", a[0])),
             *[b.register_forward_hook(lambda m, a, o, i=i: hidden.__setitem__(f"block{i}", o))
               for i, b in enumerate(reduced.blocks)],
             reduced.dec.register_forward_hook(lambda m, a, o: hidden.__setitem__("dec", o))]
    logits = reduced(r["tokens"], Condition(labels=r["class_idx"]))
    for h in hooks:
        h.remove()
    assert logits.shape == (2, 1024, 8192)
    for name in ("x_in", "block0", "block1", "dec"):
        assert rel_err(hidden[name], r[f"hidden_{name}"]) < 1e-5, name
    assert rel_err(logits[..., :256], r["logits_vocab0_256"]) < 1e-5
    assert rel_err(logits[:, r["logits_rows_positions"]], r["logits_rows_full"]) < 1e-5
    lse = torch.logsumexp(logits.double(), -1)
    assert rel_err(lse, r["logits_logsumexp"]) < 1e-5
    agree = (logits.argmax(-1) == r["logits_argmax"]).float().mean().item()
    assert agree == 1.0
    step0 = reduced(torch.zeros(2, 1, dtype=torch.long), Condition(labels=r["class_idx"]))
    assert rel_err(step0, r["logits_step0_input_zero"]) < 1e-5


def official_loop(model: RasterAR, labels: torch.Tensor, top_k: int, seed: int) -> torch.Tensor:
    """NOTES §5 written out: full recomputation with a placeholder 0 at step i, logits[:, i],
    top-k keeping ties with the k-th value, softmax, one multinomial per step from one generator."""
    g = torch.Generator().manual_seed(seed)
    x = torch.zeros(len(labels), model.cfg.num_tokens, dtype=torch.long)
    for i in range(model.cfg.num_tokens):
        logits = model(x[:, :i + 1], Condition(labels=labels))[:, i, :]
        v, _ = torch.topk(logits, top_k)
        logits = logits.masked_fill(logits < v[..., -1:], -torch.inf)
        x[:, i] = torch.multinomial(torch.softmax(logits, -1), 1, generator=g)[:, 0]
    return x


@torch.no_grad()
def test_sampler_follows_the_official_protocol_with_and_without_the_cache():
    torch.manual_seed(0)
    model = RasterAR(TINY).eval()
    labels = torch.tensor([0, 2, 1])
    want = official_loop(model, labels, top_k=20, seed=7)
    uncached = model.sample(None, Condition(labels=labels), top_k=20, seed=7, use_cache=False)
    cached = model.sample(None, Condition(labels=labels), top_k=20, seed=7)
    assert torch.equal(uncached, want)
    assert torch.equal(cached, want)
    assert len(set(want.flatten().tolist())) > 5                  # really sampled, not constant


@torch.no_grad()
def test_guided_sampling_cached_equals_uncached_and_needs_condition_dropout():
    torch.manual_seed(1)
    model = RasterAR(TINY, cond_drop=0.1).eval()
    cond = Condition(labels=torch.tensor([1]))
    a = model.sample(None, cond, batch=4, guidance=3.0, top_k=0, top_p=0.9, seed=3)
    b = model.sample(None, cond, batch=4, guidance=3.0, top_k=0, top_p=0.9, seed=3, use_cache=False)
    assert a.shape == (4, 16) and torch.equal(a, b)
    with pytest.raises(ValueError, match="condition dropout"):
        RasterAR(TINY).sample(None, cond, guidance=2.0)


def test_text_model_and_clear_errors():
    model = RasterAR(TINY, condition="text", pooled_dim=12, cond_drop=0.2)
    with pytest.raises(ValueError, match="text-guided"):
        model.sample(None, Condition(labels=torch.tensor([0])))
    out = model.sample(None, Condition(pooled=torch.randn(2, 12)), guidance=1.0, seed=0)
    assert out.shape == (2, 16)
    with pytest.raises(ValueError, match="unknown category 'torus'.*a, b, c"):
        RasterAR(TINY).class_index("torus")


def test_training_pass_drops_conditions_and_the_loss_falls():
    torch.manual_seed(0)
    model = RasterAR(TINY, cond_drop=0.5)
    tokens = torch.randint(0, 64, (6, 16))
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for step in range(30):
        logits = model(tokens, Condition(labels=labels), torch.rand(6))
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.flatten())
        opt.zero_grad()
        loss.backward()
        assert model.null_condition.grad is not None and model.class_embedding.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


def test_activation_checkpointing_gives_the_same_gradients():
    torch.manual_seed(0)
    model = RasterAR(TINY, attn_drop=0.0, resid_drop=0.0, mlp_drop=0.0)
    tokens, cond = torch.randint(0, 64, (3, 16)), Condition(labels=torch.tensor([0, 1, 2]))
    grads, calls = [], []
    model.blocks[0].ln1.register_forward_pre_hook(lambda *_: calls.append(1))
    for on in (False, True):
        model.checkpointing = on
        model.zero_grad()
        calls.clear()
        model(tokens, cond).logsumexp(-1).mean().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        assert len(calls) == (2 if on else 1)            # recomputed in the backward pass
    assert all(torch.allclose(grads[0][n], grads[1][n], atol=1e-6) for n in grads[0])
