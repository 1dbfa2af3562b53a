"""Golden wire-v1 files: what they contain, and the explicit command that rewrites them.

``tests/test_wire.py`` checks that every file in ``tests/fixtures/wire_v1/``
still decodes to the objects built here, and re-encodes to the same bytes. A
missing file fails that test; it is never regenerated implicitly. Rewrite the
files only on purpose (a new golden case), never to make a failing test pass:
changing how v1 bytes look breaks devices in the field.

    python -m tests.regen_fixtures            # write the missing files
    python -m tests.regen_fixtures --force    # overwrite all of them
"""

from __future__ import annotations

import argparse
import json
import struct
import sys
from pathlib import Path

from edge.chunking import split
from edge.wire import (
    BatteryInfo,
    Caps,
    CpuInfo,
    Declined,
    GlobalModel,
    MemInfo,
    ModelManifest,
    ModelUpdate,
    NetInfo,
    NetKind,
    Status,
    TensorSpec,
    TrainInfo,
    TrainParams,
    TrainTask,
)

FIXTURES = Path(__file__).parent / "fixtures" / "wire_v1"
HMAC_KEY = bytes(range(32))
"""Key of the signed golden update (also written to config.json)."""
TRANSFER_ID = bytes.fromhex("00112233445566778899aabbccddeeff")
RAW = {"id": "raw", "dtype": "<f4"}


def _f32(*values: float) -> bytes:
    return struct.pack(f"<{len(values)}f", *values)


def golden_status() -> Status:
    return Status(
        online=True,
        ts=1_700_000_000.5,
        battery=BatteryInfo(82.5, False),
        cpu=CpuInfo(0.42, 4, 51.2),
        mem=MemInfo(1536.0),
        net=NetInfo(NetKind.WIFI, False, 12.5),
        train=TrainInfo(1797, 850.0),
        caps=Caps(("numpy_mlp", "litert"), ("affine_u8", "block_i8", "topk"), 2_000_000),
        agent="fedge/0.1",
        state="idle",
        declined=Declined("task-0007", "battery_low"),
    )


def golden_task() -> TrainTask:
    return TrainTask(
        task_id="3f2a9c1e-7b4d-4e8a-9f00-123456789abc",
        round_no=7,
        model_version=6,
        deadline_ts=1_700_000_060.0,
        train=TrainParams(
            epochs=1, batch_size=32, lr=0.05, prox_mu=0.01, extra={"local_steps": 50}
        ),
        uplink_codec={"id": "pipeline", "stages": [{"id": "topk", "fraction": 0.01}]},
        nonce="b64nonce-AAAA",
        error_feedback=True,
        strategy={"name": "fedprox"},
    )


def golden_update() -> ModelUpdate:
    return ModelUpdate(
        task_id="3f2a9c1e-7b4d-4e8a-9f00-123456789abc",
        round_no=7,
        model_version=6,
        cid="pi-01",
        num_examples=1797,
        tensors=(TensorSpec("dense/w", (2, 3), RAW), TensorSpec("dense/b", (3,), RAW)),
        payloads=(_f32(0.5, -1.0, 2.0, 0.0, 1e-3, -7.25), _f32(1.0, 2.0, 3.0)),
        metrics={"loss": 0.25, "accuracy": 0.875},
        nonce="b64nonce-AAAA",
    )


def golden_model() -> GlobalModel:
    return GlobalModel(
        model_version=7,
        round_no=7,
        tensors=(TensorSpec("dense/w", (2, 3), RAW), TensorSpec("dense/b", (3,), RAW)),
        payloads=(_f32(0.25, -0.5, 1.0, 0.0, 0.125, -3.5), _f32(0.0, 0.5, 1.5)),
        metrics={"eval_accuracy": 0.9},
    )


def golden_files() -> dict[str, bytes]:
    """File name → bytes of every golden file."""
    model = golden_model().to_bytes()
    chunks = split(golden_update().to_bytes(), chunk_size=128, transfer_id=TRANSFER_ID)
    import hashlib

    manifest = ModelManifest(
        model_version=7,
        transfer_id=TRANSFER_ID.hex(),
        chunk_count=1,
        total_len=len(model),
        sha256=hashlib.sha256(model).hexdigest(),
    )
    files = {
        "status.json": golden_status().to_bytes(),
        "status_will.json": Status.offline_will().to_bytes(),
        "task.json": golden_task().to_bytes(),
        "update.bin": golden_update().to_bytes(),
        "update_signed.bin": golden_update().to_bytes(key=HMAC_KEY),
        "model.bin": model,
        "model_manifest.json": manifest.to_bytes(),
    }
    for i, chunk in enumerate(chunks):
        files[f"update_chunk_{i}.bin"] = chunk
    config = {
        "description": "fedge wire protocol v1 golden files; see tests/regen_fixtures.py",
        "hmac_key_hex": HMAC_KEY.hex(),
        "transfer_id_hex": TRANSFER_ID.hex(),
        "update_chunk_size": 128,
        "update_chunk_count": len(chunks),
        "files": sorted(files),
    }
    files["config.json"] = (json.dumps(config, indent=2) + "\n").encode()
    return files


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--force", action="store_true", help="overwrite existing files")
    args = parser.parse_args(argv)
    FIXTURES.mkdir(parents=True, exist_ok=True)
    for name, data in golden_files().items():
        path = FIXTURES / name
        if path.exists() and not args.force:
            print(f"kept    {path}")
            continue
        path.write_bytes(data)
        print(f"wrote   {path} ({len(data)} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
