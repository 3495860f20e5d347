"""One error type for bad dataset files, with the path first so that a user can find it."""
from __future__ import annotations

import logging
import re

log = logging.getLogger("datasets")


# What torch's and numpy's own messages say to load a file unsafely ("Re-running torch.load with
# weights_only=False", "If you trust the file you can load it unsafely", "allow_pickle=True"):
# never shown to a user, even when a reader's message is relayed.
_UNSAFE_ADVICE = re.compile(r"weights_only\W{0,3}(?:=|set to|to)\W{0,3}False|allow_pickle\W{0,3}=\W{0,3}True|"
                            r"load (?:it|the file|them) unsafely|add_safe_globals|safe_globals\(|if you trust|"
                            r"only if you (?:got|trust)|trust(?:ed)? (?:the )?source|`allow_pickle=`",
                            re.IGNORECASE)
NOT_LOADED = "it holds pickled objects, which are not loaded"


def without_unsafe_advice(text: str) -> str:
    """`text` with a relayed library message that advises loading a file unsafely replaced by our
    own words: the parenthesis around it, else everything from the sentence it starts in."""
    m = _UNSAFE_ADVICE.search(text)
    if m is None:
        return text
    depth, start = 0, -1
    for i in range(m.start() - 1, -1, -1):
        if text[i] == ")":
            depth += 1
        elif text[i] == "(":
            if depth == 0:
                start = i
                break
            depth -= 1
    if start >= 0:
        depth, end = 0, len(text)
        for i in range(start + 1, len(text)):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            if depth < 0:
                end = i
                break
        return without_unsafe_advice(f"{text[:start + 1]}{NOT_LOADED}{text[end:] if end < len(text) else ')'}")
    cut = max(text.rfind(sep, 0, m.start()) for sep in (". ", ": ", "; "))
    return f"{text[:cut].rstrip(' .;:')}: {NOT_LOADED}" if cut > 0 else NOT_LOADED


class DatasetError(RuntimeError):
    def __init__(self, path, reason: str):
        reason = without_unsafe_advice(reason)
        self.path, self.reason = str(path), reason
        super().__init__(f"{path}: {reason}")

    def __reduce__(self):  # survives pickling between DataLoader / pool processes
        return DatasetError, (self.path, self.reason)


def short_message(exc: BaseException) -> str:
    """The last line of an error, without the worker traceback that DataLoader wraps around it."""
    lines = [l for l in str(exc).strip().splitlines() if l.strip()]
    last = lines[-1] if lines else type(exc).__name__
    return without_unsafe_advice(re.sub(r"^(?:[\w.]+\.)?DatasetError: ", "", last))


def collate_skipping(collate):
    """Wrap a collate function so that samples returned as None (skipped) are dropped and
    counted in batch['num_skipped']."""
    def fn(batch):
        kept = [b for b in batch if b is not None]
        out = collate(kept) if kept else {}
        out["num_skipped"] = len(batch) - len(kept)
        return out
    return fn
