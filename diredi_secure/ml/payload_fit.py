"""Whether a payload fits the model it claims to update and that model's reference set.

The one home of the rule the merge indexes by (:func:`diredi_secure.ml.merge.check_payload_fits`
calls it with the shipped model in hand) and ingest applies before it stores a packet
(``services/cloud.py``, with the shapes read from the release's safetensors headers), so one
packet that does not fit can neither stop a merge nor be charged and stored first (issue 14
finding 7). Shapes only, numpy only: importing this loads no torch.

Every wire dtype decodes to float32 values the merge uses alike, so the dtype is only checked to
be a wire dtype (by the payload decoder); kinds and shapes are checked here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import ConfigError, PayloadInvalid
from ..knowledge import KnowledgePayload, PayloadKind
from .data import NUM_CLASSES

__all__ = ["ModelShapes", "check_entries_fit"]


@dataclass(frozen=True)
class ModelShapes:
    """What a released model and its reference set imply for a payload's entries."""

    parameters: int
    """The model's parameter count: a dense ``weight_delta`` has exactly this many values."""
    reference_rows: int
    """Rows of the reference set: a dense ``reference_logits`` has exactly this many rows."""
    image_shape: tuple[int, ...]
    """One reference input: ``dp_prototypes`` holds one such input per class."""
    classes: int = NUM_CLASSES
    """Classes the merge works in (its logit columns, histogram bins)."""

    def __post_init__(self) -> None:
        if self.parameters < 1 or self.reference_rows < 1 or self.classes < 2 or not self.image_shape \
                or any(d < 1 for d in self.image_shape):
            raise ConfigError(f"model shapes out of range: {self}")


def check_entries_fit(payload: KnowledgePayload, shapes: ModelShapes) -> None:
    """Raise :class:`PayloadInvalid`, naming the entry, unless every entry fits ``shapes``.

    * at most one entry of each kind (the merge reads the first of a kind: a second would be
      charged and stored, and never used);
    * ``label_histogram``: ``classes`` values;
    * ``reference_logits``: ``[rows, classes]``, with ``rows == reference_rows`` when dense, and
      its index inside the reference set when a top-m selection;
    * ``weight_delta``: ``parameters`` values when dense, its index inside the model otherwise;
    * ``dp_prototypes``: ``classes x prod(image_shape)`` values.
    """
    seen: dict[PayloadKind, str] = {}
    classes = shapes.classes
    for entry in payload.tensors:
        name, kind, values, index = entry.name, entry.kind, entry.values, entry.index
        if kind in seen:
            raise PayloadInvalid(
                f"entry {name}: a second {kind.value} entry (after {seen[kind]}); the merge uses one")
        seen[kind] = name
        if kind is PayloadKind.LABEL_HISTOGRAM:
            if values.size != classes:
                raise PayloadInvalid(
                    f"entry {name}: label_histogram must have {classes} values, got shape "
                    f"{list(values.shape)}")
        elif kind is PayloadKind.REFERENCE_LOGITS:
            if values.ndim != 2 or values.shape[1] != classes:
                raise PayloadInvalid(
                    f"entry {name}: reference_logits must be [M, {classes}], got {list(values.shape)}")
            if index is None and values.shape[0] != shapes.reference_rows:
                raise PayloadInvalid(
                    f"entry {name}: reference_logits has {values.shape[0]} rows, reference has "
                    f"{shapes.reference_rows}")
            if index is not None and index.size and int(index.max()) >= shapes.reference_rows:
                raise PayloadInvalid(f"entry {name}: reference_logits index points past the "
                                     f"reference set ({shapes.reference_rows} rows)")
        elif kind is PayloadKind.WEIGHT_DELTA:
            if index is None and values.size != shapes.parameters:
                raise PayloadInvalid(
                    f"entry {name}: weight_delta has {values.size} values, model {shapes.parameters}")
            if index is not None and index.size and int(index.max()) >= shapes.parameters:
                raise PayloadInvalid(f"entry {name}: weight_delta index points past the model's "
                                     f"{shapes.parameters} parameters")
        elif kind is PayloadKind.DP_PROTOTYPES:
            pixels = math.prod(shapes.image_shape)
            if values.size != classes * pixels:
                raise PayloadInvalid(
                    f"entry {name}: dp_prototypes must be [{classes}, {pixels}], got "
                    f"{list(values.shape)}")
