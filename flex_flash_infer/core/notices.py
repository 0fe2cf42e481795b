"""One warning per distinct message per process: the slow-path notices that every layer may give."""
from __future__ import annotations

import warnings

_warned: set = set()


def warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, stacklevel=3)
