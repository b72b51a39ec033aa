"""Where skproduct keeps files it makes for itself (indexes, caches)."""

from __future__ import annotations

import os
from pathlib import Path


def user_cache_dir(*parts: str) -> Path:
    """Return skproduct's per-user cache folder, joined with ``parts``.

    ``$SKPRODUCT_CACHE_DIR`` wins, then ``$XDG_CACHE_HOME/skproduct``, then
    ``~/.cache/skproduct``. The folder is not created here.
    """
    root = os.environ.get("SKPRODUCT_CACHE_DIR")
    if not root:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = os.path.join(xdg, "skproduct")
    return Path(root, *parts)
