"""Each supported ggml type round-trips through a GGUF written by gguf's own writer; others fail clearly.

F32/F16/BF16/Q8_0/Q4_0/Q4_1 are encoded with `gguf.quants.quantize` and must
come back within the type's rounding step. gguf has no encoder for the
K-quants, so Q4_K and Q6_K blocks are packed here from llama.cpp's block
layouts (block_q4_K, block_q6_K) with known integer codes and scales, and must
decode exactly.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

gguf = pytest.importorskip("gguf")

from dyn.engine.gguf.reader import GGUFFile  # noqa: E402
from dyn.engine.gguf.tensors import SUPPORTED_TYPES, dequantize  # noqa: E402
from dyn.engine.loader import CheckpointError  # noqa: E402

Q = gguf.GGMLQuantizationType
ROWS, COLS = 4, 512  # two 256-element super-blocks per row for the K-quants


def _write(path: Path, tensors: dict[str, tuple[np.ndarray, object]]) -> GGUFFile:
    writer = gguf.GGUFWriter(str(path), "llama")
    for name, (data, qtype) in tensors.items():
        writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return GGUFFile(path)


def _read(file: GGUFFile, name: str) -> np.ndarray:
    tensor = next(t for t in file.reader.tensors if t.name == name)
    return dequantize(file, tensor)


@pytest.mark.parametrize("qtype, step", [
    (Q.F32, lambda blk: 0.0),
    (Q.F16, lambda blk: np.abs(blk).max() * 2.0 ** -10),
    (Q.BF16, lambda blk: np.abs(blk).max() * 2.0 ** -7),
    (Q.Q8_0, lambda blk: np.abs(blk).max() / 127),
    (Q.Q4_0, lambda blk: np.abs(blk).max() / 8),
    (Q.Q4_1, lambda blk: (blk.max() - blk.min()) / 15),
])
def test_gguf_quantized_types_round_trip(qtype, step, tmp_path):
    rng = np.random.default_rng(int(qtype))
    original = rng.normal(0, 0.05, (ROWS, COLS)).astype(np.float32)
    file = _write(tmp_path / "t.gguf", {"w": (gguf.quants.quantize(original, qtype), qtype)})
    values = _read(file, "w")
    assert values.shape == (ROWS, COLS) and values.dtype == np.float32
    for blk_orig, blk_back in zip(original.reshape(-1, 32), values.reshape(-1, 32)):
        assert np.abs(blk_orig - blk_back).max() <= step(blk_orig) + 1e-7


def test_q4_k_decodes_known_codes(tmp_path):
    rng = np.random.default_rng(4)
    n_blocks = ROWS * COLS // 256
    codes = rng.integers(0, 16, (n_blocks, 256))
    scales = rng.integers(0, 64, (n_blocks, 8))
    mins = rng.integers(0, 64, (n_blocks, 8))
    d = rng.uniform(0.001, 0.01, n_blocks).astype(np.float16)
    dmin = rng.uniform(0.001, 0.01, n_blocks).astype(np.float16)
    blocks = np.stack([_pack_q4_k(*args) for args in zip(codes, scales, mins, d, dmin)])
    expected = (d.astype(np.float32)[:, None] * np.repeat(scales, 32, axis=1) * codes
                - dmin.astype(np.float32)[:, None] * np.repeat(mins, 32, axis=1))
    file = _write(tmp_path / "k4.gguf", {"w": (blocks.reshape(ROWS, -1), Q.Q4_K)})
    np.testing.assert_allclose(_read(file, "w"), expected.reshape(ROWS, COLS), rtol=1e-6, atol=1e-7)


def test_q6_k_decodes_known_codes(tmp_path):
    rng = np.random.default_rng(6)
    n_blocks = ROWS * COLS // 256
    codes = rng.integers(0, 64, (n_blocks, 256))
    scales = rng.integers(-128, 128, (n_blocks, 16))
    d = rng.uniform(0.0001, 0.001, n_blocks).astype(np.float16)
    blocks = np.stack([_pack_q6_k(*args) for args in zip(codes, scales, d)])
    expected = d.astype(np.float32)[:, None] * np.repeat(scales, 16, axis=1) * (codes - 32)
    file = _write(tmp_path / "k6.gguf", {"w": (blocks.reshape(ROWS, -1), Q.Q6_K)})
    np.testing.assert_allclose(_read(file, "w"), expected.reshape(ROWS, COLS), rtol=1e-6, atol=1e-7)


def test_unsupported_type_names_tensor_and_type(tmp_path):
    data = np.random.default_rng(0).normal(size=(ROWS, COLS)).astype(np.float32)
    file = _write(tmp_path / "q5.gguf", {"blk.0.attn_q.weight": (gguf.quants.quantize(data, Q.Q5_0), Q.Q5_0)})
    with pytest.raises(CheckpointError) as err:
        _read(file, "blk.0.attn_q.weight")
    message = str(err.value)
    assert "blk.0.attn_q.weight" in message and "Q5_0" in message and str(file.path) in message
    assert "Q5_0" not in SUPPORTED_TYPES


def _pack_q4_k(codes, scales, mins, d, dmin) -> np.ndarray:
    """block_q4_K: fp16 d, fp16 dmin, 12 bytes of 6-bit (scale, min) x 8, 128 bytes of 4-bit codes."""
    packed = np.zeros(12, dtype=np.uint8)
    for j in range(4):
        packed[j] = scales[j] | ((scales[j + 4] >> 4) << 6)
        packed[j + 4] = mins[j] | ((mins[j + 4] >> 4) << 6)
        packed[j + 8] = (scales[j + 4] & 0xF) | ((mins[j + 4] & 0xF) << 4)
    qs = np.zeros(128, dtype=np.uint8)
    for c in range(4):  # 64 values per chunk: low nibbles hold the first 32, high nibbles the next 32
        qs[32 * c:32 * c + 32] = codes[64 * c:64 * c + 32] | (codes[64 * c + 32:64 * c + 64] << 4)
    head = np.array([d, dmin], dtype=np.float16).view(np.uint8)
    return np.concatenate([head, packed, qs])


def _pack_q6_k(codes, scales, d) -> np.ndarray:
    """block_q6_K: 128 bytes low 4 bits, 64 bytes high 2 bits, 16 int8 scales, fp16 d."""
    ql = np.zeros(128, dtype=np.uint8)
    qh = np.zeros(64, dtype=np.uint8)
    for h in range(2):
        q = codes[128 * h:128 * h + 128]
        ql[64 * h:64 * h + 32] = (q[0:32] & 0xF) | ((q[64:96] & 0xF) << 4)
        ql[64 * h + 32:64 * h + 64] = (q[32:64] & 0xF) | ((q[96:128] & 0xF) << 4)
        qh[32 * h:32 * h + 32] = (q[0:32] >> 4) | ((q[32:64] >> 4) << 2) | ((q[64:96] >> 4) << 4) \
            | ((q[96:128] >> 4) << 6)
    return np.concatenate([ql, qh, scales.astype(np.int8).view(np.uint8),
                           np.array([d], dtype=np.float16).view(np.uint8)])


def test_unsupported_architecture_is_named(tmp_path):
    from dyn.engine.gguf.config import hf_config

    writer = gguf.GGUFWriter(str(tmp_path / "m.gguf"), "mamba")
    writer.add_tensor("w", np.zeros((2, 32), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(CheckpointError, match="GGUF architecture 'mamba' is not supported"):
        hf_config(GGUFFile(tmp_path / "m.gguf"), torch_dtype="float32")
