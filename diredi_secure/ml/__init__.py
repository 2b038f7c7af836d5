"""The DiReDi learning loop: data, models, KD, DP reverse distillation, merge, re-KD.

See docs/METHOD.md for what comes from Sun et al. (2024) and what is ours.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # the real names, for type checkers
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
    from .models import (
        ModelSpec,
        build_model,
        load_model,
        load_model_bytes,
        model_bytes,
        save_model,
    )
    from .rekd import ReKDConfig, rekd_student
    from .reverse import RDConfig, RDResult, reverse_distill, select_rd_config

# Names resolve lazily (PEP 562): importing diredi_secure.ml (e.g. for the CLI's sub-commands)
# must not import torch and Opacus until a name that needs them is used.
_EXPORTS: dict[str, str] = {
    "Dataset": "data",
    "DeviceKnowledge": "merge",
    "Evaluation": "evaluate",
    "KDConfig": "distill",
    "LoopConfig": "loop",
    "LoopResult": "loop",
    "MergeConfig": "merge",
    "MergeResult": "merge",
    "ModelSpec": "models",
    "RDConfig": "reverse",
    "RDResult": "reverse",
    "ReKDConfig": "rekd",
    "Scenario": "data",
    "ScenarioConfig": "data",
    "TrainConfig": "distill",
    "accuracy": "evaluate",
    "build_model": "models",
    "distill_student": "distill",
    "evaluate": "evaluate",
    "load_digits_dataset": "data",
    "load_model": "models",
    "load_model_bytes": "models",
    "load_npz_dataset": "data",
    "load_scenario": "data",
    "make_scenario": "data",
    "merge_into_teacher": "merge",
    "model_bytes": "models",
    "rekd_student": "rekd",
    "reverse_distill": "reverse",
    "run_loop": "loop",
    "save_model": "models",
    "save_scenario": "data",
    "select_rd_config": "reverse",
    "train_classifier": "distill",
}


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


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
