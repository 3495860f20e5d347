"""The layering the codebase keeps: entry points are thin and never imported by the library,
models/ stands on its own, and the trainers' functions stay short."""
import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINTS = {"sample", "train_vqvae", "train_ar", "scripts"}


def _modules():
    for path in sorted(ROOT.rglob("*.py")):
        rel = path.relative_to(ROOT)
        if rel.parts[0] not in ("tests", ".git") and not rel.parts[0].startswith("."):
            yield rel, ast.parse(path.read_text(encoding="utf-8"))


def _imports(tree) -> set:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


def test_no_module_imports_an_entry_point_and_models_do_not_import_datasets():
    for rel, tree in _modules():
        tops = {name.split(".")[0] for name in _imports(tree)}
        assert not tops & ENTRY_POINTS, f"{rel} imports an entry point: {sorted(tops & ENTRY_POINTS)}"
        if rel.parts[0] in ("models", "renderers"):
            assert "datasets" not in tops, f"{rel} imports datasets/"


def test_trainer_functions_are_short():
    for rel, tree in _modules():
        if rel.parts[0] == "trainers" or rel.name.startswith("train_"):
            for node in ast.walk(tree):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    length = node.end_lineno - node.lineno + 1
                    assert length <= 80, f"{rel}:{node.lineno} {node.name} is {length} lines"
