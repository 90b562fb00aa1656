"""A process asks Linux for a signal when its parent dies (``PR_SET_PDEATHSIG``).

Used where a parent's death must not leave its child running: RQ's work horse, which RQ
puts in its own process group (so a stop aimed at the worker's group misses it), and the
``make run`` supervisor. Elsewhere (macOS) nothing happens."""

from __future__ import annotations

import ctypes
import os
import sys

_PR_SET_PDEATHSIG = 1


def signal_when_parent_dies(signum: int, parent: int) -> bool:
    """Asks for ``signum`` when this process's parent dies (strictly, the parent's thread
    that forked it). False if ``parent``, the pid the caller knows as its parent, is no
    longer it: the parent died before the request took effect and the signal never
    comes. True elsewhere than Linux, where there is nothing to ask."""
    if not sys.platform.startswith("linux"):
        return True
    if ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signum, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_PDEATHSIG) failed")
    return os.getppid() == parent
