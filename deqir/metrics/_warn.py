"""The one-line "weights unavailable" warning, emitted once per distinct configuration."""
from __future__ import annotations

import threading
import warnings

__all__ = ["MetricUnavailableWarning", "warn_once"]


class MetricUnavailableWarning(UserWarning):
    """A metric was left out because its network weights (or its package) are not available offline."""


_LOCK = threading.Lock()
_SEEN: set[str] = set()


def warn_once(key: str, message: str) -> bool:
    """Emit ``message`` as a :class:`MetricUnavailableWarning` the first time ``key`` is seen.

    Args:
        key: Identity of the situation (metric name plus the places that were searched), so a
            different configuration warns again but a repeated one stays quiet.
        message: A single line, without a trailing newline.

    Returns:
        True if the warning was emitted by this call.
    """
    with _LOCK:
        if key in _SEEN:
            return False
        _SEEN.add(key)
    warnings.warn(message.replace("\n", " "), MetricUnavailableWarning, stacklevel=3)
    return True
