"""Host memory a block of work took at its peak: resident set in all, and its anonymous part (what the process
allocated itself, as opposed to pages of memory-mapped model files the kernel can drop and read again).

Linux reports both in /proc/self/status; a thread samples them while the block runs (the kernel keeps no peak of
the anonymous part), and the process's own high-water mark bounds the total from below on every system.
"""

from __future__ import annotations

import resource
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType

__all__ = ["HostMemory", "PeakHostMemory", "current_host_memory"]

_STATUS = Path("/proc/self/status")
GIB = 2**30


@dataclass(frozen=True)
class HostMemory:
    """Bytes resident: in all (RSS) and anonymous (None where the system does not say)."""

    total: int
    anonymous: int | None

    def __str__(self) -> str:
        anonymous = "" if self.anonymous is None else f", {self.anonymous / GIB:.2f} GiB anonymous"
        return f"{self.total / GIB:.2f} GiB resident{anonymous}"


def current_host_memory() -> HostMemory:
    """This process's resident memory now."""
    try:
        fields = dict(line.split(":", 1) for line in _STATUS.read_text().splitlines() if ":" in line)
        kib = {name: int(fields[name].split()[0]) * 1024 for name in ("VmRSS", "RssAnon")}
        return HostMemory(kib["VmRSS"], kib["RssAnon"])
    except (OSError, KeyError, ValueError):
        return HostMemory(_max_rss(), None)


def _max_rss() -> int:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


class PeakHostMemory:
    """`with PeakHostMemory() as peak: ...` then `peak.result`: the highest resident and anonymous memory seen
    while the block ran, sampled every `interval` seconds (and at its start and end)."""

    def __init__(self, interval: float = 0.01) -> None:
        self.interval = interval
        self._stop = threading.Event()
        self._total = 0
        self._anonymous: int | None = None
        self._high_water_before = 0
        self._high_water_after = 0
        self._thread = threading.Thread(target=self._sample_until_stopped, daemon=True)

    def _sample(self) -> None:
        now = current_host_memory()
        self._total = max(self._total, now.total)
        if now.anonymous is not None:
            self._anonymous = max(self._anonymous or 0, now.anonymous)

    def _sample_until_stopped(self) -> None:
        while not self._stop.wait(self.interval):
            self._sample()

    def __enter__(self) -> PeakHostMemory:
        self._high_water_before = _max_rss()
        self._sample()
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, value: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._stop.set()
        self._thread.join()
        self._sample()
        self._high_water_after = _max_rss()

    @property
    def result(self) -> HostMemory:
        # a peak shorter than the sampling interval shows in the process's high-water mark, if this block raised it
        raised = self._high_water_after > self._high_water_before
        return HostMemory(max(self._total, self._high_water_after if raised else 0), self._anonymous)
