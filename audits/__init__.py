"""Privacy-leakage audit suite for DiReDi knowledge packets (installed as
``diredi_secure.audits``).

Modules: :mod:`.accounting` (packet and lifetime accounting through ``diredi_secure.privacy``),
:mod:`.mechanisms` (lying-device controls, histogram/prototype attacks, ceiling, per-mechanism
verdict),
:mod:`.metrics` (ROC, AUC, TPR at low FPR with Clopper-Pearson intervals, DP consistency),
:mod:`.canary` (one-run audit of Steinke, Nasr & Jagielski 2023), :mod:`.membership` (loss
threshold, offline LiRA), :mod:`.reconstruction`, :mod:`.inspection`, :mod:`.suite` (the end-to-end
audit), :mod:`.profiles` (fast/full), :mod:`.gate` (the release gate: ``run_release_gate``),
:mod:`.report` and :mod:`.cli`. Heavy modules (torch) are imported on use only.
"""

from __future__ import annotations

__all__ = ["accounting", "canary", "mechanisms", "membership", "metrics"]
