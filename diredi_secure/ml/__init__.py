"""The DiReDi learning loop: data, models, KD, DP reverse distillation, merge, re-KD.

See docs/METHOD.md for what comes from Sun et al. (2024) and what is ours.
"""

from __future__ import annotations

from .data import (
    Dataset,
    Scenario,
    ScenarioConfig,
    load_digits_dataset,
    load_npz_dataset,
    load_scenario,
    make_scenario,
    save_scenario,
)
from .distill import KDConfig, TrainConfig, distill_student, train_classifier
from .evaluate import Evaluation, accuracy, evaluate
from .loop import LoopConfig, LoopResult, run_loop
from .merge import DeviceKnowledge, MergeConfig, MergeResult, merge_into_teacher
from .models import ModelSpec, build_model, load_model, load_model_bytes, model_bytes, save_model
from .rekd import ReKDConfig, rekd_student
from .reverse import RDConfig, RDResult, reverse_distill, select_rd_config

__all__ = [
    "Dataset",
    "DeviceKnowledge",
    "Evaluation",
    "KDConfig",
    "LoopConfig",
    "LoopResult",
    "MergeConfig",
    "MergeResult",
    "ModelSpec",
    "RDConfig",
    "RDResult",
    "ReKDConfig",
    "Scenario",
    "ScenarioConfig",
    "TrainConfig",
    "accuracy",
    "build_model",
    "distill_student",
    "evaluate",
    "load_digits_dataset",
    "load_model",
    "load_model_bytes",
    "load_npz_dataset",
    "load_scenario",
    "make_scenario",
    "merge_into_teacher",
    "model_bytes",
    "rekd_student",
    "reverse_distill",
    "run_loop",
    "save_model",
    "save_scenario",
    "select_rd_config",
    "train_classifier",
]
