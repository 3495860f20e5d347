"""What a training run writes as it goes, shared by the trainers: the progress bar, every step's
logs in OUT/train_log.jsonl, TensorBoard scalars under train/ (OUT/tb), and held-out metrics in
OUT/metrics.jsonl. Only the main process writes; the others keep a disabled bar and the history.

A run that starts at step s (0, or the step it resumes from) first cuts both .jsonl files to
their rows of steps <= s, and TensorBoard drops its events of later steps: what a killed run
logged after its last save is done again, so the logs of a resumed run are those of a straight
one, each step once."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tqdm import tqdm

LOG_FILES = ("train_log.jsonl", "metrics.jsonl")


def truncate_log(path: Path, step: int) -> None:
    """Keep the rows of `path` (JSON lines with a "step") of steps <= `step`, in order; a torn
    last line (a kill while writing) goes too. Rewritten atomically; a missing file stays so."""
    if not path.is_file():
        return
    keep = []
    for line in path.read_text().splitlines():
        try:
            row = json.loads(line)
        except ValueError:
            continue
        if isinstance(row, dict) and isinstance(row.get("step"), int) and row["step"] <= step:
            keep.append(line + "\n")
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(keep))
    os.replace(tmp, path)


class RunLog:
    def __init__(self, out_dir, is_main: bool, desc: str, step: int, max_steps: int, batch_size: int,
                 log_every: int):
        self.out_dir, self.max_steps, self.batch_size, self.log_every = Path(out_dir), max_steps, batch_size, log_every
        self.writer = None
        if is_main:
            from torch.utils.tensorboard import SummaryWriter
            self.out_dir.mkdir(parents=True, exist_ok=True)
            for name in LOG_FILES:
                truncate_log(self.out_dir / name, step)
            # purge_step: TensorBoard hides what earlier sessions logged from this step on
            self.writer = SummaryWriter(str(self.out_dir / "tb"), purge_step=step + 1)
        self.bar = tqdm(total=max_steps, initial=step, desc=desc, disable=not is_main, dynamic_ncols=True)
        self.history: list[dict] = []
        self.t0 = time.time()

    def step(self, step: int, logs: dict, postfix: dict) -> bool:
        """Record one step. Returns True when its scalars went to TensorBoard (main process, every
        log_every steps and the last), so that the caller can add its own through `writer`."""
        self.history.append({"step": step, **logs})
        self.bar.update(1)
        if self.writer is None:
            return False
        with open(self.out_dir / "train_log.jsonl", "a") as f:
            f.write(json.dumps(self.history[-1]) + "\n")
        self.bar.set_postfix(**postfix)
        if step % self.log_every and step != self.max_steps:
            return False
        for k, v in logs.items():
            self.writer.add_scalar(f"train/{k}", v, step)
        self.writer.add_scalar("train/objects_per_s",
                               self.batch_size * len(self.history) / (time.time() - self.t0), step)
        return True

    def metrics(self, step: int, values: dict, message: str) -> None:
        """One line of held-out metrics (with the minutes since the start) and a message under the bar."""
        with open(self.out_dir / "metrics.jsonl", "a") as f:
            f.write(json.dumps({"step": step, **values, "minutes": (time.time() - self.t0) / 60}) + "\n")
        self.bar.write(message)

    def close(self) -> None:
        self.bar.close()
        if self.writer is not None:
            self.writer.close()
