"""Tests of edge.wire: topics, JSON messages, the binary envelope and the golden v1 files."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import re
import struct
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from edge import wire
from edge.wire import (
    BadMagicError,
    BadTopicError,
    ChecksumError,
    EnvelopeError,
    EnvelopeHeader,
    EnvelopeKind,
    GlobalModel,
    MessageError,
    ModelManifest,
    ModelUpdate,
    OversizeError,
    SignatureError,
    Status,
    TensorSpec,
    TopicKind,
    Topics,
    TrainTask,
    TruncatedError,
    VersionError,
    WireError,
    decode_envelope,
    encode_envelope,
    validate_id,
)
from tests import regen_fixtures as golden

KEY = b"k" * 32

# --------------------------------------------------------------------------- topics


def test_topic_names() -> None:
    t = Topics("lab")
    assert t.status("pi-01") == "fl/v1/lab/clients/pi-01/status"
    assert t.task("pi-01") == "fl/v1/lab/clients/pi-01/task"
    assert t.update("pi-01") == "fl/v1/lab/clients/pi-01/update"
    assert t.model_manifest() == "fl/v1/lab/model/manifest"
    assert t.model_chunk(3, 12) == "fl/v1/lab/model/3/12"
    assert t.model_all() == "fl/v1/lab/model/#"
    assert t.all_status() == "fl/v1/lab/clients/+/status"
    assert t.all_updates() == "fl/v1/lab/clients/+/update"
    assert t.shared_updates() == "$share/aggregators/fl/v1/lab/clients/+/update"


@pytest.mark.parametrize(
    ("topic", "expected"),
    [
        ("fl/v1/lab/clients/pi-01/status", (TopicKind.STATUS, "pi-01")),
        ("fl/v1/lab/clients/pi-01/task", (TopicKind.TASK, "pi-01")),
        ("fl/v1/lab/clients/pi-01/update", (TopicKind.UPDATE, "pi-01")),
        ("fl/v1/lab/model/manifest", (TopicKind.MODEL_MANIFEST, None)),
        ("fl/v1/lab/model/4/0", (TopicKind.MODEL_CHUNK, None)),
    ],
)
def test_parse_topic(topic: str, expected: tuple[TopicKind, str | None]) -> None:
    assert Topics("lab").parse(topic) == expected


def test_parse_model_chunk() -> None:
    assert Topics("lab").parse_model_chunk("fl/v1/lab/model/4/17") == (4, 17)


@pytest.mark.parametrize(
    "topic",
    [
        "fl/v1/other/clients/pi-01/status",
        "fl/v1/lab/clients/pi-01/weird",
        "fl/v1/lab/clients/pi+/status",
        "fl/v1/lab/clients//status",
        "fl/v1/lab/clients/a/b/status",
        "fl/v1/lab/model/x/1",
        "fl/v1/lab/model/١/1",
        "fl/v1/lab",
        "",
    ],
)
def test_parse_rejects(topic: str) -> None:
    with pytest.raises(BadTopicError):
        Topics("lab").parse(topic)


@pytest.mark.parametrize(
    ("bad", "words"),
    [
        ("", "empty"),
        ("a+b", "forbidden"),
        ("a#", "forbidden"),
        ("a/b", "forbidden"),
        ("$SYS", "forbidden"),
        ("a b", "forbidden"),
        ("a\0", "forbidden"),
        ("x" * 65, "limit is 64"),
        ("-lead", "must start"),
    ],
)
def test_validate_id_rejects(bad: str, words: str) -> None:
    with pytest.raises(BadTopicError, match=words):
        validate_id(bad)


def test_bad_ids_rejected_by_topic_builders() -> None:
    with pytest.raises(BadTopicError):
        Topics("lab").update("pi/../x")
    with pytest.raises(BadTopicError):
        Topics("fl+")


@given(st.from_regex(r"[A-Za-z0-9_][A-Za-z0-9_.:@-]{0,63}", fullmatch=True))
def test_topic_roundtrip(cid: str) -> None:
    t = Topics("fleet-1")
    assert t.parse(t.status(cid)) == (TopicKind.STATUS, cid)


def test_error_tree() -> None:
    assert issubclass(WireError, ValueError)
    for exc in (TruncatedError, ChecksumError, SignatureError, VersionError, OversizeError):
        assert issubclass(exc, EnvelopeError)
    for exc in (BadTopicError, MessageError, EnvelopeError, wire.ChunkError):
        assert issubclass(exc, WireError)


# --------------------------------------------------------------------------- JSON messages


def test_status_roundtrip() -> None:
    status = golden.golden_status()
    assert Status.from_bytes(status.to_bytes()) == status


def test_status_without_battery_is_null() -> None:
    status = golden.golden_status()
    no_battery = Status(**{**_fields(status), "battery": None, "declined": None})
    obj = json.loads(no_battery.to_bytes())
    assert obj["battery"] is None
    assert Status.from_bytes(no_battery.to_bytes()) == no_battery


def test_offline_will() -> None:
    will = Status.offline_will()
    assert json.loads(will.to_bytes()) == {"v": 1, "online": False}
    assert Status.from_bytes(b'{"v":1,"online":false}') == will


def test_status_ignores_unknown_fields() -> None:
    obj = json.loads(golden.golden_status().to_bytes())
    obj["future_field"] = {"x": 1}
    obj["cpu"]["future"] = 3
    assert Status.from_bytes(json.dumps(obj).encode()) == golden.golden_status()


@pytest.mark.parametrize("field", ["online", "ts", "battery", "cpu", "mem", "net", "train", "caps"])
def test_status_missing_required_field(field: str) -> None:
    obj = json.loads(golden.golden_status().to_bytes())
    del obj[field]
    with pytest.raises(MessageError, match=field):
        Status.from_bytes(json.dumps(obj).encode())


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("battery", "percent"), 120),
        (("cpu", "cores"), 0),
        (("cpu", "cores"), 1.5),
        (("net", "kind"), "carrier-pigeon"),
        (("train", "num_examples"), -1),
        (("online",), "yes"),
        (("state",), "Not An Id"),
    ],
)
def test_status_bad_values(path: tuple[str, ...], value: object) -> None:
    obj = json.loads(golden.golden_status().to_bytes())
    target = obj
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(MessageError):
        Status.from_bytes(json.dumps(obj).encode())


@pytest.mark.parametrize("cls", [Status, TrainTask, ModelManifest])
def test_json_version_mismatch(cls: type[Status] | type[TrainTask] | type[ModelManifest]) -> None:
    with pytest.raises(VersionError, match="v=2"):
        cls.from_bytes(b'{"v":2,"online":false}')


@pytest.mark.parametrize("cls", [Status, TrainTask, ModelManifest])
def test_json_missing_version(cls: type[Status] | type[TrainTask] | type[ModelManifest]) -> None:
    with pytest.raises(MessageError, match="'v'"):
        cls.from_bytes(b'{"online":false}')


def test_task_roundtrip_and_alias() -> None:
    task = golden.golden_task()
    again = TrainTask.from_bytes(task.to_bytes())
    assert again == task
    assert again.round == again.round_no == 7
    assert again.train.extra == {"local_steps": 50.0}


@pytest.mark.parametrize("field", ["task_id", "round", "model_version", "deadline_ts", "train"])
def test_task_missing_field(field: str) -> None:
    obj = json.loads(golden.golden_task().to_bytes())
    del obj[field]
    with pytest.raises(MessageError, match=field):
        TrainTask.from_bytes(json.dumps(obj).encode())


def test_task_rejects_non_finite() -> None:
    raw = golden.golden_task().to_bytes().replace(b'"lr":0.05', b'"lr":NaN')
    with pytest.raises(MessageError):
        TrainTask.from_bytes(raw)


def test_task_validated_on_construction() -> None:
    with pytest.raises(MessageError, match="epochs"):
        wire.TrainParams(epochs=0, batch_size=1, lr=0.1)


def test_task_topic_carries_tasks_and_cancels() -> None:
    task = golden.golden_task()
    cancel = wire.TaskCancel(task.task_id, "round_complete")
    assert cancel.to_bytes() == b'{"v":1,"cancel":"%s","reason":"round_complete"}' % (
        task.task_id.encode()
    )
    assert wire.parse_task_message(task.to_bytes()) == task
    assert wire.parse_task_message(cancel.to_bytes()) == cancel
    assert wire.parse_task_message(b'{"v":1,"cancel":"t1"}') == wire.TaskCancel("t1", "unspecified")


@pytest.mark.parametrize(
    ("raw", "words"),
    [
        (b'{"v":1,"cancel":""}', "cancel is empty"),
        (b'{"v":1,"cancel":7}', "cancel must be a string"),
        (b'{"v":1,"cancel":"t1","reason":3}', "cancel reason must be a string"),
        (b'{"v":1,"cancel":"t1","reason":"' + b"x" * 65 + b'"}', "the limit is 64"),
        (b'{"v":1,"cancel":"t1","reason":"a\\nb"}', "non-printable"),
        (b'{"v":2,"cancel":"t1"}', "cancel has v=2"),
        (b'{"cancel":"t1"}', "cancel misses required field 'v'"),
        (b'["cancel"]', "task must be a JSON object"),
    ],
)
def test_bad_cancel_is_a_message_error(raw: bytes, words: str) -> None:
    with pytest.raises(WireError, match=re.escape(words)):
        wire.parse_task_message(raw)


@given(data=st.binary(max_size=200))
@settings(max_examples=150)
def test_task_topic_fuzz_only_wire_errors(data: bytes) -> None:
    with contextlib.suppress(WireError):
        wire.parse_task_message(data)
    with contextlib.suppress(WireError):
        wire.parse_task_message(b'{"v":1,"cancel":' + data + b"}")


_json_messages = [Status, TrainTask, ModelManifest]


@pytest.mark.parametrize("cls", _json_messages)
@given(data=st.binary(max_size=300))
@settings(max_examples=150, suppress_health_check=[HealthCheck.function_scoped_fixture])
def test_json_fuzz_bytes_only_wire_errors(cls: type[Status], data: bytes) -> None:
    with contextlib.suppress(WireError):
        cls.from_bytes(data)


_json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=8),
    lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
    max_leaves=12,
)


@pytest.mark.parametrize("which", ["status", "task"])
@given(key=st.text(max_size=12), value=_json_values)
@settings(max_examples=150)
def test_json_fuzz_fields_only_wire_errors(which: str, key: str, value: object) -> None:
    # Replace one field (or a nested one) of a valid message with an arbitrary JSON value.
    base = golden.golden_status() if which == "status" else golden.golden_task()
    obj = json.loads(base.to_bytes())
    for target in [obj, *[v for v in obj.values() if isinstance(v, dict)]]:
        mutated = json.loads(json.dumps(obj))
        (mutated if target is obj else mutated[_key_of(obj, target)])[
            key if key else next(iter(target))
        ] = value
        with contextlib.suppress(WireError):
            type(base).from_bytes(json.dumps(mutated).encode())


def _key_of(obj: dict[str, object], target: object) -> str:
    return next(k for k, v in obj.items() if v is target)


def _fields(obj: object) -> dict[str, object]:
    return {f.name: getattr(obj, f.name) for f in dataclasses.fields(obj)}  # type: ignore[arg-type]


# --------------------------------------------------------------------------- envelope


def _update(**overrides: object) -> ModelUpdate:
    return ModelUpdate(**{**_fields(golden.golden_update()), **overrides})  # type: ignore[arg-type]


def test_envelope_layout() -> None:
    data = golden.golden_update().to_bytes()
    magic, version, flags, reserved, header_len, count, total = struct.unpack_from(
        "<4sBBHIIQ", data
    )
    assert (magic, version, flags, reserved, count, total) == (b"FEDG", 1, 0, 0, 2, len(data))
    header = json.loads(data[24 : 24 + header_len])
    assert header["v"] == 1
    assert header["tensors"][0] == {"name": "dense/w", "shape": [2, 3], "codec": golden.RAW}


def test_update_roundtrip_unsigned() -> None:
    update = golden.golden_update()
    assert ModelUpdate.from_bytes(update.to_bytes()) == update


def test_update_roundtrip_signed() -> None:
    update = golden.golden_update()
    data = update.to_bytes(key=KEY)
    assert data[5] == wire.FLAG_HMAC
    assert ModelUpdate.from_bytes(data, KEY) == update
    assert ModelUpdate.from_bytes(data, lambda cid: KEY if cid == "pi-01" else None) == update


def test_wrong_key_is_signature_error() -> None:
    data = golden.golden_update().to_bytes(key=KEY)
    with pytest.raises(SignatureError, match="does not match"):
        ModelUpdate.from_bytes(data, b"x" * 32)


def test_unsigned_with_key_is_signature_error() -> None:
    with pytest.raises(SignatureError, match="not signed"):
        ModelUpdate.from_bytes(golden.golden_update().to_bytes(), KEY)


def test_require_signature_without_key() -> None:
    data = golden.golden_update().to_bytes(key=KEY)
    with pytest.raises(SignatureError, match="no HMAC key"):
        ModelUpdate.from_bytes(data, lambda cid: None, require_signature=True)


def test_forged_hmac_with_recomputed_crc_is_caught() -> None:
    # An attacker can always fix the CRC; only the HMAC stops a changed payload.
    data = bytearray(golden.golden_update().to_bytes(key=KEY))
    body_end = len(data) - 4 - 32
    data[body_end - 1] ^= 0xFF
    import google_crc32c

    struct.pack_into("<I", data, body_end, google_crc32c.value(bytes(data[:body_end])))
    with pytest.raises(SignatureError):
        ModelUpdate.from_bytes(bytes(data), KEY)


def test_model_roundtrip() -> None:
    model = golden.golden_model()
    assert GlobalModel.from_bytes(model.to_bytes()) == model


def test_kind_mismatch() -> None:
    with pytest.raises(MessageError, match="expected an update"):
        ModelUpdate.from_bytes(golden.golden_model().to_bytes())


@pytest.mark.parametrize(
    ("mutate", "error", "words"),
    [
        (lambda d: d[:10], TruncatedError, "shorter"),
        (lambda d: d[:-1], TruncatedError, "of its"),
        (lambda d: d + b"\0", EnvelopeError, "after its declared end"),
        (lambda d: b"XXXX" + d[4:], BadMagicError, "FEDG"),
        (lambda d: d[:4] + b"\x02" + d[5:], VersionError, "version 2"),
        (lambda d: d[:5] + b"\x80" + d[6:], EnvelopeError, "flags"),
        (lambda d: d[:40] + bytes([d[40] ^ 1]) + d[41:], ChecksumError, "CRC-32C"),
        (lambda d: d[:-5] + bytes([d[-5] ^ 1]) + d[-4:], ChecksumError, "CRC-32C"),
    ],
)
def test_damaged_envelope(mutate: object, error: type[Exception], words: str) -> None:
    data = golden.golden_update().to_bytes()
    with pytest.raises(error, match=words):
        decode_envelope(mutate(data))  # type: ignore[operator]


def test_oversize_envelope() -> None:
    data = golden.golden_update().to_bytes()
    with pytest.raises(OversizeError, match="limit"):
        decode_envelope(data, max_size=len(data) - 1)


def test_oversize_header() -> None:
    with pytest.raises(OversizeError, match="header"):
        decode_envelope(golden.golden_update().to_bytes(), max_header_size=16)


def test_declared_oversize_before_reading() -> None:
    prefix = struct.pack("<4sBBHIIQ", b"FEDG", 1, 0, 0, 10, 0, 10**12)
    with pytest.raises(OversizeError, match="declares"):
        decode_envelope(prefix)


def test_header_validation() -> None:
    with pytest.raises(MessageError, match="task_id and cid"):
        EnvelopeHeader(kind=EnvelopeKind.UPDATE, round_no=1, model_version=1, tensors=())
    with pytest.raises(MessageError, match="repeat"):
        spec = TensorSpec("a", (1,), {"id": "raw"})
        GlobalModel(1, 1, (spec, spec), (b"", b""))
    with pytest.raises(MessageError, match="payloads"):
        encode_envelope(golden.golden_update().header, [b""])
    with pytest.raises(MessageError, match="finite"):
        _update(metrics={"loss": float("nan")})


_specs = st.lists(
    st.tuples(
        st.text(min_size=1, max_size=10),
        st.lists(st.integers(0, 50), max_size=3),
        st.binary(max_size=64),
    ),
    max_size=5,
    unique_by=lambda t: t[0],
)


@given(
    specs=_specs,
    metrics=st.dictionaries(
        st.text(min_size=1, max_size=5),
        st.floats(allow_nan=False, allow_infinity=False),
        max_size=3,
    ),
    round_no=st.integers(0, 2**40),
    signed=st.booleans(),
)
def test_update_roundtrip_hypothesis(
    specs: list[tuple[str, list[int], bytes]],
    metrics: dict[str, float],
    round_no: int,
    signed: bool,
) -> None:
    update = ModelUpdate(
        task_id="t-1",
        round_no=round_no,
        model_version=3,
        cid="dev_1",
        num_examples=10,
        tensors=tuple(TensorSpec(n, tuple(s), {"id": "raw"}) for n, s, _ in specs),
        payloads=tuple(p for _, _, p in specs),
        metrics=metrics,
    )
    key = KEY if signed else None
    assert ModelUpdate.from_bytes(update.to_bytes(key), key) == update


@given(st.binary(max_size=400))
def test_fuzz_random_bytes_give_typed_errors(data: bytes) -> None:
    with pytest.raises(EnvelopeError):
        decode_envelope(data)


@given(st.binary(max_size=200))
def test_fuzz_after_valid_prefix(tail: bytes) -> None:
    data = golden.golden_update().to_bytes()[:24] + tail
    with pytest.raises(WireError):
        decode_envelope(data)


@given(
    signed=st.booleans(),
    positions=st.sets(st.integers(0, 456), min_size=1, max_size=4),
    xor=st.integers(1, 255),
)
def test_fuzz_bit_flips_give_typed_errors(signed: bool, positions: set[int], xor: int) -> None:
    data = bytearray(golden.golden_update().to_bytes(KEY if signed else None))
    for p in {p % len(data) for p in positions}:
        data[p] ^= xor
    with pytest.raises(EnvelopeError):
        decode_envelope(bytes(data), KEY if signed else None)


@given(cut=st.integers(0, 10_000))
def test_fuzz_truncation(cut: int) -> None:
    data = golden.golden_update().to_bytes()
    with pytest.raises(EnvelopeError):
        decode_envelope(data[: cut % len(data)])


@given(header=st.binary(max_size=120))
def test_fuzz_header_with_valid_crc(header: bytes) -> None:
    # Well-framed envelopes whose JSON header is garbage: only MessageError/EnvelopeError.
    total = 24 + len(header) + 4
    body = struct.pack("<4sBBHIIQ", b"FEDG", 1, 0, 0, len(header), 0, total) + header
    import google_crc32c

    data = body + struct.pack("<I", google_crc32c.value(body))
    with pytest.raises(WireError):
        decode_envelope(data)


# --------------------------------------------------------------------------- manifest


def test_manifest_verify() -> None:
    model = golden.golden_model().to_bytes()
    manifest = ModelManifest.from_bytes((golden.FIXTURES / "model_manifest.json").read_bytes())
    manifest.verify(model)
    with pytest.raises(ChecksumError):
        manifest.verify(model[:-1] + b"\0")


# --------------------------------------------------------------------------- golden files


def _golden(name: str) -> bytes:
    path: Path = golden.FIXTURES / name
    if not path.exists():
        pytest.fail(
            f"golden file {path} is missing; restore it from git (regenerate only on purpose: "
            "python -m tests.regen_fixtures)"
        )
    return path.read_bytes()


@pytest.mark.parametrize("name", sorted(golden.golden_files()))
def test_golden_file_is_byte_stable(name: str) -> None:
    assert _golden(name) == golden.golden_files()[name], f"encoding of {name} changed"


def test_golden_decodes() -> None:
    key = bytes.fromhex(json.loads(_golden("config.json"))["hmac_key_hex"])
    assert Status.from_bytes(_golden("status.json")) == golden.golden_status()
    assert Status.from_bytes(_golden("status_will.json")) == Status.offline_will()
    assert TrainTask.from_bytes(_golden("task.json")) == golden.golden_task()
    assert ModelUpdate.from_bytes(_golden("update.bin")) == golden.golden_update()
    assert ModelUpdate.from_bytes(_golden("update_signed.bin"), key) == golden.golden_update()
    assert GlobalModel.from_bytes(_golden("model.bin")) == golden.golden_model()


def test_golden_chunks_reassemble() -> None:
    from edge.chunking import Reassembler

    config = json.loads(_golden("config.json"))
    r = Reassembler(1 << 20, 10.0)
    out = None
    for i in reversed(range(config["update_chunk_count"])):
        out = r.feed("pi-01", _golden(f"update_chunk_{i}.bin"), now=0.0)
    assert out is not None
    assert ModelUpdate.from_bytes(out) == golden.golden_update()
