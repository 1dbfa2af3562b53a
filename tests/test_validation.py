"""Update validation: every rejection reason, and fuzzed envelopes never crash."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge.modelio import ModelLayout, encode_update
from edge.wire import ModelUpdate, TensorSpec
from server_stub.validation import Decoded, RejectCode, Rejected, UpdateValidator

LAYOUT = ModelLayout((("w0", (4, 3)), ("b0", (3,))))
KEY = b"secret-key"


def delta(scale: float = 0.1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {n: (rng.standard_normal(s) * scale).astype(np.float32) for n, s in LAYOUT.entries}


def make_update(
    d: dict[str, np.ndarray] | None = None,
    *,
    codec: str = "raw",
    cid: str = "a",
    num_examples: int = 10,
    aux: dict[str, np.ndarray] | None = None,
) -> ModelUpdate:
    specs, payloads = encode_update(d if d is not None else delta(), {"id": codec}, aux=aux)
    return ModelUpdate("t1", 1, 0, cid, num_examples, specs, payloads, nonce="n")


def validator(**kw: object) -> UpdateValidator:
    return UpdateValidator(LAYOUT, **kw)  # type: ignore[arg-type]


def reason(result: object) -> RejectCode:
    assert isinstance(result, Rejected), result
    return result.reason


def test_valid_update_decodes() -> None:
    v = validator()
    update = v.parse(make_update().to_bytes(), "a")
    assert isinstance(update, ModelUpdate)
    decoded = v.decode(update)
    assert isinstance(decoded, Decoded)
    np.testing.assert_allclose(decoded.delta, LAYOUT.flatten(delta()))


def test_bad_envelope() -> None:
    assert reason(validator().parse(b"garbage", "a")) is RejectCode.BAD_ENVELOPE


def test_bad_signature_wrong_key() -> None:
    v = validator(keys=lambda cid: KEY)
    assert reason(v.parse(make_update().to_bytes(b"other"), "a")) is RejectCode.BAD_SIGNATURE


def test_unsigned_rejected_when_key_configured() -> None:
    v = validator(keys=lambda cid: KEY)
    assert reason(v.parse(make_update().to_bytes(), "a")) is RejectCode.BAD_SIGNATURE
    assert isinstance(v.parse(make_update().to_bytes(KEY), "a"), ModelUpdate)


def test_signature_required() -> None:
    v = validator(require_signature=True)
    assert reason(v.parse(make_update().to_bytes(), "a")) is RejectCode.BAD_SIGNATURE


def test_wrong_cid() -> None:
    assert reason(validator().parse(make_update(cid="b").to_bytes(), "a")) is RejectCode.WRONG_CID


def test_layout_mismatch() -> None:
    bad = make_update({"w0": np.zeros((4, 2), np.float32), "b0": np.zeros(3, np.float32)})
    assert reason(validator().decode(bad)) is RejectCode.LAYOUT_MISMATCH


def test_missing_required_aux() -> None:
    v = validator(aux={"aux/scaffold": LAYOUT.size})
    assert reason(v.decode(make_update())) is RejectCode.LAYOUT_MISMATCH
    ok = make_update(aux={"aux/scaffold": np.zeros(LAYOUT.size, np.float32)})
    assert isinstance(v.decode(ok), Decoded)


def test_corrupt_payload() -> None:
    good = make_update()
    bad = ModelUpdate("t1", 1, 0, "a", 10, good.tensors, (good.payloads[0][:-4], good.payloads[1]))
    assert reason(validator().decode(bad)) is RejectCode.CORRUPT_PAYLOAD


def test_non_finite() -> None:
    # Codecs refuse to encode NaN, so forge the raw payload.
    good = make_update()
    nan = np.array([0.0, np.nan, 0.0], dtype="<f4").tobytes()
    bad = ModelUpdate("t1", 1, 0, "a", 10, good.tensors, (good.payloads[0], nan))
    assert reason(validator().decode(bad)) is RejectCode.NON_FINITE


def test_non_finite_aux() -> None:
    v = validator(aux={"aux/scaffold": 3})
    good = make_update(aux={"aux/scaffold": np.zeros(3, np.float32)})
    nan = np.array([0.0, np.inf, 0.0], dtype="<f4").tobytes()
    bad = ModelUpdate("t1", 1, 0, "a", 10, good.tensors, (*good.payloads[:2], nan))
    assert reason(v.decode(bad)) is RejectCode.NON_FINITE


def test_norm_bound() -> None:
    assert reason(validator(max_update_norm=1e-3).decode(make_update())) is (
        RejectCode.NORM_TOO_LARGE
    )


@pytest.mark.parametrize(("num", "limit"), [(0, None), (11, 10)])
def test_bad_num_examples(num: int, limit: int | None) -> None:
    v = validator()
    assert reason(v.decode(make_update(num_examples=num), max_examples=limit)) is (
        RejectCode.BAD_NUM_EXAMPLES
    )


def test_block_i8_update_accepted() -> None:
    decoded = validator().decode(make_update(codec="block_i8"))
    assert isinstance(decoded, Decoded)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=512))
def test_fuzzed_bytes_never_crash(data: bytes) -> None:
    assert isinstance(validator(keys=lambda cid: KEY).parse(data, "a"), Rejected)


@settings(max_examples=200, deadline=None)
@given(st.data())
def test_mutated_envelopes_never_crash(data: st.DataObject) -> None:
    raw = bytearray(make_update(codec="block_i8").to_bytes())
    for _ in range(data.draw(st.integers(1, 8))):
        i = data.draw(st.integers(0, len(raw) - 1))
        raw[i] = data.draw(st.integers(0, 255))
    v = validator()
    parsed = v.parse(bytes(raw), "a")
    if isinstance(parsed, ModelUpdate):
        assert isinstance(v.decode(parsed), Decoded | Rejected)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(st.text(min_size=1, max_size=8), st.lists(st.integers(0, 5), max_size=3)),
        max_size=4,
    )
)
def test_arbitrary_tensor_lists_never_crash(tensors: list[tuple[str, list[int]]]) -> None:
    names = {n for n, _ in tensors}
    if len(names) != len(tensors):
        return
    specs = tuple(TensorSpec(n, tuple(s), {"id": "raw"}) for n, s in tensors)
    payloads = tuple(b"\0" * 4 * int(np.prod(s)) for _, s in tensors)
    update = ModelUpdate("t1", 1, 0, "a", 5, specs, payloads)
    assert isinstance(validator().decode(update), Decoded | Rejected)
