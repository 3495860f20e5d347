"""scripts/demo_results.py writes the results page from the evaluations' JSON, lists what did not
run with its command, and refuses an unknown row in one line."""
import json
import subprocess
import sys

from pipelines.sar3d import ROOT


def _run(*args):
    return subprocess.run([sys.executable, str(ROOT / "scripts" / "demo_results.py"), *args], capture_output=True,
                          text=True, cwd=ROOT)


def test_the_page_summarises_each_json_and_lists_the_rest(tmp_path):
    out, page = tmp_path / "out", tmp_path / "results.md"
    (out / "captioner").mkdir(parents=True)
    scores = {"bleu4": 0.5, "rouge_l": 0.75, "cider_d": 2.0, "family_acc": 0.9, "colour_acc": 0.86}
    (out / "captioner" / "results.json").write_text(json.dumps({"scores": scores, "num_objects": 50}))
    (out / "captioner" / "run.json").write_text(json.dumps({"date": "2026-12-07", "machine": "cpu", "minutes": 1.5}))
    (out / "argus_tokenizer").mkdir()
    mean = {"iou": 0.8, "chamfer_l1": 0.02, "normal_consistency": 0.9, "fscore": 0.4}
    (out / "argus_tokenizer" / "results.json").write_text(json.dumps({"mean": mean, "per_shape": [{}] * 10}))
    (out / "argus_ceiling").mkdir()
    per_class = {"box": {"recognised": 0.2, "seen": {"box": 2, "cylinder": 8}},
                 "cone": {"recognised": 1.0, "seen": {"cone": 10}}}
    (out / "argus_ceiling" / "results.json").write_text(json.dumps({"per_class": per_class, "mean_recognised": 0.6}))
    proc = _run("--collect", "--out", str(out), "--page", str(page))
    assert proc.returncode == 0, proc.stderr
    rows = [line for line in page.read_text().splitlines() if line.startswith("| demo")]
    assert len(rows) == 8
    cap = next(r for r in rows if "captioner" in r)
    assert "90% family, 86% colour; BLEU-4 0.500, ROUGE-L 0.750" in cap and "2026-12-07, cpu, 1.5 min" in cap
    assert "IoU 0.800, Chamfer-L1 0.0200" in next(r for r in rows if "tokenizer, held-out" in r)
    assert "60% placed as their family (box 2/10, cone 10/10)" in next(r for r in rows if "reconstructions" in r)
    text = next(r for r in rows if "text generator" in r)
    assert "not run yet" in text and "scripts/eval_prompts.py --num 50 --data-dir data/upright1k" in text


def test_an_unknown_row_is_one_line():
    proc = _run("--only", "captions")
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "captions" in proc.stderr and "captioner" in proc.stderr
