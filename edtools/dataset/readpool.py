"""Reading many small files (image headers, captions): in the calling thread while each read is fast, in a pool
of threads when the storage has latency per file (network drives), which the calling thread notices as it goes.
"""

from __future__ import annotations

import queue
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

__all__ = ["run_jobs"]


def run_jobs(
    jobs: list, job_fn, apply, tick, workers: int | None, *, probe: int, slow_s: float, pool: int, chunk: int
) -> None:
    """job_fn(job) for every job: in order in this thread while reads are fast, in a thread pool of `pool`
    threads when they are slow (storage with latency per file: after two blocks of `probe` jobs in a row took
    more than slow_s each on average) or in `workers` threads when workers >= 2 asks for it; workers=1: all in
    this thread. Results go to apply() in this thread as they arrive, tick() is called every few results. An
    exception in a job function stops the pool and is raised here, after apply() has seen every result that
    arrived before it."""
    if not jobs:
        return
    done = 0
    if workers is None or workers <= 1:
        slow_blocks = 0
        while done < len(jobs):
            block = jobs[done : done + probe]
            start = time.perf_counter()
            for job in block:
                apply(job_fn(job))
            done += len(block)
            tick()
            if workers is None:
                # Two slow blocks in a row (not one outlier): slow storage, the rest in parallel.
                slow = (time.perf_counter() - start) / len(block) > slow_s
                slow_blocks = slow_blocks + 1 if slow else 0
                if slow_blocks == 2:
                    break
        workers = pool
    rest = jobs[done:]
    if not rest:
        return
    results: queue.SimpleQueue = queue.SimpleQueue()
    stop = threading.Event()

    def run(part: list) -> None:
        try:
            for job in part:
                if stop.is_set():
                    return
                results.put(job_fn(job))
        except BaseException as exc:  # handed to the scanning thread, which raises it
            results.put(_Failed(exc))

    executor = ThreadPoolExecutor(max_workers=min(workers, len(rest)), thread_name_prefix="edtools-scan")
    try:
        for k in range(0, len(rest), chunk):
            executor.submit(run, rest[k : k + chunk])
        for _ in range(len(rest)):
            result = results.get()
            if isinstance(result, _Failed):
                raise result.exc
            apply(result)
            tick()
    except BaseException:
        stop.set()
        executor.shutdown(wait=True, cancel_futures=True)
        while not results.empty():  # keep every header that was read before the stop
            result = results.get()
            if not isinstance(result, _Failed):
                apply(result)
        raise
    finally:
        executor.shutdown(wait=True)


@dataclass
class _Failed:
    exc: BaseException
