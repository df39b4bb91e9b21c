"""A trained ``RadialModel`` as a folder (``checkpoints.artifacts``' format, kind ``radial_student``): its base
config, ``RadialConfig`` and parameters, as ``radial-jax distill`` and the pipeline write them."""
from __future__ import annotations

import dataclasses
from pathlib import Path

from radial_jax.checkpoints.artifacts import load_params, save_params
from radial_jax.radial.config import RadialConfig
from radial_jax.radial.model import RadialModel


def save_student(student: RadialModel, directory, **extra) -> Path:
    """A trained ``RadialModel`` (its base config, ``RadialConfig`` and params), with ``extra`` in its config."""
    return save_params(directory, student.params, student.config, "radial_student",
                       radial=dataclasses.asdict(student.radial), **extra)


def load_student(directory):
    """``(RadialModel, meta)`` saved by ``save_student`` (``radial-jax distill``)."""
    params, config, meta = load_params(directory, "radial_student")
    if "radial" not in meta:
        raise ValueError(f"{directory}/config.json has no 'radial' settings; it was not written by save_student")
    return RadialModel(config, RadialConfig(**meta["radial"]), params), meta
