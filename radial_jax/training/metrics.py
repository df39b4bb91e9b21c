"""Metrics: JSON lines (``metrics.jsonl``) and TensorBoard event files (tensorboardX). Process 0 writes."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Optional

import jax
import numpy as np


def to_python(metrics: dict) -> dict:
    out = {}
    for k, v in metrics.items():
        a = np.asarray(jax.device_get(v))
        if a.ndim == 0:
            out[k] = a.item()
    return out


class MetricsLogger:
    """``log(step, metrics, prefix)`` appends a JSON line and TensorBoard scalars under ``directory``."""

    def __init__(self, directory: Optional[os.PathLike], tensorboard: bool = True):
        self.enabled = directory is not None and jax.process_index() == 0
        self.writer = None
        self.path = None
        if self.enabled:
            d = Path(directory)
            d.mkdir(parents=True, exist_ok=True)
            self.path = d / "metrics.jsonl"
            if tensorboard:
                from tensorboardX import SummaryWriter
                self.writer = SummaryWriter(str(d / "tensorboard"))

    def log(self, step: int, metrics: dict, prefix: str = "train") -> dict:
        row = to_python(metrics)
        if self.enabled:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": int(step), "split": prefix, "time": time.time(), **row}) + "\n")
            if self.writer is not None:
                for k, v in row.items():
                    if isinstance(v, (int, float)) and not isinstance(v, bool):
                        self.writer.add_scalar(f"{prefix}/{k}", v, int(step))
        return row

    def close(self):
        if self.writer is not None:
            self.writer.flush()
            self.writer.close()
