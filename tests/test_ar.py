import pytest
import torch

from models.ar import ARConfig, Condition, NextScaleAR, convert_official, load_ar, sample_top_k_top_p
from models.ar_blocks import KVCache
from models.quantizer import TriplaneQuantizer
from tests.official import fill, key_table, needs_official, reference, rel_err
from utils.checkpoint import CheckpointError, ConversionError, save_model
from utils.config import to_dict

PN = (1, 2, 4)
V, CV = 64, 4


def tiny(condition="image", **kw) -> NextScaleAR:
    torch.manual_seed(0)
    base = dict(depth=2, width=32, num_heads=4, pooled_dim=16, seq_dim=12, patch_nums=PN, vocab_size=V, c_vae=CV)
    if condition == "text":
        base["cross_attn"] = "after_self"
    elif condition in ("class", "none"):
        base.update(cross_attn="none", num_classes=5 if condition == "class" else 0)
    return NextScaleAR(ARConfig(condition=condition, **{**base, **kw}))


def quantizer() -> TriplaneQuantizer:
    torch.manual_seed(1)
    return TriplaneQuantizer(vocab_size=V, c_vae=CV, patch_nums=PN, official_quirks=False).eval()


def condition(B=2, seed=2) -> Condition:
    g = torch.Generator().manual_seed(seed)
    return Condition(pooled=torch.randn(B, 16, generator=g), tokens=torch.randn(B, 7, 12, generator=g))


def uncond() -> Condition:
    return Condition(pooled=torch.zeros(16), tokens=torch.full((7, 12), 0.1))


def teacher_input(B=2, seed=3) -> torch.Tensor:
    L = 3 * sum(p * p for p in PN)
    return torch.randn(B, L - 3, CV, generator=torch.Generator().manual_seed(seed))


# ---- official checkpoints --------------------------------------------------------------------

@needs_official
@pytest.mark.parametrize("table, cfg", [
    ("var_image", dict(condition="image", depth=24)),
    ("var_text", dict(condition="text", depth=16, pooled_dim=768, seq_dim=768, cross_attn="after_self")),
])
def test_official_tables_convert_and_load_strictly(table, cfg):
    with torch.device("meta"):
        model = NextScaleAR(ARConfig(**cfg))
    state = {k: torch.empty(shape, device="meta") for k, shape, _, _ in key_table(table)}
    ours = convert_official(state, model)
    model.load_state_dict(ours, strict=True, assign=True)
    assert sum(p.numel() for p in model.parameters()) == sum(
        torch.Size(s).numel() for _, s, _, kind in key_table(table) if kind == "param")
    gone = "blocks.3.cross_attn.mat_kv.weight"
    with pytest.raises(ConversionError, match=f"missing tensor '{gone}'"):
        convert_official({k: v for k, v in state.items() if k != gone}, model)
    with pytest.raises(ConversionError, match="'head.weight' has shape"):
        convert_official({**state, "head.weight": torch.empty(3, 3, device="meta")}, model)


@needs_official
def test_depth2_image_model_reproduces_official_reference():
    ref = reference("var_image")
    model = NextScaleAR(ARConfig(condition="image", depth=2, cond_drop=0.0)).eval()
    state = {k: fill(k, p.shape) for k, p in model.named_parameters()}
    model.load_state_dict({**model.state_dict(), **state}, strict=True)   # buffers: the zero k biases
    cond = Condition(pooled=ref["pooler_output"], tokens=ref["dino_condition"])
    with torch.no_grad():
        cond_BD, k_v = model.embed_condition(cond)
        x = torch.cat((model.start_tokens(cond_BD), model.word_embed(ref["x_BLCv_wo_first_l"])), 1) + model.positions()
        assert rel_err(cond_BD, ref["cond_BD"]) <= 1e-5
        assert rel_err(x, ref["x_embed"]) <= 1e-5
        h0 = model.blocks[0](x, cond_BD, k_v[0], model.mask_LL)
        assert rel_err(h0, ref["h_block0"]) <= 1e-5
        h = model.blocks[1](h0, cond_BD, k_v[1], model.mask_LL)
        assert rel_err(h, ref["h_final"]) <= 1e-5
        logits = model(ref["x_BLCv_wo_first_l"], cond)
    assert rel_err(logits[0, :, ref["cols"]], ref["logits_cols"][0]) <= 1e-5
    assert rel_err(logits[0, ref["rows"]], ref["logits_rows"]) <= 1e-5
    assert rel_err(logits.logsumexp(-1), ref["logsumexp"]) <= 1e-5
    assert (logits.argmax(-1) == ref["argmax"]).float().mean() > 0.999


# ---- model behaviour -------------------------------------------------------------------------

def test_text_block_order_is_self_cross_ffn():
    """The text block, recomposed by hand from its parts in the official order, gives its output exactly."""
    model = tiny("text").eval()
    b = model.blocks[0]
    x = torch.randn(2, 9, 32)
    cond_BD, k_v = model.embed_condition(condition())
    g1, g2, s1, s2, b1, b2 = b.ada_lin(cond_BD).view(-1, 1, 6, 32).unbind(2)
    with torch.no_grad():
        h = x + b.attn(b.ln_wo_grad(x) * (1 + s1) + b1, None) * g1
        h = h + b.cross_attn(b.prenorm_ca_dino(h), k_v[0])
        h = h + b.ffn(b.ln_wo_grad(h) * (1 + s2) + b2) * g2
        assert torch.equal(b(x, cond_BD, k_v[0], None), h)
        # the image block runs cross-attention first: a different function of the same weights
        b.cross = "first"
        assert not torch.allclose(b(x, cond_BD, k_v[0], None), h)


@pytest.mark.parametrize("kind", ["image", "text", "class"])
def test_logits_of_a_scale_ignore_later_scales(kind):
    model = tiny(kind).eval()
    cond = Condition(labels=torch.tensor([1, 3])) if kind == "class" else condition()
    x = teacher_input()
    later = 3 * (1 + 4)            # scales 0 and 1 are the first 15 tokens; x holds scale 2 from index 12
    y = x.clone()
    y[:, 18:] += 1.0               # change part of scale 2's input
    with torch.no_grad():
        a, b = model(x, cond), model(y, cond)
    assert torch.equal(a[:, :later], b[:, :later])
    assert not torch.allclose(a[:, later:], b[:, later:])


def test_gradients_reach_every_parameter_and_loss_falls():
    model = tiny("text", drop_path=0.0)
    x, cond = teacher_input(), condition()
    target = torch.randint(0, V, (2, 3 * 21), generator=torch.Generator().manual_seed(4))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(30):
        loss = torch.nn.functional.cross_entropy(model(x, cond).flatten(0, 1), target.flatten())
        opt.zero_grad()
        loss.backward()
        if not losses:
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0]


@pytest.mark.parametrize("kind", ["image", "text", "class", "none"])
def test_cached_sampling_equals_uncached(kind):
    model, q = tiny(kind), quantizer()
    if kind in ("class", "none"):
        cond, u = Condition(labels=torch.tensor([0, 4])) if kind == "class" else Condition(), None
    else:
        cond, u = condition(), uncond()
    kw = dict(batch=2, guidance=2.0, top_k=20, top_p=0.9, seed=7)
    a = model.sample(q, cond, u, use_cache=True, **kw)
    b = model.sample(q, cond, u, use_cache=False, **kw)
    c = model.sample(q, cond, u, use_cache=True, static_cache=True, **kw)
    assert [t.shape for t in a] == [(6, 1), (6, 4), (6, 16)]
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert all(torch.equal(x, y) for x, y in zip(a, c))


def test_static_cache_fills_its_buffers_and_refuses_overflow():
    cache = KVCache(capacity=5)
    k = torch.randn(1, 2, 3, 4)
    a, _ = cache.update(0, k, k)
    b, _ = cache.update(0, 2 * k[:, :, :2], k[:, :, :2])
    assert cache.k[0].shape == (1, 2, 5, 4) and torch.equal(b, torch.cat((k, 2 * k[:, :, :2]), 2))
    with pytest.raises(ValueError, match="capacity 5"):
        cache.update(0, k, k)


def test_int8_sampling_quantizes_every_linear_and_keeps_most_tokens():
    from models.precision import linear, set_precision
    model, q = tiny("text", width=64, num_heads=4), quantizer()
    x, bias = torch.randn(3, 64), torch.randn(192)
    assert torch.equal(linear(model.blocks[0].attn.mat_qkv, x, bias),
                       torch.nn.functional.linear(x, model.blocks[0].attn.mat_qkv.weight, bias))
    kw = dict(guidance=2.0, top_k=1, seed=3)               # greedy: the draws follow the logits alone
    ref = model.sample(q, condition(4), uncond(), **kw)
    with pytest.raises(ValueError, match="CPU path"):
        set_precision(model, "int8", "cuda")
    fast = set_precision(model, "int8", "cpu")
    assert not any(type(m) is torch.nn.Linear for m in fast.modules()) and not fast.exact_draws
    out = fast.sample(q, condition(4), uncond(), **kw)
    assert [t.shape for t in out] == [t.shape for t in ref]
    agree = torch.cat([(a == b).flatten() for a, b in zip(out, ref)]).float().mean()
    assert agree > 0.5, agree


def test_same_seed_same_object_and_eval_mode_always():
    model, q = tiny("image", drop_path=0.5), quantizer()      # drop-path would randomise a training-mode model
    model.train()
    a = model.sample(q, condition(), uncond(), guidance=3.0, seed=11)
    b = model.sample(q, condition(), uncond(), guidance=3.0, seed=11)
    c = model.sample(q, condition(), uncond(), guidance=3.0, seed=12)
    assert model.training
    assert all(torch.equal(x, y) for x, y in zip(a, b))
    assert not all(torch.equal(x, y) for x, y in zip(a, c))


def test_guidance_zero_is_the_conditional_model():
    model, q = tiny("image"), quantizer()
    guided = model.sample(q, condition(), uncond(), guidance=0.0, seed=5)      # doubled batch, t = 0
    alone = model.sample(q, condition(), None, guidance=0.0, seed=5)
    assert all(torch.equal(x, y) for x, y in zip(guided, alone))
    with pytest.raises(ValueError, match="unconditional embedding"):
        model.sample(q, condition(), None, guidance=1.0)


def test_first_scale_follows_the_conditional_logits():
    """At scale 0 the ramp gives t = 0, so greedy sampling picks the argmax of the model's own
    logits at the start tokens, whatever the guidance weight."""
    model, q = tiny("class"), quantizer()
    cond = Condition(labels=torch.tensor([2, 3]))
    with torch.no_grad():
        logits = model(teacher_input(), cond)[:, :3]
    idx = model.sample(q, cond, guidance=5.0, top_k=1, seed=0)
    assert torch.equal(idx[0].view(2, 3), logits.argmax(-1))


def test_top_k_top_p():
    logits = torch.tensor([[[0.0, 3.0, 1.0, 2.0]]]).repeat(1, 500, 1)
    g = torch.Generator().manual_seed(0)
    assert (sample_top_k_top_p(logits, top_k=1, generator=g) == 1).all()
    assert (sample_top_k_top_p(logits, top_p=0.01, generator=g) == 1).all()
    two = sample_top_k_top_p(logits, top_k=2, generator=g)
    assert set(two.unique().tolist()) == {1, 3}
    # top_p 0.9: the kept set is the smallest holding 90% of the mass = {3, 2, 1} here
    p = logits[0, 0].softmax(-1)
    assert p[[1, 3]].sum() < 0.9 < p[[1, 3, 2]].sum()
    assert set(sample_top_k_top_p(logits, top_p=0.9, generator=g).unique().tolist()) == {1, 2, 3}


@pytest.mark.parametrize("top_k,top_p", [(3, 0.0), (5, 0.7), (12, 0.5), (2, 0.99)])
def test_compact_top_k_top_p_draws_the_same_distribution(top_k, top_p):
    """exact=False (the int8 path) samples from the k candidates alone: the frequencies of 40,000
    draws match the official helper's restricted softmax, computed here in float64."""
    torch.manual_seed(0)
    logits = torch.randn(1, 1, 64, dtype=torch.float64) * 2
    p = logits[0, 0].softmax(-1)
    kept = torch.zeros(64, dtype=torch.bool)
    order = p.argsort(descending=True)
    kept[order[:top_k]] = True
    if top_p:                                           # smallest top set holding top_p of the top-k mass
        q = torch.where(kept, p, 0) / p[kept].sum()
        mass = q[order].cumsum(0)
        kept[order[(mass - q[order]) >= top_p]] = False
    want = torch.where(kept, p, 0) / p[kept].sum()
    draws = sample_top_k_top_p(logits.float().expand(1, 40000, 64), top_k, top_p,
                               generator=torch.Generator().manual_seed(1), exact=False)
    freq = torch.bincount(draws.flatten(), minlength=64).double() / draws.numel()
    assert set(draws.unique().tolist()) == set(kept.nonzero().flatten().tolist())
    assert (freq - want).abs().max() < 0.01
    exact = sample_top_k_top_p(logits.float().expand(1, 40000, 64), top_k, top_p,
                               generator=torch.Generator().manual_seed(1))
    assert set(exact.unique().tolist()) == set(kept.nonzero().flatten().tolist())


def test_condition_dropout_is_independent_per_part():
    model = tiny("image", cond_drop=0.5)
    cond = condition(B=400)
    out = model.drop_condition(cond, uncond(), torch.rand(400, 2, generator=torch.Generator().manual_seed(0)))
    pooled_dropped = (out.pooled == 0).all(-1)
    tokens_dropped = (out.tokens == 0.1).all(-1).all(-1)
    assert 0.4 < pooled_dropped.float().mean() < 0.6 and 0.4 < tokens_dropped.float().mean() < 0.6
    assert (pooled_dropped != tokens_dropped).any()
    kept = ~pooled_dropped
    assert torch.equal(out.pooled[kept], cond.pooled[kept])
    labels = tiny("class", cond_drop=1.0).drop_condition(Condition(labels=torch.tensor([0, 1])), None,
                                                         torch.rand(2, 2))
    assert labels.labels.tolist() == [5, 5]


def test_save_load_round_trip_bit_exact(tmp_path):
    model = tiny("text").eval()
    save_model(tmp_path, model.state_dict(), to_dict(model.cfg), kind="ar")
    loaded = load_ar(tmp_path)
    with torch.no_grad():
        assert torch.equal(model(teacher_input(), condition()), loaded(teacher_input(), condition()))
    state = model.state_dict()
    save_model(tmp_path / "bad", {k: v for k, v in state.items() if k != "head.bias"}, to_dict(model.cfg), kind="ar")
    with pytest.raises(CheckpointError, match="weights do not match the config stored with them"):
        load_ar(tmp_path / "bad")
    with pytest.raises(CheckpointError, match="holds a 'ar' model, expected 'vqvae'"):
        from models.vqvae import load_vqvae
        load_vqvae(tmp_path)


def test_bad_inputs_fail_clearly():
    model = tiny("image")
    with pytest.raises(ValueError, match="teacher-forcing input has 10 tokens, expected 60"):
        model(torch.zeros(2, 10, CV), condition())
    with pytest.raises(ValueError, match="needs Condition"):
        model(teacher_input(), Condition(labels=torch.tensor([0, 1])))


class _RunsACommand:
    """An object whose unpickling would run a shell command (what a plain torch.load would do)."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        import os
        return os.system, (f"touch {self.marker}",)


def official_state_of(model: NextScaleAR) -> dict:
    """The state dict as the official var_wo_ddp holds it: with the derived index and mask buffers."""
    L = model.cfg.seq_len
    return {**model.state_dict(), "lvl_1L": model.lvl_1L.clone(), "plane_1L": model.plane_1L.clone(),
            "attn_bias_for_masking": torch.zeros(1, 1, L, L)}


def test_convert_script_reads_the_official_file_layout_without_running_its_objects(tmp_path, capsys):
    import argparse
    import yaml
    from scripts.convert_official import main as convert_main
    from utils.cli import run

    model = tiny("text")
    cfg = to_dict(model.cfg)
    (tmp_path / "tiny.yaml").write_text(yaml.safe_dump({**cfg, "patch_nums": list(PN)}))
    lvl = model.lvl_1L
    official = official_state_of(model)
    marker = tmp_path / "ran"

    def save(var_wo_ddp, name="text-condition-ckpt.pth", legacy=False):
        torch.save({"epoch": 3, "iter": 10, "args": argparse.Namespace(depth=2),
                    "trainer": {"config": _RunsACommand(marker), "var_wo_ddp": var_wo_ddp,
                                "vae_local": {}, "var_opt": {"lr": 1.0}}}, tmp_path / name,
                   _use_new_zipfile_serialization=not legacy)
        return ["--kind", "ar-text", "--src", str(tmp_path / name), "--out", str(tmp_path / "out"),
                "--config", str(tmp_path / "tiny.yaml")]

    assert convert_main(save(official)) == 0
    assert convert_main(save(official, "legacy.pth", legacy=True)) == 0     # the pre-1.6 format too
    assert not marker.exists()
    loaded = load_ar(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(loaded(teacher_input(), condition()), model.eval()(teacher_input(), condition()))

    def fails(args):
        with pytest.raises(SystemExit) as e:
            run(lambda: convert_main(args))
        err = capsys.readouterr().err
        assert e.value.code == 2 and "Traceback" not in err
        return err

    gone = {k: v for k, v in official.items() if k != "blocks.1.ffn.fc1.bias"}
    assert "missing tensor 'blocks.1.ffn.fc1.bias'" in fails(save(gone))
    assert "'lvl_1L' does not match" in fails(save({**official, "lvl_1L": torch.zeros_like(lvl)}))
    torch.save(official, tmp_path / "raw.pth")
    assert "expected the generator under trainer/var_wo_ddp" in fails(
        ["--kind", "ar-text", "--src", str(tmp_path / "raw.pth"), "--out", str(tmp_path / "o2"),
         "--config", str(tmp_path / "tiny.yaml")])
    assert "needs a config with condition: image" in fails(
        ["--kind", "ar-image", "--src", str(tmp_path / "raw.pth"), "--out", str(tmp_path / "o3"),
         "--config", str(tmp_path / "tiny.yaml")])
    assert not marker.exists()


def test_bench_ar_writes_one_row_per_batch_precision_and_cache(tmp_path, capsys):
    import json
    from pathlib import Path
    from scripts.bench_ar import main as bench
    config = Path(__file__).resolve().parents[1] / "configs/ar/tiny_text.yaml"
    assert bench(["--config", str(config), "--batch", "1,2", "--warmup", "0", "--precision", "fp32,int8",
                  "--cache", "on,static", "--json", str(tmp_path / "b.json")]) == 0
    rows = json.loads((tmp_path / "b.json").read_text())
    assert [(r["precision"], r["batch"], r["cache"]) for r in rows] == [
        (p, b, c) for p in ("fp32", "int8") for b in (1, 2) for c in ("on", "static")]
    assert all(r["seconds"] > 0 and r["objects_per_s"] > 0 and r["peak_mem_mb"] > 0 and len(r["scale_ms"]) == 6
               for r in rows)
    assert all(r["same_tokens_as_dynamic"] == 1.0 for r in rows if r["cache"] == "static")
    assert [r["greedy_same_as_fp32"] > 0.5 for r in rows if "greedy_same_as_fp32" in r] == [True, True]
    roof = [r for r in rows if "matmul_limit_gflops" in r]
    assert [(r["precision"], r["batch"]) for r in roof] == [("fp32", 1), ("fp32", 2), ("int8", 1), ("int8", 2)]
    assert len({round(r["gflop_linear_per_object"], 9) for r in roof}) == 1       # the same work at each precision
    assert all(r["linear_gflops"] > 0 and r["matmul_limit_gflops"] > 0 for r in roof)
    assert "x the speed of fp32" in capsys.readouterr().out


def test_op_meter_counts_what_torch_flop_counter_counts():
    """Linear FLOPs against torch's own FlopCounterMode; attention against 4·B·H·L·T·c."""
    from torch.utils.flop_counter import FlopCounterMode
    from utils.roofline import OpMeter
    model, q = tiny("text"), quantizer()
    kw = dict(guidance=2.0, top_k=5, seed=1)
    with FlopCounterMode(display=False) as ref:
        model.sample(q, condition(), uncond(), **kw)
    with OpMeter() as meter:
        model.sample(q, condition(), uncond(), **kw)
    counts = {str(op): n for op, n in ref.get_flop_counts()["Global"].items()}
    assert meter.flops["linear"] == counts["aten.addmm"] + counts.get("aten.mm", 0) > 0      # not the quantizer's conv
    x, k = torch.randn(2, 4, 5, 8), torch.randn(2, 4, 9, 8)
    with OpMeter() as meter:
        torch.nn.functional.scaled_dot_product_attention(x, k, k)
    assert meter.flops["attention"] == 4 * 2 * 4 * 5 * 9 * 8 and meter.seconds["attention"] > 0
    assert meter.matmul_limit() == 0.0

@pytest.mark.slow
def test_static_cache_draws_the_tokens_of_the_dynamic_one_on_the_paper_text_config():
    """The preallocated cache (for CUDA graphs) at the official text generator's size, random
    weights, guided top-k/top-p sampling as sample.py does it: every token the same."""
    from pathlib import Path
    from scripts.bench_ar import conditions
    from trainers.ar import ARRunConfig
    from utils.config import load_config
    cfg = load_config(ARRunConfig, Path(__file__).resolve().parents[1] / "configs/ar/paper_text.yaml")
    torch.manual_seed(0)
    model = NextScaleAR(cfg).eval()
    q = TriplaneQuantizer(cfg.vocab_size, cfg.c_vae, cfg.patch_nums, official_quirks=False).eval()
    cond, u = conditions(cfg, 1, torch.device("cpu"))
    kw = dict(batch=1, guidance=4.0, top_k=10, top_p=0.5, seed=0)
    a = model.sample(q, cond, u, **kw)
    b = model.sample(q, cond, u, static_cache=True, **kw)
    assert sum(t.numel() for t in a) == 2040 and all(torch.equal(x, y) for x, y in zip(a, b))
