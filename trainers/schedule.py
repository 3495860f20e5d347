"""The learning-rate schedule both trainers share."""
from __future__ import annotations


def lr_factor(step: int, t) -> float:
    """Multiple of the peak learning rate at a step, for a train config `t` with max_steps, warmup
    (share of max_steps), hold (share of the rest) and final_lr: a linear warm-up from 0.005, a hold
    at 1, then a linear decay to final_lr at max_steps. warmup 0, hold 1 is a constant rate."""
    warm = t.warmup * t.max_steps
    if step < warm:
        return 0.005 + (1 - 0.005) * step / warm
    hold_end = warm + t.hold * (t.max_steps - warm)
    if step < hold_end:
        return 1.0
    return 1.0 + (t.final_lr - 1.0) * (step - hold_end) / max(t.max_steps - hold_end, 1)
