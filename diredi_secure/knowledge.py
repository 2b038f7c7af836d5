"""Knowledge payloads: the tensors a packet carries, and their safetensors encoding.

A payload is one or more :class:`PayloadTensor` entries (DESIGN.md section 2). On the wire it is a
safetensors file holding, per entry, a tensor named ``entry.name`` in the entry's wire dtype and,
for top-m / top-k selections, an int64 tensor ``<name>.index``. The header's
:class:`PayloadDescriptor` declares every entry (kind, dtype, shape, scale, index length) and the
plaintext length and SHA-256; :func:`decode_payload` refuses any disagreement.

Never pickle: bytes are parsed by :mod:`diredi_secure.checkpoint`, which refuses pickle/zip magic.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal, get_args

import numpy as np

from .checkpoint import checkpoint_bytes, load_checkpoint_bytes
from .errors import ModelFormatError, PayloadInvalid, TooLarge
from .policy import DEFAULT_LIMITS, Limits

__all__ = [
    "DPParameters",
    "KnowledgePayload",
    "PayloadDescriptor",
    "PayloadEntry",
    "PayloadKind",
    "PayloadTensor",
    "WireDType",
    "clipped",
    "decode_payload",
    "dequantize_int4",
    "dequantize_int8",
    "encode_payload",
    "quantize_int4",
    "quantize_int8",
    "shown",
]


class PayloadKind(StrEnum):
    REFERENCE_LOGITS = "reference_logits"
    WEIGHT_DELTA = "weight_delta"
    LABEL_HISTOGRAM = "label_histogram"
    DP_PROTOTYPES = "dp_prototypes"


WireDType = Literal["float32", "float16", "int8", "int4"]
_WIRE_DTYPES: tuple[str, ...] = get_args(WireDType)
_NP_DTYPES: dict[str, np.dtype[Any]] = {
    "float32": np.dtype(np.float32),
    "float16": np.dtype(np.float16),
    "int8": np.dtype(np.int8),
    "int4": np.dtype(np.uint8),  # two 4-bit codes per byte
}
_F16_MAX = float(np.finfo(np.float16).max)
_INDEX_SUFFIX = ".index"
# Quantisation scales travel inside the encrypted payload, one float64 scalar per int8/int4 entry:
# a scale is max|values| / 7 (or 127), a function of the data (a weight delta's magnitude falls
# with the user's dataset size), so it must not sit in the plaintext header. The header's scale
# field is then the fixed placeholder 1.0.
_SCALE_SUFFIX = ".scale"
HEADER_SCALE_PLACEHOLDER = 1.0


SHOWN_CHARS = 64
"""The most characters of a peer-supplied value an error message repeats (see :func:`shown`)."""


def clipped(text: str, limit: int = SHOWN_CHARS) -> str:
    """``text`` for an error message, clipped to ``limit`` characters with a marker naming its full
    length: a refusal must not echo a peer's string at full length (a 10,000-character field once
    made a 10,036-character gRPC status, which clients saw as RESOURCE_EXHAUSTED instead of
    ``malformed``). It lives here, the lowest module of the packet core, so that ``envelope``,
    ``serde`` and ``packet`` can all import it."""
    if len(text) <= limit:
        return text
    return f"{text[:limit]}...[clipped, {len(text)} chars]"


def shown(value: object, limit: int = SHOWN_CHARS) -> str:
    """``repr(value)``, clipped as :func:`clipped` does (for a value quoted in a message)."""
    return clipped(repr(value), limit)


def _finite(name: str, value: float) -> float:
    if not math.isfinite(value):
        raise PayloadInvalid(f"{name} must be finite, got {shown(value)}")
    return float(value)


@dataclass(frozen=True)
class DPParameters:
    """DP-SGD parameters as actually used by the run that produced a packet.

    ``epsilon`` is what the accountant reports for training alone; ``total_epsilon`` composes it
    with every noised payload entry (histogram, prototypes). Validated on construction.
    """

    noise_multiplier: float
    clip_norm: float
    sample_rate: float
    steps: int
    accountant: str
    epsilon: float
    delta: float
    poisson_sampling: bool = True
    total_epsilon: float = 0.0
    noise_seeded: bool = False
    """True when the noise came from a fixed research seed (predictable: refused by default)."""

    def __post_init__(self) -> None:
        for name in ("noise_multiplier", "clip_norm", "sample_rate", "delta", "total_epsilon"):
            value = getattr(self, name)
            if not isinstance(value, int | float) or math.isnan(value) or value < 0:
                raise PayloadInvalid(f"DP parameter {name} must be a number >= 0, got {shown(value)}")
        if math.isnan(self.epsilon) or self.epsilon < 0:
            raise PayloadInvalid(f"DP epsilon must be >= 0 (inf for no DP), got {shown(self.epsilon)}")
        if self.sample_rate > 1:
            raise PayloadInvalid(f"sample rate must be at most 1, got {self.sample_rate}")
        if not (0 <= self.delta < 1):
            raise PayloadInvalid(f"delta must lie in [0, 1), got {self.delta}")
        if not isinstance(self.steps, int) or self.steps < 0:
            raise PayloadInvalid(f"steps must be an integer >= 0, got {shown(self.steps)}")
        if len(self.accountant) > 16:
            raise PayloadInvalid("accountant name is longer than 16 characters")

    @property
    def composed_epsilon(self) -> float:
        """The epsilon this packet costs the device's lifetime budget."""
        return max(self.epsilon, self.total_epsilon)


@dataclass(frozen=True)
class PayloadTensor:
    """One payload entry. ``values`` holds the real (dequantised) values as float32."""

    name: str
    kind: PayloadKind
    values: np.ndarray
    dtype: WireDType = "float16"
    index: np.ndarray | None = None
    noise_multiplier: float = 0.0
    epsilon: float = 0.0

    def __post_init__(self) -> None:
        if (
            not self.name
            or len(self.name) > 64
            or not self.name.replace("_", "").replace(".", "").isalnum()
        ):
            raise PayloadInvalid(
                f"payload entry name {shown(self.name)} must be 1-64 chars [A-Za-z0-9_.]"
            )
        if self.name.endswith((_INDEX_SUFFIX, _SCALE_SUFFIX)):
            raise PayloadInvalid(
                f"payload entry name {shown(self.name)} may not end in {_INDEX_SUFFIX} or {_SCALE_SUFFIX}")
        object.__setattr__(self, "kind", PayloadKind(self.kind))
        if self.dtype not in _WIRE_DTYPES:
            raise PayloadInvalid(f"unknown wire dtype {shown(self.dtype)}")
        values = np.asarray(self.values, dtype=np.float32)
        if values.ndim == 0:
            raise PayloadInvalid(f"entry {self.name}: values must have at least one dimension")
        if not np.all(np.isfinite(values)):
            raise PayloadInvalid(f"entry {self.name}: values contain NaN or Inf")
        if self.dtype == "float16" and values.size and float(np.max(np.abs(values))) > _F16_MAX:
            raise PayloadInvalid(f"entry {self.name}: values overflow float16")
        values.setflags(write=False)
        object.__setattr__(self, "values", values)
        if self.index is not None:
            index = np.asarray(self.index, dtype=np.int64).reshape(-1)
            _check_index(self.name, self.kind, index, values)
            index.setflags(write=False)
            object.__setattr__(self, "index", index)
        _finite(f"entry {self.name} noise_multiplier", self.noise_multiplier)
        _finite(f"entry {self.name} epsilon", self.epsilon)
        if self.noise_multiplier < 0 or self.epsilon < 0:
            raise PayloadInvalid(f"entry {self.name}: noise multiplier and epsilon must be >= 0")

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, PayloadTensor):
            return NotImplemented
        same_index = (self.index is None and other.index is None) or (
            self.index is not None
            and other.index is not None
            and np.array_equal(self.index, other.index)
        )
        return (
            (self.name, self.kind, self.dtype, self.noise_multiplier, self.epsilon)
            == (other.name, other.kind, other.dtype, other.noise_multiplier, other.epsilon)
            and self.values.shape == other.values.shape
            and np.array_equal(self.values, other.values)
            and same_index
        )

    __hash__ = None  # type: ignore[assignment]  # holds arrays: equal but not hashable


def _check_index(name: str, kind: PayloadKind, index: np.ndarray, values: np.ndarray) -> None:
    expected = values.shape[0] if kind == PayloadKind.REFERENCE_LOGITS else values.size
    if kind not in (PayloadKind.REFERENCE_LOGITS, PayloadKind.WEIGHT_DELTA):
        raise PayloadInvalid(f"entry {clipped(name)}: kind {kind.value} takes no index")
    if index.size != expected:
        raise PayloadInvalid(
            f"entry {clipped(name)}: index has {index.size} elements, values need {expected}"
        )
    if index.size and (int(index.min()) < 0 or np.unique(index).size != index.size):
        raise PayloadInvalid(f"entry {clipped(name)}: index must be non-negative and without duplicates")


@dataclass(frozen=True)
class PayloadEntry:
    """What the header declares about one entry (no values)."""

    name: str
    kind: PayloadKind
    dtype: WireDType
    shape: tuple[int, ...]
    scale: float = 0.0
    noise_multiplier: float = 0.0
    epsilon: float = 0.0
    index_length: int = 0


@dataclass(frozen=True)
class PayloadDescriptor:
    """The header's description of the plaintext payload."""

    entries: tuple[PayloadEntry, ...]
    length: int
    sha256: bytes


@dataclass(frozen=True)
class KnowledgePayload:
    """The decoded content of a packet: one or more entries with unique names."""

    tensors: tuple[PayloadTensor, ...]

    def __post_init__(self) -> None:
        object.__setattr__(self, "tensors", tuple(self.tensors))
        if not self.tensors:
            raise PayloadInvalid("a payload needs at least one entry")
        names = [t.name for t in self.tensors]
        if len(set(names)) != len(names):
            raise PayloadInvalid(f"duplicate payload entry names: {sorted(names)}")

    def get(self, kind: PayloadKind) -> PayloadTensor | None:
        """The first entry of ``kind``, or None."""
        return next((t for t in self.tensors if t.kind == kind), None)

    @property
    def epsilon_of_entries(self) -> float:
        """Sum of the entries' own epsilons (noised histogram, prototypes)."""
        return float(sum(t.epsilon for t in self.tensors))


def quantize_int8(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor int8 quantisation: ``values ~= q * scale``, ``|q| <= 127``."""
    values = np.asarray(values, dtype=np.float32)
    peak = float(np.max(np.abs(values))) if values.size else 0.0
    scale = peak / 127.0 if peak > 0 else 1.0
    q = np.clip(np.rint(values / scale), -127, 127).astype(np.int8)
    return q, scale


def dequantize_int8(q: np.ndarray, scale: float) -> np.ndarray:
    return (np.asarray(q, dtype=np.float32) * np.float32(scale)).astype(np.float32)


_INT4_ZERO = 8  # code of 0.0; codes 1..15 stand for -7..7 steps, code 0 is never written


def quantize_int4(values: np.ndarray) -> tuple[np.ndarray, float]:
    """Symmetric per-tensor 4-bit quantisation, packed two codes per byte (low nibble first).

    ``values ~= (code - 8) * scale`` with codes in 1..15; an odd count pads the last high nibble
    with 8 (zero). Returns ``(packed uint8 of length ceil(n / 2), scale)``. Hand-written because no
    library we use defines a 4-bit safetensors dtype; the format is pinned by tests.
    """
    flat = np.asarray(values, dtype=np.float32).reshape(-1)
    peak = float(np.max(np.abs(flat))) if flat.size else 0.0
    scale = peak / 7.0 if peak > 0 else 1.0
    codes = (np.clip(np.rint(flat / scale), -7, 7).astype(np.int16) + _INT4_ZERO).astype(np.uint8)
    if codes.size % 2:
        codes = np.append(codes, np.uint8(_INT4_ZERO))
    packed = (codes[0::2] | (codes[1::2] << 4)).astype(np.uint8)
    return packed, scale


def dequantize_int4(packed: np.ndarray, scale: float, count: int) -> np.ndarray:
    """Unpack ``count`` values from :func:`quantize_int4` output (unchecked; see decode_payload)."""
    packed = np.asarray(packed, dtype=np.uint8)
    codes = np.empty(packed.size * 2, dtype=np.int16)
    codes[0::2] = packed & 0x0F
    codes[1::2] = packed >> 4
    return ((codes[:count] - _INT4_ZERO).astype(np.float32) * np.float32(scale)).astype(np.float32)


def _check_int4(name: str, packed: np.ndarray, count: int) -> None:
    if packed.shape != ((count + 1) // 2,):
        raise PayloadInvalid(
            f"entry {clipped(name)}: int4 needs {(count + 1) // 2} packed bytes, got shape {packed.shape}"
        )
    low, high = packed & 0x0F, packed >> 4
    if np.any(low == 0) or np.any(high[: count // 2] == 0):
        raise PayloadInvalid(f"entry {clipped(name)}: int4 code 0 is never written")
    if count % 2 and packed.size and int(high[-1]) != _INT4_ZERO:
        raise PayloadInvalid(f"entry {clipped(name)}: int4 pad nibble must be {_INT4_ZERO}")


def encode_payload(payload: KnowledgePayload) -> tuple[bytes, PayloadDescriptor]:
    """Encode ``payload`` as safetensors bytes and the descriptor the header will declare.

    int8 entries are quantised here; the decoded values are the dequantised ones, so a receiver
    sees exactly ``dequantize_int8(quantize_int8(v))``.
    """
    tensors: dict[str, np.ndarray] = {}
    entries: list[PayloadEntry] = []
    for t in payload.tensors:
        scale = 0.0
        if t.dtype == "int8":
            wire, scale = quantize_int8(t.values)
        elif t.dtype == "int4":
            wire, scale = quantize_int4(t.values)
        else:
            wire = t.values.astype(_NP_DTYPES[t.dtype])
        tensors[t.name] = wire
        if t.dtype in ("int8", "int4"):
            tensors[t.name + _SCALE_SUFFIX] = np.array([scale], dtype=np.float64)
            scale = HEADER_SCALE_PLACEHOLDER
        if t.index is not None:
            tensors[t.name + _INDEX_SUFFIX] = t.index
        entries.append(
            PayloadEntry(
                name=t.name,
                kind=t.kind,
                dtype=t.dtype,
                shape=tuple(int(d) for d in t.values.shape),
                scale=scale,
                noise_multiplier=t.noise_multiplier,
                epsilon=t.epsilon,
                index_length=0 if t.index is None else int(t.index.size),
            )
        )
    data = checkpoint_bytes(tensors, {"format": "diredi-payload-v2"})
    return data, PayloadDescriptor(tuple(entries), len(data), hashlib.sha256(data).digest())


def check_descriptor(descriptor: PayloadDescriptor, limits: Limits = DEFAULT_LIMITS) -> None:
    """Check a declared descriptor against the caps, before any decryption."""
    if descriptor.length > limits.max_payload_bytes:
        raise TooLarge("declared payload", descriptor.length, limits.max_payload_bytes)
    if not descriptor.entries:
        raise PayloadInvalid("the header declares no payload entries")
    if len(descriptor.entries) > limits.max_entries:
        raise PayloadInvalid(
            f"the header declares {len(descriptor.entries)} entries, over the cap of {limits.max_entries}"
        )
    if len(descriptor.sha256) != 32:
        raise PayloadInvalid("payload SHA-256 must be 32 bytes")
    for e in descriptor.entries:
        if e.dtype not in _WIRE_DTYPES:
            raise PayloadInvalid(f"entry {clipped(e.name)}: unknown dtype {shown(e.dtype)}")
        if not e.shape or len(e.shape) > limits.max_tensor_rank:
            raise PayloadInvalid(
                f"entry {clipped(e.name)}: rank {len(e.shape)} outside 1..{limits.max_tensor_rank}"
            )
        # Every dimension is bounded on its own: a shape like [2^63, 0] has product 0 and used
        # to reach numpy's reshape, which raised a bare ValueError (issue 14 finding 4).
        if any(not (1 <= d <= limits.max_tensor_elements) for d in e.shape):
            raise PayloadInvalid(
                f"entry {clipped(e.name)}: every dimension must lie in 1..{limits.max_tensor_elements}")
        if (
            math.prod(e.shape) > limits.max_tensor_elements
            or e.index_length > limits.max_tensor_elements
        ):
            raise PayloadInvalid(f"entry {clipped(e.name)}: declared size over the element cap")
        if e.dtype in ("int8", "int4") and not (math.isfinite(e.scale) and e.scale > 0):
            raise PayloadInvalid(
                f"entry {clipped(e.name)}: {e.dtype} needs a positive finite scale, got {e.scale}"
            )


def decode_payload(
    data: bytes,
    descriptor: PayloadDescriptor,
    limits: Limits = DEFAULT_LIMITS,
    *,
    max_l2_norm: float | None = None,
) -> KnowledgePayload:
    """Decode and validate payload bytes against what the header declared.

    Trusted: ``descriptor`` (it came from an authenticated header). Untrusted: ``data``. Checks the
    length and SHA-256, that the file is safetensors (pickle is refused), that the tensor set,
    dtypes and shapes are exactly as declared, that every value is finite and, if
    ``max_l2_norm`` is given, that every entry's L2 norm is within it. Raises
    :class:`PayloadInvalid` (or :class:`TooLarge`) naming the first disagreement.
    """
    check_descriptor(descriptor, limits)
    if len(data) != descriptor.length:
        raise PayloadInvalid(
            f"payload is {len(data)} bytes, the header declares {descriptor.length}"
        )
    if hashlib.sha256(data).digest() != descriptor.sha256:
        raise PayloadInvalid("payload SHA-256 differs from the header's")
    try:
        raw, _meta = load_checkpoint_bytes(data, max_bytes=limits.max_payload_bytes)
    except ModelFormatError as exc:
        raise PayloadInvalid(f"payload is not safetensors: {exc.message}") from exc
    expected_names = (
        {e.name for e in descriptor.entries}
        | {e.name + _INDEX_SUFFIX for e in descriptor.entries if e.index_length}
        | {e.name + _SCALE_SUFFIX for e in descriptor.entries if e.dtype in ("int8", "int4")}
    )
    if set(raw) != expected_names:
        raise PayloadInvalid(
            f"payload tensors {shown(sorted(raw), 256)} differ from the declared "
            f"{shown(sorted(expected_names), 256)}"
        )
    tensors: list[PayloadTensor] = []
    for e in descriptor.entries:
        wire = raw[e.name]
        if wire.dtype != _NP_DTYPES[e.dtype]:
            raise PayloadInvalid(
                f"entry {clipped(e.name)}: dtype {wire.dtype} but the header declares {e.dtype}"
            )
        scale = e.scale
        if e.dtype in ("int8", "int4"):
            sw = raw[e.name + _SCALE_SUFFIX]
            if sw.dtype != np.float64 or sw.shape != (1,) or not (
                math.isfinite(float(sw[0])) and float(sw[0]) > 0
            ):
                raise PayloadInvalid(f"entry {clipped(e.name)}: its scale must be one positive finite float64")
            scale = float(sw[0])
        if e.dtype == "int4":
            count = math.prod(e.shape)
            _check_int4(e.name, wire, count)
            values = dequantize_int4(wire, scale, count).reshape(e.shape)
        elif tuple(wire.shape) != e.shape:
            raise PayloadInvalid(
                f"entry {clipped(e.name)}: shape {tuple(wire.shape)} but the header declares {e.shape}"
            )
        elif e.dtype == "int8":
            values = dequantize_int8(wire, scale)
        else:
            values = np.asarray(wire, dtype=np.float32)  # no copy for float32
        if not np.all(np.isfinite(values)):
            raise PayloadInvalid(f"entry {clipped(e.name)}: values contain NaN or Inf")
        if max_l2_norm is not None:
            flat = values.reshape(-1)
            # float32 dot: an overflow gives inf, which is refused -- the conservative direction
            norm = float(np.sqrt(np.dot(flat, flat)))
            if not norm <= max_l2_norm:
                raise PayloadInvalid(
                    f"entry {clipped(e.name)}: L2 norm {norm:.4g} over the bound {max_l2_norm:.4g}"
                )
        index = None
        if e.index_length:
            index = raw[e.name + _INDEX_SUFFIX]
            if index.dtype != np.int64 or index.shape != (e.index_length,):
                raise PayloadInvalid(
                    f"entry {clipped(e.name)}: index must be int64 of length {e.index_length}"
                )
        tensors.append(
            PayloadTensor(
                name=e.name,
                kind=e.kind,
                values=values,
                dtype=e.dtype,
                index=index,
                noise_multiplier=e.noise_multiplier,
                epsilon=e.epsilon,
            )
        )
    return KnowledgePayload(tuple(tensors))
