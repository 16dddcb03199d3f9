"""A process's peak GPU memory, as nvidia-smi sees it (the CUDA context and every framework's allocator)."""

from __future__ import annotations

import subprocess
import threading
from pathlib import Path
from typing import Optional


def used_mib() -> Optional[dict[int, int]]:
    """GPU memory in MiB of each process using a GPU, by pid (nvidia-smi); None where nvidia-smi cannot say."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-compute-apps=pid,used_memory", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    used: dict[int, int] = {}
    for line in out.strip().splitlines():
        pid, _, mib = line.partition(",")
        if mib.strip().isdigit() and pid.strip().isdigit():
            used[int(pid)] = used.get(int(pid), 0) + int(mib)
    return used


def process_gib(pid: int) -> Optional[float]:
    """What process ``pid`` holds on the GPUs now, in GiB (None: nvidia-smi does not list it)."""
    mib = (used_mib() or {}).get(pid)
    return round(mib / 1024, 2) if mib else None


class GpuMemoryWatch:
    """Peak GPU memory of one process (and its children), polled from nvidia-smi."""

    def __init__(self, pid: int):
        self.pids, self.peak_mib, self._stop = {pid}, 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.2):
            by_pid = used_mib()
            if by_pid is None:
                return
            watched = self.pids | children(self.pids)
            self.peak_mib = max(self.peak_mib, sum(m for p, m in by_pid.items() if p in watched))

    def stop(self) -> Optional[float]:
        self._stop.set()
        self._thread.join()
        return self.peak_mib / 1024 if self.peak_mib else None


def children(pids: set) -> set:
    found = set()
    for pid in pids:
        try:
            found |= {int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()}
        except OSError:
            pass
    return found | (children(found) if found else set())
