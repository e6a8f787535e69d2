"""Chunk values as docs/FORMAT.md describes them: msgpack [n_rows, version, checksum, bin],
xxh3-64 of the payload seeded with the chunk index, big-endian keys, zero-copy decode."""

from __future__ import annotations

import msgpack
import numpy as np
import pytest
import xxhash

from lmdb_embeddings import CorruptionError
from lmdb_embeddings.format.chunks import chunk_key, decode_chunk, encode_chunk, key_index, read_header


@pytest.mark.parametrize("dtype", ["<f4", "<f2", "<f8", "<i8"])
def test_round_trip_and_layout(dtype):
    rows = (np.arange(40).reshape(10, 4) * 1.5).astype(dtype)
    value = encode_chunk(rows, 7, 3)
    n_rows, version, crc, payload = msgpack.unpackb(value)
    assert (n_rows, version) == (10, 3)
    assert payload == rows.tobytes() and crc == xxhash.xxh3_64_intdigest(payload, seed=7)
    header, decoded = decode_chunk(value, 7, 4, np.dtype(dtype))
    assert header.n_rows == 10 and header.version == 3 and header.payload_len == rows.nbytes
    assert value[header.payload_offset:] == rows.tobytes()
    assert np.array_equal(decoded, rows) and decoded.dtype == np.dtype(dtype)


def test_decode_is_a_zero_copy_view():
    buffer = bytearray(encode_chunk(np.ones((300, 8), np.float32), 0, 1))
    _, rows = decode_chunk(memoryview(buffer), 0, 8, np.dtype("<f4"))
    buffer[-4:] = np.float32(5.0).tobytes()
    assert rows[-1, -1] == 5.0


def test_empty_chunk():
    header, rows = decode_chunk(encode_chunk(np.empty((0, 3), np.float32), 2, 0), 2, 3, np.dtype("<f4"))
    assert header.n_rows == 0 and rows.shape == (0, 3)


def test_checksum_is_seeded_with_the_chunk_index():
    value = encode_chunk(np.ones((4, 2), np.float32), 5, 1)
    with pytest.raises(CorruptionError, match="chunk 6.*checksum"):
        decode_chunk(value, 6, 2, np.dtype("<f4"))  # right bytes under the wrong key


def test_flipped_payload_bit_is_caught():
    value = bytearray(encode_chunk(np.ones((64, 4), np.float32), 1, 1))
    value[-10] ^= 1
    with pytest.raises(CorruptionError, match="checksum mismatch"):
        decode_chunk(bytes(value), 1, 4, np.dtype("<f4"), " (test)")


@pytest.mark.parametrize(
    "value, words",
    [
        (b"", "malformed"),
        (b"\x93\x01\x02\x03", "malformed"),  # a 3-element array
        (msgpack.packb([1, 2, 3, "text"]), "not a msgpack bin"),
        (msgpack.packb([1, "v", 3, b"xx"]), "not integers"),
        (encode_chunk(np.ones((4, 2), np.float32), 0, 0)[:-3], "does not match"),  # truncated
        (encode_chunk(np.ones((4, 2), np.float32), 0, 0) + b"\x00", "does not match"),  # trailing junk
    ],
)
def test_malformed_values(value, words):
    with pytest.raises(CorruptionError, match=words):
        read_header(value, 0)


def test_row_count_must_match_payload():
    value = encode_chunk(np.ones((4, 2), np.float32), 0, 0)
    with pytest.raises(CorruptionError, match="payload bytes for 4 rows"):
        decode_chunk(value, 0, 3, np.dtype("<f4"))  # read with the wrong width


def test_keys_sort_numerically():
    indices = [0, 1, 255, 256, 2**32, 2**40 + 3]
    keys = [chunk_key(i) for i in indices]
    assert all(len(k) == 8 for k in keys) and keys == sorted(keys)
    assert chunk_key(256) == b"\x00\x00\x00\x00\x00\x00\x01\x00"
    assert [key_index(k) for k in keys] == indices


def test_large_chunk_uses_bin32():
    rows = np.zeros((1024, 128), np.float32)  # 512 KiB payload
    value = encode_chunk(rows, 0, 0)
    header = read_header(value, 0)
    assert value[header.payload_offset - 5] == 0xC6 and header.payload_len == rows.nbytes


def test_the_reusing_encoder_gives_the_bytes_of_encode_chunk():
    from lmdb_embeddings.format.chunks import ChunkEncoder

    encoder = ChunkEncoder()
    for rows in (np.ones((300, 8), np.float32), np.empty((0, 3), np.float16), np.arange(7, dtype="<i8").reshape(-1, 1),
                 np.random.default_rng(1).standard_normal((1024, 16)), np.ones((2, 2), np.float32)):
        for index, version in ((0, 0), (7, 3), (2**40, 2**33)):
            assert bytes(encoder.encode(rows, index, version)) == encode_chunk(rows, index, version)


def test_rows_assembled_in_the_encoders_staging_area_encode_to_the_same_bytes_without_a_copy():
    from lmdb_embeddings.format.chunks import ChunkEncoder

    encoder = ChunkEncoder()
    rng = np.random.default_rng(2)
    for n, width, dtype in ((511, 128, np.float32), (3, 5, np.float16), (0, 4, np.float32), (1024, 16, np.float32)):
        rows = rng.standard_normal((n, width)).astype(dtype)
        staged = encoder.staging(n, width, dtype)
        staged[:] = rows
        for index, version in ((0, 0), (9, 2**33)):  # the same staged rows, headers of other lengths
            value = encoder.encode(staged, index, version)
            assert bytes(value) == encode_chunk(rows, index, version)
        if n:  # no copy: the value's payload is the staging area itself
            assert np.shares_memory(np.frombuffer(value, np.uint8), staged)
        other = rows[::-1].copy()  # an array from elsewhere is copied into place, as before
        assert bytes(encoder.encode(other, 1, 1)) == encode_chunk(other, 1, 1)


def test_the_struct_header_parse_agrees_with_msgpack():
    import msgpack

    from lmdb_embeddings.format.chunks import _fast_header

    for n_rows in (0, 1, 127, 128, 300, 70000):
        for version in (0, 5, 255, 256, 2**16, 2**40):
            rows = np.ones((n_rows, 1), np.float32)
            value = encode_chunk(rows, 3, version)
            fast = _fast_header(value)
            n, v, crc, payload = msgpack.unpackb(value)
            assert (fast.n_rows, fast.version, fast.checksum, fast.payload_len) == (n, v, crc, len(payload))
            assert value[fast.payload_offset:] == payload
    assert _fast_header(msgpack.packb([1, -1, 2, b"x"])) is None  # another layout: left to msgpack
