"""One error type for bad dataset files, with the path first so that a user can find it."""
from __future__ import annotations

import logging
import re

log = logging.getLogger("datasets")


class DatasetError(RuntimeError):
    def __init__(self, path, reason: str):
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # survives pickling between DataLoader / pool processes
        return DatasetError, (self.path, self.reason)


def short_message(exc: BaseException) -> str:
    """The last line of an error, without the worker traceback that DataLoader wraps around it."""
    lines = [l for l in str(exc).strip().splitlines() if l.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return re.sub(r"^(?:[\w.]+\.)?DatasetError: ", "", last)


def collate_skipping(collate):
    """Wrap a collate function so that samples returned as None (skipped) are dropped and
    counted in batch['num_skipped']."""
    def fn(batch):
        kept = [b for b in batch if b is not None]
        out = collate(kept) if kept else {}
        out["num_skipped"] = len(batch) - len(kept)
        return out
    return fn
