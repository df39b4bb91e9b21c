"""The distillation study (docs/design.md §5) as one driver: an ordered phase, then a radial phase continued
from it, or any sequence of phases. ``radial-jax pipeline``, ``radial-jax distill`` and
``experiments/radial_vs_ordered.py`` describe their runs as ``Phase`` values and run them here.

    phases = ordered_then_radial(DistillConfig(), TrainConfig(steps=300), TrainConfig(steps=300))
    students, history = distill_phases(teacher, data, phases, run_dirs={"ordered": a, "radial": b})
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Dict, Mapping, Optional, Sequence, Tuple

from radial_jax.radial.artifacts import load_student, save_student
from radial_jax.radial.config import MODES
from radial_jax.training.distill import distill
from radial_jax.training.distill_loss import DistillConfig
from radial_jax.training.loop import TrainConfig


@dataclasses.dataclass(frozen=True)
class Phase:
    """One phase: the student's mode, its training run and its loss settings."""

    mode: str
    train: TrainConfig
    cfg: DistillConfig = DistillConfig()

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"a phase's mode must be one of {MODES}, got {self.mode!r}")


def ordered_then_radial(cfg: DistillConfig, ordered: TrainConfig, radial: Optional[TrainConfig] = None,
                        radial_cfg: Optional[DistillConfig] = None) -> Tuple[Phase, ...]:
    """The study's phases: ordered with ``cfg``, then (when ``radial`` has steps) radial with ``radial_cfg``
    (default ``cfg.radial_phase()``), continued from the ordered student."""
    phases = (Phase("ordered", ordered, cfg),)
    if radial is not None and radial.steps > 0:
        phases += (Phase("radial", radial, radial_cfg or cfg.radial_phase()),)
    return phases


def check_phases(phases: Sequence[Phase]) -> None:
    """Refuse, before any work, a sequence a student cannot follow: none, a mode twice, or an ordered phase after
    a radial one (a radial network does not become ordered again)."""
    modes = [p.mode for p in phases]
    if modes not in (["ordered"], ["radial"], ["ordered", "radial"]):
        raise ValueError(f"phases {modes} cannot follow one another; allowed: ['ordered'], ['radial'] or "
                         "['ordered', 'radial'] (the radial phase continues the ordered student)")


def distill_phases(teacher, data, phases: Sequence[Phase], *, run_dirs: Mapping[str, Optional[Path]],
                   radial_kwargs: Optional[dict] = None, students_dir: Optional[Path] = None,
                   save_meta: Optional[dict] = None, progress: bool = True, mesh=None, memory=None,
                   rules=None) -> Tuple[Dict[str, object], list]:
    """Run ``phases`` in order, each after the first continued from the student before it (a radial phase after
    an ordered one starts where that student is: ``RadialModel.to_radial``). Returns ``({mode: student},
    history)``, the histories of the phases run here one after the other.

    ``run_dirs``: each phase's run directory (checkpoints, metrics), by mode. ``radial_kwargs``: the first
    phase's ``RadialConfig`` fields (later phases keep them). ``students_dir``: each phase's student is saved
    to ``students_dir / mode`` (with ``save_meta`` and the phase's ``DistillConfig``), and a phase whose student
    is already there is not run again. ``mesh`` / ``memory`` / ``rules``: as ``distill``.
    """
    check_phases(phases)
    missing = [p.mode for p in phases if p.mode not in run_dirs]
    if missing:
        raise ValueError(f"run_dirs has no directory for the {missing} phase(s)")
    students, history, previous = {}, [], None
    for i, phase in enumerate(phases):
        saved = None if students_dir is None else Path(students_dir) / phase.mode
        if saved is not None and (saved / "config.json").is_file():
            students[phase.mode], _ = load_student(saved)
            print(f"[distill] reusing {saved}")
        else:
            students[phase.mode], more = distill(
                teacher, data, cfg=phase.cfg, mode=phase.mode, start=previous, train=phase.train,
                run_dir=run_dirs[phase.mode], progress=progress, radial_kwargs=radial_kwargs if i == 0 else None,
                mesh=mesh, memory=memory, rules=rules)
            history += more
            if saved is not None:
                save_student(students[phase.mode], saved, distill=dataclasses.asdict(phase.cfg), **(save_meta or {}))
        previous = students[phase.mode]
    return students, history
