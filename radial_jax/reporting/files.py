"""Files written so that a reader never sees half of one: text, JSON and figures (matplotlib, Agg)."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import numpy as np


def check_output_dir(path, flag: str = "--out") -> Path:
    """``path`` as a directory results can be written to, or a ValueError saying why not, without creating
    anything: checked before the work whose results would otherwise be lost at the end."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ValueError(f"{flag} {path} is a file; it must be a directory (or a path to create one)")
    existing = path
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise ValueError(f"{flag} {path}: {existing} is a file, so the directory cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"{flag} {path}: {existing} is not writable")
    return path


def atomic_write_bytes(path, data: bytes) -> Path:
    """Write via a temporary file in the same directory and rename (created parents included); on any
    failure the temporary file is removed and ``path`` is left as it was."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("wb", dir=path.parent, delete=False, suffix=".tmp") as f:
        try:
            f.write(data)
        except BaseException:
            f.close()
            os.unlink(f.name)
            raise
    os.replace(f.name, path)
    return path


def atomic_write_text(path, text: str) -> Path:
    """``atomic_write_bytes`` of UTF-8 text."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path, value, indent: int = 1) -> Path:
    return atomic_write_text(path, json.dumps(value, indent=indent, default=_jsonable))


def _jsonable(v):
    if isinstance(v, (np.integer,)):
        return int(v)
    if isinstance(v, (np.floating,)):
        return float(v)
    if isinstance(v, np.ndarray):
        return v.tolist()
    raise TypeError(f"{type(v).__name__} is not JSON serialisable")


def figure(ncols: int = 1, width: float = 5.0, height: float = 3.8):
    """``(plt, fig, axes[ncols])`` with the non-interactive Agg backend."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, ncols, figsize=(width * ncols, height))
    return plt, fig, np.atleast_1d(axes)


def integer_ticks(axis) -> None:
    """Whole-number ticks on a layer / step / visit axis (``ax.xaxis``): no tick at "layer 2.5"."""
    from matplotlib.ticker import MaxNLocator
    axis.set_major_locator(MaxNLocator(integer=True))


def save_figure(plt, fig, path, dpi: int = 110) -> Path:
    """Save a PNG atomically and close the figure."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".png", delete=False) as f:
        fig.savefig(f, dpi=dpi)
    os.replace(f.name, path)
    plt.close(fig)
    return path
