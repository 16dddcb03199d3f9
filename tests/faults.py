"""``python tests/faults.py SPEC -- <jdiff.main arguments>``: a jdiff run with one fault injected, for the tests.

SPEC is ``stage:kind[:k[:when]]``, e.g. ``train:kill-write:2:after``. At the ``k``-th file that the stage
renames into place (every file jdiff writes goes through os.replace), ``before`` or ``after`` the rename:

    kill-write    SIGKILL this process (nothing can clean up: as a power cut or the OOM killer)
    full-write    the rename fails with ENOSPC (a full disk)
    ctrl-c-write  SIGINT this process (Ctrl-C)

``stage:kill-time:SECONDS`` SIGKILLs the process that many seconds after the stage starts. ``count`` as the
kind kills nothing and prints, as the last line, how many renames each stage made and how long it took.
"""

from __future__ import annotations

import errno
import json
import os
import runpy
import signal
import sys
import threading
import time

from jdiff import pipeline

spec, args = sys.argv[1], sys.argv[sys.argv.index("--") + 1:]
stage, kind, *rest = spec.split(":")
k = int(rest[0]) if rest and kind.endswith("-write") else 0
when = rest[1] if len(rest) > 1 else "before"
current = {"stage": None}
counts: dict[str, int] = {}
seconds: dict[str, float] = {}
real_replace = os.replace


def fault() -> None:
    if kind.startswith("kill"):
        os.kill(os.getpid(), signal.SIGKILL)
    if kind.startswith("ctrl-c"):
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(1)  # the handler raises KeyboardInterrupt here
    if kind.startswith("full"):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def replace(src, dst, *a, **kw):
    name = current["stage"]
    if name is not None:
        counts[name] = counts.get(name, 0) + 1
    hit = name == stage and kind.endswith("-write") and counts[name] == k
    if hit and when == "before":
        fault()
    real_replace(src, dst, *a, **kw)
    if hit and when == "after":
        fault()


def staged(name: str, method):
    def wrapped(self, *a, **kw):
        outer, current["stage"] = current["stage"], name
        started = time.perf_counter()
        if name == stage and kind == "kill-time":
            threading.Timer(float(rest[0]), fault).start()
        try:
            return method(self, *a, **kw)
        finally:
            seconds[name] = seconds.get(name, 0.0) + time.perf_counter() - started
            current["stage"] = outer

    return wrapped


os.replace = replace
for name in ("prior", "train", "generate", "score"):
    setattr(pipeline.Run, name, staged(name, getattr(pipeline.Run, name)))
pipeline.Run.write_contact_sheet = staged("generate", pipeline.Run.write_contact_sheet)  # the generate stage's
sys.argv = ["jdiff.main", *args]
try:
    runpy.run_module("jdiff.main", run_name="__main__")
finally:
    if kind == "count":
        print(json.dumps({"counts": counts, "seconds": seconds}))
