"""Training: LM training of sequential teachers, distillation into routed students, checkpoints, data.

Public API::

    from radial_jax.training import train_lm, distill, text_data, TrainConfig, OptimConfig, DistillConfig
    model, history = train_lm(rj.OPTConfig(...), text_data("embedded"), steps=300, run_dir="runs/teacher")
"""
from radial_jax.training.adapt import AdaptConfig, adapt, load_adapted, save_adapted
from radial_jax.training.checkpoint import Checkpointer, CheckpointMismatchError
from radial_jax.training.distill_loss import DistillConfig
from radial_jax.training.distill import distill
from radial_jax.training.lm import train_lm
from radial_jax.training.lora import LoraConfig
from radial_jax.training.loop import TrainConfig, fit
from radial_jax.training.memory import MemoryConfig
from radial_jax.training.optim import OptimConfig, make_optimizer
from radial_jax.data.packed import PackedDataset, TextData, text_data
from radial_jax.training.state import TrainState
from radial_jax.training.steps import NonFiniteLossError, make_sharded_train_step, make_train_step
from radial_jax.training.targets import TeacherTargets, compute_targets

__all__ = ["Checkpointer", "CheckpointMismatchError", "DistillConfig", "distill", "train_lm", "TrainConfig", "fit",
           "MemoryConfig", "OptimConfig", "make_optimizer", "PackedDataset", "TextData", "text_data", "TrainState",
           "NonFiniteLossError", "make_sharded_train_step", "make_train_step", "AdaptConfig", "adapt", "load_adapted",
           "save_adapted", "LoraConfig", "TeacherTargets", "compute_targets"]
