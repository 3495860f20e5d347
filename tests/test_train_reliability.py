"""Training that survives kills, signals and a second job: a save killed at any stage resumes to
the weights of a straight run, SIGINT/SIGTERM save and exit cleanly, one run per folder, the logs
of a resumed run list each step once, and bad step counts are refused in one line.

The killed and signalled runs are real `python train_*.py` processes; straight runs and resumes
run in this process (same thread count as the subprocesses, so the arithmetic is the same)."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import train_vqvae
from tests import test_train_ar as ar_tests
from tests import test_train_vqvae as vqvae_tests
from tests.test_train_ar import tokens  # noqa: F401  (the fixture: tokens of the tiny dataset)
from trainers.runlog import truncate_log
from trainers.state import KILL_ENV, STAGES, find_train_state, holds_state, load_train_state, save_train_state
from utils.checkpoint import CheckpointError
from utils.lock import FolderLock, LockError
from tests.helpers import train_log

ROOT = Path(__file__).resolve().parents[1]
SAVE2 = ("--set", "train.save_every=2")      # saves at steps 2, 4, 6...: a kill finds a previous state


class Job:
    """One trainer on its tiny data: command lines, an in-process run and its results."""

    def __init__(self, kind: str, data: Path):
        self.kind, self.data = kind, data
        self.script = ROOT / f"train_{kind}.py"

    def args(self, out: Path, steps: int, *extra) -> list:
        if self.kind == "vqvae":
            return [*vqvae_tests.FAST, "--data-dir", str(self.data), "--out-dir", str(out), "--max-steps", str(steps),
                    *extra]
        return ar_tests._args(self.data, out, steps, *extra)

    def train(self, out: Path, steps: int, *extra) -> int:
        """In this process; the exit status."""
        module = vqvae_tests if self.kind == "vqvae" else ar_tests
        return module._train(self.data, out, steps, *extra)

    def command(self, out: Path, steps: int, *extra) -> list:
        return [sys.executable, str(self.script), *self.args(out, steps, *extra)]

    def env(self, kill_at: str | None = None) -> dict:
        env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": str(torch.get_num_threads())}
        env.pop(KILL_ENV, None)
        return {**env, KILL_ENV: kill_at} if kill_at else env

    def killed(self, out: Path, steps: int, kill_at: str, *extra) -> None:
        """Run as a process that SIGKILLs itself at `kill_at` (trainers/state.py)."""
        proc = subprocess.run(self.command(out, steps, *SAVE2, *extra), env=self.env(kill_at), capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == -signal.SIGKILL, f"{kill_at}: exit {proc.returncode}\n{proc.stderr[-3000:]}"

    def weights(self, out: Path) -> dict:
        names = ("model.safetensors", "ema/model.safetensors") if self.kind == "vqvae" else ("model.safetensors",)
        return {(name, k): v for name in names for k, v in load_file(str(out / name)).items()}


@pytest.fixture(params=["vqvae", "ar"])
def job(request, shapes_root):
    data = shapes_root if request.param == "vqvae" else request.getfixturevalue("tokens")[0]
    return Job(request.param, data)


@pytest.fixture(scope="module")
def straight_runs():
    """(trainer, steps, *flags) -> the folder of that straight run, shared by the tests."""
    return {}


@pytest.fixture
def straight(job, straight_runs, tmp_path_factory):
    """straight(steps, *extra): the folder of an uninterrupted run (made once per module)."""
    def get(steps: int, *extra) -> Path:
        key = (job.kind, steps, *extra)
        if key not in straight_runs:
            out = tmp_path_factory.mktemp(f"straight_{job.kind}") / "run"
            assert job.train(out, steps, *SAVE2, *extra) == 0
            straight_runs[key] = out
        return straight_runs[key]
    return get


def _assert_same_run(job: Job, out: Path, ref: Path, steps: int) -> None:
    """Bit-identical weights, each step logged once with the same loss, nothing left over."""
    a, b = job.weights(ref), job.weights(out)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in train_log(out)] == list(range(1, steps + 1))
    assert [r["loss"] for r in train_log(out)] == [r["loss"] for r in train_log(ref)]
    assert sorted(p.name for p in out.glob("train_state*")) == ["train_state"]
    assert not (out / ".lock").exists()


def _wait_for_rows(out: Path, proc, err: Path, timeout: float = 300) -> None:
    """Until `proc` has logged a step."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        log = out / "train_log.jsonl"
        if log.is_file() and log.read_text().strip():
            return
        time.sleep(0.05)
    raise AssertionError(f"no step logged (exit {proc.poll()}): {err.read_text()[-3000:]}")


def _spawn(job: Job, out: Path, steps: int, err: Path):
    """The trainer as a process, its stderr (the progress bar too) going to the file `err`."""
    with open(err, "w") as f:
        return subprocess.Popen(job.command(out, steps, *SAVE2), env=job.env(), stderr=f, text=True)


# ----------------------------------------------------------------------------- real trainers

@pytest.mark.parametrize("job,kill_at,found", [("vqvae", "old@4", ("train_state.tmp", 4)),
                                               ("ar", "json@4", ("train_state", 2))], indirect=["job"])
def test_a_killed_save_resumes_exactly(job, kill_at, found, straight, tmp_path, capsys, caplog):
    """vqvae: killed after train_state became .old, before .tmp became train_state (the save of
    step 4): no train_state, two complete states; the newest is resumed. ar: killed with the new
    state written but not switched in: train_state (step 2) is resumed, and the log rows of steps 3
    and 4 are done again, once. Without --resume the folder is refused and kept."""
    out = tmp_path / "run"
    job.killed(out, 6, kill_at)
    assert find_train_state(out) == (out / found[0], found[1])
    assert [r["step"] for r in train_log(out)] == [1, 2, 3, 4]
    assert job.train(out, 6, *SAVE2) == 2
    assert "already holds a run: pass --resume" in capsys.readouterr().err
    assert find_train_state(out) == (out / found[0], found[1])
    caplog.set_level("INFO")
    assert job.train(out, 6, *SAVE2, "--resume") == 0
    text = caplog.text
    assert f"resumed from step {found[1]}" in text and "parameters" in text and "held out" in text
    assert "float32" in text and f"{6 - found[1]} step(s)" in text and "model.safetensors" in text
    _assert_same_run(job, out, straight(6), 6)


@pytest.mark.slow
def test_kills_at_every_stage_of_a_save_resume_exactly(job, straight, tmp_path, capsys):
    """One run killed at each stage of a save in turn, resumed after each; it ends as a straight run."""
    out = tmp_path / "run"
    job.killed(out, 12, "tensors@2")                     # its first save, unfinished: nothing to resume
    assert find_train_state(out) is None and not holds_state(out)
    assert job.train(out, 12, *SAVE2, "--resume") == 2
    assert "nothing to resume" in capsys.readouterr().err
    job.killed(out, 12, "json@4")                        # a fresh start is allowed and clears the leftover
    assert find_train_state(out) == (out / "train_state", 2)
    job.killed(out, 12, "remove@6", "--resume")          # .old half removed
    assert find_train_state(out) == (out / "train_state", 6) and (out / "train_state.old").exists()
    job.killed(out, 12, "old@8", "--resume")             # saving over that leftover works
    assert find_train_state(out) == (out / "train_state.tmp", 8)
    job.killed(out, 12, "switch@10", "--resume")
    assert find_train_state(out) == (out / "train_state", 10) and (out / "train_state.old").exists()
    assert job.train(out, 12, *SAVE2, "--resume") == 0
    _assert_same_run(job, out, straight(12), 12)


def test_a_second_job_is_refused_and_sigterm_saves_to_resume(shapes_root, straight_runs, tmp_path_factory,
                                                             tmp_path, capsys):
    """A second trainer on a folder in use exits 2 with one line naming the first; SIGTERM then
    stops the first after its step under way, saved (exit 143), and --resume ends as a straight run."""
    job = Job("vqvae", shapes_root)
    out = tmp_path / "run"
    first = _spawn(job, out, 6, tmp_path / "first.err")
    try:
        _wait_for_rows(out, first, tmp_path / "first.err")
        assert job.train(out, 6, *SAVE2, "--resume") == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and f"is in use by train_vqvae (process {first.pid} on " in err[0], err
        first.send_signal(signal.SIGTERM)
        assert first.wait(timeout=300) == 143
        last = (tmp_path / "first.err").read_text().strip().splitlines()[-1]
    finally:
        first.kill()
        first.wait()
    step = int(last.split()[3].rstrip(";"))
    assert last == f"interrupted at step {step}; resume with --resume" and 1 <= step < 6
    assert [r["step"] for r in train_log(out)] == list(range(1, step + 1)) and find_train_state(out)[1] == step
    assert not (out / ".lock").exists()
    assert job.train(out, 6, *SAVE2, "--resume") == 0
    if ("vqvae", 6) not in straight_runs:
        ref = tmp_path_factory.mktemp("straight_vqvae") / "run"
        assert job.train(ref, 6, *SAVE2) == 0
        straight_runs[("vqvae", 6)] = ref
    _assert_same_run(job, out, straight_runs[("vqvae", 6)], 6)


@pytest.mark.slow
def test_sigint_saves_to_resume_the_generator(tokens, straight_runs, tmp_path_factory, tmp_path):  # noqa: F811
    job = Job("ar", tokens[0])
    out = tmp_path / "run"
    first = _spawn(job, out, 6, tmp_path / "first.err")
    try:
        _wait_for_rows(out, first, tmp_path / "first.err")
        first.send_signal(signal.SIGINT)
        assert first.wait(timeout=300) == 130
        assert "; resume with --resume" in (tmp_path / "first.err").read_text()
    finally:
        first.kill()
        first.wait()
    assert job.train(out, 6, *SAVE2, "--resume") == 0
    if ("ar", 6) not in straight_runs:
        ref = tmp_path_factory.mktemp("straight_ar") / "run"
        assert job.train(ref, 6, *SAVE2) == 0
        straight_runs[("ar", 6)] = ref
    _assert_same_run(job, out, straight_runs[("ar", 6)], 6)


def test_step_and_batch_counts_below_one_are_refused(shapes_root, tmp_path, capsys):
    for extra in (["--max-steps", "0"], ["--max-steps", "-5"], ["--stop-at", "0"], ["--batch-size", "-1"]):
        code = vqvae_tests._exit_code(lambda: train_vqvae.main(
            [*vqvae_tests.FAST, "--data-dir", str(shapes_root), "--out-dir", str(tmp_path / "run"), *extra]))
        err = capsys.readouterr().err.strip().splitlines()
        assert code == 2 and err == [f"error: {extra[0]} must be at least 1, got {extra[1]}"]
    assert vqvae_tests._train(shapes_root, tmp_path / "run", 2, "--set", "train.grad_accum=0") == 2
    assert "train.grad_accum must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


def test_help_shows_the_defaults(capsys):
    with pytest.raises(SystemExit) as e:
        train_vqvae.main(["--help"])
    out = capsys.readouterr().out
    assert e.value.code == 0 and "(default: train.max_steps)" in out and "Train a tokenizer" in out
    assert "default: None" not in out


# ----------------------------------------------------------------------------- the pieces

def _save(out: Path, step: int, model: torch.nn.Module) -> None:
    opt = torch.optim.AdamW(model.parameters())
    save_train_state(out, step, {"model": model.state_dict()}, {"model": opt.state_dict()}, {"note": step})


class _Killed(BaseException):
    """Stands for the SIGKILL of the crash hook: nothing after it runs, no handler catches it."""


@pytest.mark.parametrize("stage,left,resumed", [
    ("tensors", ["train_state", "train_state.tmp"], 1), ("json", ["train_state", "train_state.tmp"], 1),
    ("old", ["train_state.old", "train_state.tmp"], 2), ("switch", ["train_state", "train_state.old"], 2),
    ("remove", ["train_state", "train_state.old"], 2)])
def test_a_save_killed_at_each_stage_leaves_a_complete_state(tmp_path, monkeypatch, stage, left, resumed):
    """The second of two saves stopped dead after `stage` (the hook's SIGKILL made an exception
    here; the real trainers are killed for real above): the newest complete state is found and
    loaded, and the next save clears the leftovers (a half-removed .old made every later save
    fail before)."""
    assert stage in STAGES
    real_kill = os.kill

    def kill(pid, sig):
        if pid == os.getpid() and sig == signal.SIGKILL:
            raise _Killed
        real_kill(pid, sig)
    monkeypatch.setattr(os, "kill", kill)
    monkeypatch.setenv(KILL_ENV, f"{stage}@2")
    _save(tmp_path, 1, torch.nn.Linear(3, 2))
    with pytest.raises(_Killed):
        _save(tmp_path, 2, torch.nn.Linear(3, 2))
    monkeypatch.delenv(KILL_ENV)
    assert sorted(p.name for p in tmp_path.glob("train_state*")) == left and holds_state(tmp_path)
    if stage == "remove":                    # one of the two files of .old is gone
        assert len(list((tmp_path / "train_state.old").iterdir())) == 1
    model = torch.nn.Linear(3, 2)
    assert load_train_state(tmp_path, {"model": model}, {})["note"] == resumed
    _save(tmp_path, 3, model)
    assert sorted(p.name for p in tmp_path.glob("train_state*")) == ["train_state"]
    assert find_train_state(tmp_path) == (tmp_path / "train_state", 3)


def test_damaged_states_are_not_resumed(tmp_path):
    _save(tmp_path, 1, torch.nn.Linear(3, 2))
    _save(tmp_path, 2, torch.nn.Linear(3, 2))
    final, old = tmp_path / "train_state", tmp_path / "train_state.old"
    old.mkdir()
    (old / "state.json").write_text((final / "state.json").read_text().replace('"step": 2', '"step": 3'))
    (old / "tensors.safetensors").write_bytes((final / "tensors.safetensors").read_bytes()[:-4])     # torn
    assert find_train_state(tmp_path) == (final, 2)
    (final / "state.json").write_text('{"step": 2, "optim')                                          # torn
    assert find_train_state(tmp_path) is None and holds_state(tmp_path)
    with pytest.raises(CheckpointError, match="nothing to resume: .* is damaged"):
        load_train_state(tmp_path, {"model": torch.nn.Linear(3, 2)}, {})


def test_logs_are_cut_back_to_the_resumed_step(tmp_path):
    log = tmp_path / "train_log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 1.0}) + "\n" for s in (1, 2, 3, 4)) + '{"step": 5, "lo')
    truncate_log(log, 2)
    assert [json.loads(line)["step"] for line in log.read_text().splitlines()] == [1, 2]
    truncate_log(log, 0)
    assert log.read_text() == ""
    truncate_log(tmp_path / "metrics.jsonl", 3)
    assert not (tmp_path / "metrics.jsonl").exists()


LOCK_HOLDER = """
import sys, time
from utils.lock import FolderLock
FolderLock(sys.argv[1], "holder.py").acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_the_folder_lock(tmp_path):
    """Held by a live process: refused, naming it; in this process: refused; after a SIGKILL of its
    holder: taken over; released: the lock file is gone."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                              text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        for attempt in (FolderLock(tmp_path).check, FolderLock(tmp_path).acquire):
            with pytest.raises(LockError, match=f"in use by holder.py \\(process {holder.pid} on "):
                attempt()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / ".lock").exists()                         # left behind by the killed holder
    FolderLock(tmp_path).check()
    with FolderLock(tmp_path, "me") as lock:
        assert lock.holder()["pid"] == os.getpid()
        with pytest.raises(LockError, match="in use by me in this process"):
            FolderLock(tmp_path / ".." / tmp_path.name).acquire()
        with pytest.raises(LockError):
            FolderLock(tmp_path).check()
    assert not (tmp_path / ".lock").exists()


def test_a_state_json_missing_a_key_is_one_line(tmp_path):
    import json
    from trainers.state import load_train_state, save_train_state
    from utils.checkpoint import CheckpointError
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.AdamW(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    save_train_state(tmp_path, 3, {"model": model.state_dict()}, {"model": opt.state_dict()}, {"config": {}})
    path = tmp_path / "train_state" / "state.json"
    meta = json.loads(path.read_text())
    del meta["optimizers"]
    path.write_text(json.dumps(meta))
    with pytest.raises(CheckpointError, match="not a training state of this model .no 'optimizers'"):
        load_train_state(tmp_path, {"model": model}, {"model": opt})
