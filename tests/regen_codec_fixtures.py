"""Regenerate the golden codec payloads in ``tests/fixtures/codecs/``.

Run only on purpose (``python -m tests.regen_codec_fixtures``): the committed
files are the compatibility promise, and the tests fail when one is missing.
A payload file that exists is never rewritten (its entry in ``cases.json`` is
kept as it was), so adding a case cannot silently replace an older layout.
"""

from __future__ import annotations

import json

import numpy as np

from kernels.codec import get_codec
from tests.codec_checks import FIXTURES

CASES: dict[str, dict[str, object]] = {
    "raw": {"id": "raw"},
    "affine_u8": {"id": "affine_u8"},
    "block_i8": {"id": "block_i8", "block_size": 16, "stochastic": False, "seed": 0},
    "block_i4": {"id": "block_i4", "block_size": 16, "stochastic": False, "seed": 0},
    "block_i2": {"id": "block_i2", "block_size": 16, "stochastic": False, "seed": 0},
    "block_i8_stochastic": {"id": "block_i8", "block_size": 32, "stochastic": True, "seed": 42},
    "topk": {"id": "topk", "fraction": 0.1, "exact": True, "trim": True, "seed": 0},
    "zstd": {"id": "zstd", "level": 3},
    "zlib": {"id": "zlib", "level": 6},
    "pipeline_topk_i8_zstd": {
        "id": "pipeline",
        "stages": [
            {"id": "topk", "fraction": 0.05, "exact": False, "trim": True, "seed": 3},
            {"id": "block_i8", "block_size": 64, "stochastic": False, "seed": 0},
            {"id": "zstd", "level": 1},
        ],
    },
    # Tiny payloads that compression would grow: stored behind the 'S' tag.
    "pipeline_topk_i8_zstd_stored": {
        "id": "pipeline",
        "stages": [
            {"id": "topk", "fraction": 0.02, "exact": True, "trim": True, "seed": 0},
            {"id": "block_i8", "block_size": 64, "stochastic": False, "seed": 0},
            {"id": "zstd", "level": 3},
        ],
    },
    "pipeline_topk_zlib_stored": {
        "id": "pipeline",
        "stages": [
            {"id": "topk", "fraction": 0.02, "exact": True, "trim": True, "seed": 0},
            {"id": "zlib", "level": 6},
        ],
    },
}


def main() -> None:
    FIXTURES.mkdir(parents=True, exist_ok=True)
    input_file = FIXTURES / "input.f32"
    if input_file.exists():  # the input of the committed payloads: never replaced
        x = np.fromfile(input_file, dtype="<f4").astype(np.float32)
    else:
        rng = np.random.default_rng(20261128)
        x = rng.standard_normal(203).astype(np.float32)
        x[::17] = 0.0
        x.astype("<f4").tofile(input_file)
    cases_file = FIXTURES / "cases.json"
    old = json.loads(cases_file.read_text()) if cases_file.exists() else {}
    index = {}
    for name, config in CASES.items():
        if (FIXTURES / f"{name}.bin").exists() and name in old:
            index[name] = old[name]
            continue
        codec = get_codec(config)
        payload = codec.encode(x)
        decoded = codec.decode(payload, np.empty_like(x))
        (FIXTURES / f"{name}.bin").write_bytes(payload)
        index[name] = {"config": codec.get_config(), "decoded": decoded.tolist()}
    cases_file.write_text(json.dumps(index, indent=1) + "\n")
    print(f"{len(index)} golden payloads in {FIXTURES}")


if __name__ == "__main__":
    main()
