"""Children that die with the process that started them (Linux), without a ``preexec_fn``.

A ``preexec_fn`` runs Python in the forked child before ``exec``. When other threads are
alive at the fork (grpc's, a log pump's, a test server's), a lock one of them held (the
allocator's, the import lock) stays held in the child for ever, and the child hangs before
it ever runs its program; Python's documentation warns against it. So the child is started
as a fresh Python that asks Linux for the signal (``PR_SET_PDEATHSIG``, which survives
``exec``) and then execs the real program in its own place: same pid, no inherited locks,
and subprocess keeps its fast spawn path."""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence

# argv: [parent pid, program, *its arguments]. CDLL(None) is the running process's own
# symbols, libc's prctl among them. PR_SET_PDEATHSIG is 1.
_EXEC_AFTER_PRCTL = (
    "import ctypes, os, signal, sys\n"
    "ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM, 0, 0, 0)\n"
    "if os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(1)  # the parent died before prctl took effect\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def dying_with_parent(argv: Sequence[str]) -> list[str]:
    """``argv`` run so that Linux sends it SIGTERM when this process dies (best effort:
    strictly, when the thread that started it exits, so start children from the main
    thread). Elsewhere ``argv`` as it is."""
    if not sys.platform.startswith("linux"):
        return list(argv)
    # -I: no site-packages, no PYTHON* variables; a bare interpreter starts in ~10 ms.
    return [
        sys.executable,
        "-I",
        "-c",
        _EXEC_AFTER_PRCTL,
        str(os.getpid()),
        *argv,
    ]
