"""Run per-object work on a pool of processes with a progress bar."""
from __future__ import annotations

import multiprocessing as mp

from tqdm import tqdm


def _init_worker():
    import torch
    torch.set_num_threads(1)   # one process per core; threads inside would oversubscribe


def parallel_map(fn, jobs: list, workers: int, desc: str, ordered: bool = False):
    """Yield fn(job) for each job, in completion order (in job order with `ordered`). fn must be
    picklable (a module-level function or a partial of one); with workers > 1 the jobs run in
    fresh ('spawn') processes, else in this one. The progress bar goes to stderr."""
    with tqdm(total=len(jobs), desc=desc, unit="obj") as bar:
        if workers <= 1 or len(jobs) <= 1:
            _init_worker()
            for r in map(fn, jobs):
                bar.update()
                yield r
            return
        with mp.get_context("spawn").Pool(workers, initializer=_init_worker) as pool:
            for r in (pool.imap if ordered else pool.imap_unordered)(fn, jobs):
                bar.update()
                yield r
