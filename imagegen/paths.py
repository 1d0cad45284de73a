"""Where `imagegen up` keeps the embedded server's store and built models."""

from __future__ import annotations

import os
from pathlib import Path


def default_data_dir() -> Path:
    explicit = os.environ.get("IMAGEGEN_DATA_DIR")
    if explicit:
        return Path(explicit)
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(os.path.expanduser("~"), ".local", "share")
    return Path(base) / "imagegen"
