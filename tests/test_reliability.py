"""Bad inputs, one line each: every case of the "Reliability" issue ends in exactly one line
"error: ..." on stderr that names the file or flag and what to do, exit status 2, no traceback,
nothing written outside the given folders, no allocation beyond the file's own tensors, and no
advice to load a file unsafely. A few run sample.py in a subprocess; the rest run main() in
process through utils.cli.run."""
import argparse
import json
import os
import struct
import subprocess
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

import sample
from datasets.errors import DatasetError
from datasets.gbuffer import TOKEN_FILES, load_index, read_npy, read_precomputed
from models.ar import load_ar
from models.vqvae import VQVAEConfig
from pipelines.sar3d import load_image
from tests.test_conditioners import save_tiny_bert
from tests.test_sample import models  # noqa: F401  (the tiny VQVAE and text generator, shared)
from utils.checkpoint import CheckpointError, load_built, save_model
from utils.cli import run
from utils.config import ConfigError, load_config

ROOT = Path(__file__).resolve().parents[1]
UNSAFE = ("weights_only", "allow_pickle", "unsafe", "trust", "safe_globals")


def one_line(capsys, main) -> str:
    """Run main through utils.cli.run: exit status 2 and one line 'error: ...', no traceback, no
    unsafe-loading advice. Returns the line without 'error: '."""
    capsys.readouterr()                         # what earlier calls printed
    with pytest.raises(SystemExit) as e:
        run(main)
    err = capsys.readouterr().err.strip()
    assert e.value.code == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    assert not any(word in err.lower() for word in UNSAFE), err
    return err[len("error: "):]


def sample_line(capsys, *argv) -> str:
    return one_line(capsys, lambda: sample.main([*argv]))


def sample_cli(*argv, cwd=None) -> str:
    """sample.py in a subprocess (arguments may be bytes): the one stderr line, checked."""
    r = subprocess.run([sys.executable, str(ROOT / "sample.py"), *argv], capture_output=True, timeout=120, cwd=cwd)
    err = r.stderr.decode("utf-8", "replace").strip()
    assert r.returncode == 2, err
    assert len(err.splitlines()) == 1 and err.startswith("error: ") and "Traceback" not in err, err
    return err[len("error: "):]


def tiny_args(models, out):
    return ["--vqvae", str(models / "vqvae"), "--ar", str(models / "ar"), "--output-dir", str(out), "--no-video",
            "--frames", "1", "--render-resolution", "8", "--mesh-resolution", "8"]


# ----------------------------------------------------------------------------- 1. output folders

def test_output_folders_never_collide_nor_overwrite(models, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "a_red_box_0").mkdir(parents=True)
    (out / "a_red_box_0" / "mine.txt").write_text("an earlier run")
    prompts = tmp_path / "p.json"
    prompts.write_text(json.dumps(["a red box!", "a red box?"]))      # both slug to a_red_box
    assert sample.main([*tiny_args(models, out), "--prompts", str(prompts)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["a_red_box_0", "a_red_box_0-1", "a_red_box_0-2"]
    assert [p.name for p in (out / "a_red_box_0").iterdir()] == ["mine.txt"]
    a, b = (np.load(out / f"a_red_box_0-{k}" / "tokens.npy") for k in (1, 2))
    assert a.shape == b.shape and not (out / ".lock").exists()
    # A second job on the same folder is refused while the first holds it.
    from utils.lock import FolderLock
    with FolderLock(out, "another job"):
        line = sample_line(capsys, *tiny_args(models, out), "--prompt", "a box")
    assert line.startswith(f"{out} is in use by another job") and "pick another folder" in line


def test_unwritable_output_folder(tmp_path, capsys):
    if os.geteuid() == 0:                  # root writes anywhere: a folder below a file cannot be made
        (tmp_path / "file").write_text("x")
        out = tmp_path / "file" / "out"
    else:
        (tmp_path / "ro").mkdir(mode=0o500)
        out = tmp_path / "ro" / "out"
    line = sample_line(capsys, "--prompt", "a box", "--output-dir", str(out))
    assert line.startswith(f"--output-dir {out}: cannot write there (") and "pick a writable folder" in line


# ----------------------------------------------------------------------------- 2. dataset.json

def test_dataset_entries_stay_inside_the_root(tmp_path, capsys):
    root, victim = tmp_path / "data", tmp_path / "victim"
    (root / "cat" / "obj").mkdir(parents=True)
    victim.mkdir()
    (victim / "keep.txt").write_text("not the dataset's")
    for entry in ("../victim", str(victim), ".", "cat/../../victim", "cat/\0"):
        (root / "dataset.json").write_text(json.dumps({"cat": ["cat/obj", entry]}))
        with pytest.raises(DatasetError, match="is not a folder inside the dataset root") as e:
            load_index(root)
        assert str(e.value).startswith(f"{root / 'dataset.json'}: entry {entry!r} of 'cat'")
    # precompute stops before it writes anything, in the dataset or elsewhere.
    from scripts.precompute import main as precompute_main
    (root / "dataset.json").write_text(json.dumps({"cat": ["../victim"]}))
    line = one_line(capsys, lambda: precompute_main(["--data-dir", str(root), "--vqvae", str(tmp_path / "none")]))
    assert line.startswith(f"{root / 'dataset.json'}: entry '../victim' of 'cat' is not a folder inside")
    assert [p.name for p in victim.iterdir()] == ["keep.txt"] and sorted(p.name for p in root.iterdir()) == \
        ["cat", "dataset.json"]
    # Inside the root is fine, through '..' or a category folder linked in from elsewhere.
    (root / "linked").symlink_to(victim)
    (root / "dataset.json").write_text(json.dumps({"cat": ["cat/x/../obj", "linked"]}))
    assert load_index(root) == {"cat": ["cat/x/../obj", "linked"]}


# ----------------------------------------------------------------------------- 3. one line, no traceback

def _rewrite_pickle(src: Path, dst: Path, old: bytes, new: bytes):
    """A copy of the zip checkpoint src with one byte string of its data.pkl replaced."""
    with zipfile.ZipFile(src) as zi, zipfile.ZipFile(dst, "w") as zo:
        for name in zi.namelist():
            data = zi.read(name)
            zo.writestr(name, data.replace(old, new) if name.endswith("data.pkl") else data)
    return dst


def test_damaged_and_foreign_checkpoints(models, tmp_path, capsys):
    torch.save({"encoder.w": torch.ones(2)}, tmp_path / "good.pt")
    bogus_pid = _rewrite_pickle(tmp_path / "good.pt", tmp_path / "bogus.pth", b"storage", b"storagf")
    placeholder = _rewrite_pickle(tmp_path / "good.pt", tmp_path / "placeholder.pth", b"FloatStorage", b"FloatStoragX")
    line = sample_line(capsys, "--prompt", "a box", "--vqvae", str(bogus_pid), "--output-dir", str(tmp_path / "o"))
    assert line.startswith(f"{bogus_pid}: not a readable PyTorch checkpoint") and "(its content is malformed" in line
    line = sample_line(capsys, "--prompt", "a box", "--vqvae", str(models / "vqvae"), "--ar", str(placeholder),
                       "--output-dir", str(tmp_path / "o"))
    assert line.startswith(f"{placeholder}: not a readable PyTorch checkpoint")
    torch.save({5: torch.ones(2), "encoder.w": torch.ones(1)}, tmp_path / "intkey.pt")
    line = sample_line(capsys, "--prompt", "a box", "--vqvae", str(tmp_path / "intkey.pt"))
    assert line == (f"{tmp_path / 'intkey.pt'}: expected a state dict of tensors (such as the official "
                    "vqvae-ckpt.pt), but 1 key(s) are not names, e.g. 5")
    # Our format, without the config in its metadata.
    from safetensors.torch import save_file
    (tmp_path / "noconfig").mkdir()
    save_file({"w": torch.ones(1)}, str(tmp_path / "noconfig" / "model.safetensors"),
              metadata={"format": "sar3d-repro/1", "kind": "vqvae"})
    line = sample_line(capsys, "--prompt", "a box", "--vqvae", str(tmp_path / "noconfig"))
    assert line.startswith(f"{tmp_path / 'noconfig' / 'model.safetensors'}: its metadata holds no model config")


def test_pickled_encoder_weights_are_not_loaded(models, tmp_path, capsys):
    from safetensors.torch import load_file
    enc = tmp_path / "bert"
    save_tiny_bert(enc)
    state = load_file(str(enc / "model.safetensors"))
    (enc / "model.safetensors").unlink()
    torch.save({**state, "args": argparse.Namespace(lr=1)}, enc / "pytorch_model.bin")
    line = sample_line(capsys, *tiny_args(models, tmp_path / "o"), "--prompt", "a box", "--text-encoder", str(enc))
    assert line.startswith(f"cannot load the sentence encoder from {enc}: {enc / 'pytorch_model.bin'} is a pickle")
    assert "not loaded because unpickling can run any code; convert the weights to safetensors" in line
    # The MobileNetV2 weights file of the image encoders, the same.
    from models.conditioners import load_conditioner
    torch.save({"args": argparse.Namespace(lr=1)}, tmp_path / "mnv2.pth")
    line = one_line(capsys, lambda: load_conditioner("image", str(tmp_path / "mnv2.pth")))
    assert line.startswith(f"cannot load the MobileNetV2 image encoder: {tmp_path / 'mnv2.pth'} is a pickle")


def test_relayed_reader_messages_never_advise_unsafe_loading(tmp_path):
    import pickle
    (tmp_path / "obj.npy").write_bytes(pickle.dumps({"a": 1}))     # numpy: "... load it unsafely ..."
    with pytest.raises(DatasetError) as e:
        read_npy(tmp_path / "obj.npy")
    assert str(e.value) == f"{tmp_path / 'obj.npy'}: not a readable .npy array (it holds pickled objects, " \
                           "which are not loaded)"


def test_prompts_that_are_not_utf8(tmp_path, capsys):
    # A byte that is not UTF-8 reaches sys.argv as a lone surrogate.
    line = sample_cli(b"--prompt", b"a red \xff box", b"--output-dir", str(tmp_path / "o").encode())
    assert line == "--prompt: not valid UTF-8 text (the byte 0xff at character 7); write the prompt in UTF-8"
    (tmp_path / "p.json").write_bytes(b'["a red \xff box"]')
    line = sample_line(capsys, "--prompts", str(tmp_path / "p.json"), "--output-dir", str(tmp_path / "o"))
    assert line == f"--prompts {tmp_path / 'p.json'}: not UTF-8 text (byte 0xff at offset 8); save the file as UTF-8"
    (tmp_path / "p.json").write_text('["a box", "a red \\udcff box"]')       # valid JSON, not valid text
    line = sample_line(capsys, "--prompts", str(tmp_path / "p.json"), "--output-dir", str(tmp_path / "o"))
    assert line.startswith(f"--prompts {tmp_path / 'p.json'}: prompt 2: not valid UTF-8 text")
    assert not (tmp_path / "o").exists()


def write_png(path: Path, width: int, height: int) -> Path:
    """A valid all-black grayscale PNG, streamed: under a megabyte however large it is."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
    z, row = zlib.compressobj(1), bytes(1 + width)                   # filter byte 0, then the pixels
    data = b"".join(z.compress(row) for _ in range(height)) + z.flush()
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
                     + chunk(b"IDAT", data) + chunk(b"IEND", b""))
    return path


def test_huge_images_are_refused_before_decoding(tmp_path, capsys):
    big = write_png(tmp_path / "big.png", 12000, 12000)               # 144 Mpixel: PIL only warns
    bomb = write_png(tmp_path / "bomb.png", 14000, 14000)             # 196 Mpixel: PIL raises
    with pytest.raises(ValueError, match=r"big.png: 12000x12000 pixels is too large \(at most 4096 pixels a side\)"):
        load_image(big)
    line = sample_line(capsys, "--image", str(bomb), "--output-dir", str(tmp_path / "o"))
    assert line.startswith(f"--image {bomb}: over 178 Mpixel, too large to decode; downscale it to at most 4096")
    # Through the command line: PIL's warning about large images does not add a line.
    line = sample_cli("--image", str(big), "--output-dir", str(tmp_path / "o"))
    assert line == f"--image {big}: 12000x12000 pixels is too large (at most 4096 pixels a side); downscale it"
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("argv, message", [
    (["--cfg", "nan"], "--guidance nan: must be a finite number"),
    (["--guidance", "inf"], "--guidance inf: must be a finite number"),
    (["--guidance=-inf"], "--guidance -inf: must be a finite number"),
    (["--top-k", "-1"], "--top-k -1: must be 0 (no limit) or more"),
    (["--top-p", "1.5"], "--top-p 1.5: must be between 0 and 1"),
    (["--top-p", "nan"], "--top-p nan: must be between 0 and 1"),
    (["--temperature", "0"], "--temperature 0.0: must be a positive finite number"),
    (["--temperature", "nan"], "--temperature nan: must be a positive finite number"),
    (["--num-samples", "1000000"], "--num-samples 1000000: at most 64 objects in one batch"),
    (["--batch-size", "65"], "--batch-size 65: at most 64 objects in one batch"),
    (["--precision", "int4"], "argument --precision: invalid choice: 'int4'"),
    (["--mesh-resolution", "100000"], "--mesh-resolution 100000: at most 512"),
    (["--device", "tpu"], "--device tpu: not a device name; use cpu, or cuda"),
    (["--promt", "a red torus"], "--promt: unknown option; did you mean --prompt?"),
    *([(["--device", "cuda"], "--device cuda: no CUDA device is available")] if not torch.cuda.is_available() else []),
])
def test_bad_flags(argv, message, tmp_path, capsys):
    prompt = [] if "--promt" in argv else ["--prompt", "a box"]
    assert sample_line(capsys, *prompt, *argv, "--output-dir", str(tmp_path / "o")).startswith(message)
    assert not (tmp_path / "o").exists()


def test_misspelt_flag_on_the_command_line():
    assert sample_cli("--promt", "a red torus") == "--promt: unknown option; did you mean --prompt?"


def test_precompute_batch_size_zero(tmp_path, capsys):
    from scripts.precompute import main as precompute_main
    line = one_line(capsys, lambda: precompute_main(["--data-dir", str(tmp_path), "--vqvae", str(tmp_path),
                                                     "--batch-size", "0"]))
    assert line == "--batch-size must be at least 1 and --workers at least 0"


def test_token_ids_outside_the_vocabulary(tmp_path):
    obj = tmp_path / "data" / "cat" / "obj"
    obj.mkdir(parents=True)
    np.save(obj / TOKEN_FILES["x_BLCv"], np.zeros((3, 4), np.float32))
    gt = obj / TOKEN_FILES["gt_BL"]
    np.save(gt, np.array([0, 1, 2, 3, 4, 600], np.int64))
    assert read_precomputed(obj)["gt_BL"].tolist() == [0, 1, 2, 3, 4, 600]     # no vocabulary known
    with pytest.raises(DatasetError, match=r"token id 600 is outside the vocabulary \[0, 512\)") as e:
        read_precomputed(obj, vocab_size=512)
    assert str(e.value).startswith(str(gt)) and "rerun scripts/precompute.py with --overwrite" in str(e.value)
    # The dataset's record of the VQVAE that wrote the tokens gives the vocabulary.
    (tmp_path / "data" / "dataset.json").write_text(json.dumps({"cat": ["cat/obj"]}))
    (tmp_path / "data" / "tokenizer.json").write_text(json.dumps({"vocab_size": 512}))
    with pytest.raises(DatasetError, match="token id 600 is outside the vocabulary"):
        read_precomputed(obj)
    np.save(gt, np.array([0, 1, 2, 3, 4, -1], np.int64))
    with pytest.raises(DatasetError, match="token id -1 is outside the vocabulary"):
        read_precomputed(obj, vocab_size=512)


# ----------------------------------------------------------------------------- 4. resources

def test_a_small_file_with_a_huge_config_allocates_nothing(models, tmp_path, capsys):
    cfg = json.loads((models / "ar" / "config.json").read_text())
    cfg.pop("kind")
    save_model(tmp_path / "big", {"w": torch.ones(1)}, {**cfg, "width": 65536, "depth": 64, "num_heads": 64}, "ar")
    with pytest.raises(CheckpointError, match="weights do not match the config stored with them"):
        load_ar(tmp_path / "big")
    line = sample_line(capsys, *tiny_args(models, tmp_path / "o"), "--prompt", "a box", "--ar", str(tmp_path / "big"))
    assert line.startswith(f"{tmp_path / 'big'}: weights do not match the config stored with them")
    # The model is only ever built on the meta device when the shapes disagree.
    devices = []

    def build(c):
        devices.append(torch.empty(0).device.type)
        return torch.nn.Linear(c["width"], c["width"])
    save_model(tmp_path / "lin", torch.nn.Linear(4, 4).state_dict(), {"width": 65536}, "lin")
    with pytest.raises(CheckpointError, match=r"'weight' has shape \(4, 4\) in the file, the config makes "
                                              r"\(65536, 65536\)"):
        load_built(tmp_path / "lin", "lin", build)
    assert devices == ["meta"]
    saved = torch.nn.Linear(4, 4)
    save_model(tmp_path / "lin", saved.state_dict(), {"width": 4}, "lin")
    # A file that holds every tensor is taken as it is: the skeleton is never materialised.
    loaded = load_built(tmp_path / "lin", "lin", build)
    assert torch.equal(loaded.weight, saved.weight) and devices == ["meta", "meta"]


# ----------------------------------------------------------------------------- 5. configs

def test_config_files(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("quantizer:\n  vocab_size: 512\n  patch_nums: [1, 2\nrenderer_kind: nerf\n")
    line = one_line(capsys, lambda: load_config(VQVAEConfig, bad))
    assert line.startswith(f"{bad}, line 4, column 14: not valid YAML: expected ',' or ']'")
    bad.write_text("")
    assert one_line(capsys, lambda: load_config(VQVAEConfig, bad)).startswith(f"{bad}: the file is empty")
    bad.write_text("# nothing but a comment\n")
    assert one_line(capsys, lambda: load_config(VQVAEConfig, bad)).startswith(f"{bad}: the file is empty")
    bad.write_text("- renderer_kind: nerf\n")
    assert one_line(capsys, lambda: load_config(VQVAEConfig, bad)) == \
        f"{bad}: the top level is a list; a config file is a mapping of keys (key: value)"
    bad.write_bytes(b"renderer_kind: n\xe9rf\n")
    assert one_line(capsys, lambda: load_config(VQVAEConfig, bad)).startswith(f"{bad}: not UTF-8 text (byte 0xe9")
    with pytest.raises(ConfigError, match=r"override 'quantizer.vocab_size=\[1,', line 1, column 4: not valid YAML"):
        load_config(VQVAEConfig, None, ["quantizer.vocab_size=[1,"])
    with pytest.raises(ConfigError, match="'quantizer' is a value, not a section"):
        load_config(VQVAEConfig, None, ["quantizer=1", "quantizer.vocab_size=2"])
    # No shipped config is empty (they all load).
    for path in sorted((ROOT / "configs").rglob("*.yaml")):
        assert path.read_text().strip(), path


def test_config_lower_bounds():
    from dataclasses import dataclass, field

    @dataclass
    class Train:
        batch_size: int = field(default=8, metadata={"min": 1})
    from utils.config import from_dict
    assert from_dict(Train, {"batch_size": 2}).batch_size == 2
    with pytest.raises(ConfigError, match="batch_size: must be at least 1, got 0"):
        from_dict(Train, {"batch_size": 0})
