"""Chunked model streams: round trips, wire compatibility with protobuf, and refused corruption."""

from __future__ import annotations

import numpy as np
import pytest

from engine import serde
from engine.serde import CHUNK_BYTES, SerdeError
from protos import federated_pb2 as pb


def _model() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {
        "conv.weight": rng.standard_normal((64, 3, 3, 3)).astype(np.float32),
        "big": rng.standard_normal(600_000).astype(np.float32),  # 2.3 chunks
        "half": rng.standard_normal((7, 5)).astype(np.float16),
        "double": rng.standard_normal(3).astype(np.float64),
        "steps": np.array(7, dtype=np.int64),
        "mask": np.array([True, False]),
        "empty": np.zeros((0, 4), np.float32),
        "bytes": np.arange(CHUNK_BYTES, dtype=np.uint8),  # exactly one chunk
    }


def _frames(params, header=None, chunk_bytes=CHUNK_BYTES) -> list[bytes]:
    return list(serde.encode_model_stream(header or pb.CurrentModel(), params, chunk_bytes))


def test_round_trip_keeps_names_order_dtypes_shapes_and_values() -> None:
    model = _model()
    header = pb.CurrentModel(meta=pb.ModelMetaData(task="t", current_round=4), owner="server")
    got_header, got = serde.decode_model_stream(_frames(model, header), pb.CurrentModel)
    assert got_header.meta.current_round == 4 and got_header.owner == "server"
    assert list(got) == list(model)
    for name, value in model.items():
        assert got[name].dtype == value.dtype and got[name].shape == value.shape, name
        np.testing.assert_array_equal(got[name], value)


def test_chunks_carry_at_most_one_mib_and_protobuf_parses_every_frame() -> None:
    frames = _frames(_model())
    parts = [pb.ModelChunk.FromString(f) for f in frames]
    assert parts[0].WhichOneof("part") == "header"
    assert parts[-1].WhichOneof("part") == "end"
    chunks = [p.chunk for p in parts[1:-1]]
    assert all(0 < len(c.data) <= CHUNK_BYTES for c in chunks)
    assert parts[-1].end.total_bytes == sum(len(c.data) for c in chunks)
    # and our decoder reads frames that protobuf itself serialized
    reserialized = [p.SerializeToString() for p in parts]
    _, got = serde.decode_model_stream(reserialized, pb.CurrentModel)
    np.testing.assert_array_equal(got["big"], _model()["big"])


def test_non_contiguous_and_big_endian_inputs_are_sent_as_their_values() -> None:
    base = np.arange(12, dtype=">f4").reshape(3, 4)
    model = {"t": base.T}
    _, got = serde.decode_model_stream(_frames(model), pb.CurrentModel)
    np.testing.assert_array_equal(got["t"], base.T)
    assert got["t"].dtype == np.float32


def test_object_dtype_is_refused_by_name() -> None:
    with pytest.raises(SerdeError, match=r"'bad'.*cannot be sent"):
        _frames({"bad": np.array([object()])})


def _decode(frames, expected=None):
    return serde.decode_model_stream(frames, pb.CurrentModel, expected)


def _chunk_frame(index: int, offset: int, data: bytes) -> bytes:
    return pb.ModelChunk(
        chunk=pb.TensorChunk(index=index, offset=offset, data=data)
    ).SerializeToString()


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda f: f[:-1], r"'big'.*truncated|truncated.*'big'|stopped before its end"),
        (lambda f: f[:3] + f[4:-1] + f[-1:], r"'big'.*offset"),
        (lambda f: [*f[:2], f[3], f[2], *f[4:]], r"'big'.*offset"),
        (lambda f: [*f[:3], f[2], *f[3:]], r"'big'.*offset"),
        (lambda f: [*f[:-1], _chunk_frame(1, 2_400_000, b"x"), f[-1]], r"'big'.*more than"),
        (lambda f: [f[0], *f[2:]], r"'a'.*incomplete"),
        (lambda f: [*f[:2], _chunk_frame(9, 0, b"x"), *f[2:]], r"tensor #9"),
        (lambda f: f[1:], r"before the stream header"),
        (lambda f: [f[0], f[0], *f[1:]], r"middle of a model"),
        (
            lambda f: [*f[:-1], pb.ModelChunk(end=pb.StreamEnd(total_bytes=1)).SerializeToString()],
            r"totals do not add up",
        ),
        (lambda f: [*f[:2], f[2][:-5], *f[3:]], r"truncated|does not match"),
        (lambda f: [*f[:2], b"\x12\xff", *f[2:]], r"truncated|does not match"),
    ],
    ids=[
        "no-end",
        "missing-chunk",
        "reordered",
        "repeated",
        "overflow",
        "skipped-tensor",
        "unknown-tensor",
        "no-header",
        "second-header",
        "wrong-totals",
        "cut-frame",
        "garbage",
    ],
)
def test_corrupt_streams_are_refused(mutate, message) -> None:
    model = {"a": np.ones(3, np.float32), "big": np.ones(600_000, np.float32)}
    frames = _frames(model)
    with pytest.raises(SerdeError, match=message):
        _decode(mutate(frames))


def test_header_is_checked_against_the_expected_model_by_name() -> None:
    frames = _frames({"w": np.ones((2, 3), np.float32)})
    with pytest.raises(SerdeError, match=r"'w'.*shape \(2, 3\).*shape \(3, 2\)"):
        _decode(frames, {"w": ("float32", (3, 2))})
    with pytest.raises(SerdeError, match=r"'w'.*dtype float32.*float64"):
        _decode(frames, {"w": ("float64", (2, 3))})
    with pytest.raises(SerdeError, match=r"'w'.*not a variable"):
        _decode(frames, {"v": ("float32", (2, 3))})


def test_a_header_announcing_too_much_is_refused_before_allocating() -> None:
    header = pb.CurrentModel()
    header.data.params.add(name="huge", array=pb.NDArray(dtype="float32", shape=[1 << 40]))
    frame = b"\x0a" + serde._varint(header.ByteSize()) + header.SerializeToString()
    with pytest.raises(SerdeError, match="limit"):
        _decode([frame])


@pytest.mark.parametrize(
    ("dtype", "shape", "message"),
    [("float8", [2], "unknown dtype"), ("float32", [-1], "negative"), ("", [1], "unknown dtype")],
)
def test_bad_header_specs_are_refused(dtype, shape, message) -> None:
    header = pb.CurrentModel()
    header.data.params.add(name="v", array=pb.NDArray(dtype=dtype, shape=shape))
    frame = b"\x0a" + serde._varint(header.ByteSize()) + header.SerializeToString()
    with pytest.raises(SerdeError, match=message):
        _decode([frame, pb.ModelChunk(end=pb.StreamEnd()).SerializeToString()])


def test_inline_ndarray_round_trip_and_size_check() -> None:
    value = np.arange(6, dtype=np.int32).reshape(2, 3)
    msg = serde.ndarray_to_proto(value, "v")
    np.testing.assert_array_equal(serde.proto_to_ndarray(msg, "v"), value)
    msg.data = msg.data[:-1]
    with pytest.raises(SerdeError, match=r"'v'.*23 payload bytes"):
        serde.proto_to_ndarray(msg, "v")


def test_validation_stream_of_several_models_then_done() -> None:
    frames = [
        *_frames({"w": np.ones(2, np.float32)}, pb.CurrentModel(owner="site-1")),
        *_frames({"w": np.zeros(2, np.float32)}, pb.CurrentModel(owner="site-2")),
        serde.encode_done_frame(True),
    ]
    items = list(serde.decode_model_streams(frames, pb.CurrentModel))
    assert [h.owner for h, _ in items[:2]] == ["site-1", "site-2"]
    assert items[2] is True


@pytest.mark.slow
def test_a_tensor_over_2_gib_streams_with_offsets_beyond_32_bits() -> None:
    n = (2 << 30) // 4 + 1024  # 2 GiB + 4 KiB of float32
    value = np.zeros(n, dtype=np.float32)
    value[-3:] = [1.0, 2.0, 3.0]
    value[(1 << 29) + 5] = 7.0  # a value past byte offset 2^31
    _, got = serde.decode_model_stream(
        serde.encode_model_stream(pb.CurrentModel(), {"big": value}), pb.CurrentModel
    )
    assert got["big"].shape == (n,)
    assert got["big"][-1] == 3.0 and got["big"][(1 << 29) + 5] == 7.0
    assert float(got["big"].sum()) == 13.0


def test_a_shape_whose_byte_count_wraps_around_is_refused_by_name() -> None:
    header = pb.CurrentModel()
    header.data.params.add(name="wrap", array=pb.NDArray(dtype="float64", shape=[2**62, 4]))
    frame = b"\x0a" + serde._varint(header.ByteSize()) + header.SerializeToString()
    with pytest.raises(SerdeError, match="limit"):
        _decode([frame])


# ---------------------------------------------------------------------------- batches on the wire


def test_a_model_under_one_mib_is_one_message_that_protobuf_reads_as_a_batch() -> None:
    model = {"w": np.arange(200_000, dtype=np.float32), "b": np.ones(3, np.float32)}
    header = pb.CurrentModel(meta=pb.ModelMetaData(current_round=2), owner="server")
    messages = list(serde.encode_model_stream(header, model, batch=True))
    assert len(messages) == 1
    batch = pb.ModelChunk.FromString(messages[0])
    assert batch.WhichOneof("part") == "batch"
    kinds = [pb.ModelChunk.FromString(f).WhichOneof("part") for f in batch.batch.frames]
    assert kinds == ["header", "chunk", "chunk", "end"]
    # the frames inside are exactly the frames the unbatched stream sends
    assert list(batch.batch.frames) == _frames(model, header)
    got_header, got = serde.decode_model_stream(messages, pb.CurrentModel)
    assert got_header.meta.current_round == 2
    for name, value in model.items():
        np.testing.assert_array_equal(got[name], value)
    # and a batch that protobuf itself serialized decodes the same
    again = pb.ModelChunk(batch=pb.FrameBatch(frames=batch.batch.frames)).SerializeToString()
    np.testing.assert_array_equal(
        serde.decode_model_stream([again], pb.CurrentModel)[1]["w"], model["w"]
    )


def test_big_models_batch_only_what_fits_and_every_message_stays_near_one_mib() -> None:
    model = _model()
    plain = _frames(model)
    messages = list(serde.encode_model_stream(pb.CurrentModel(), model, batch=True))
    assert len(messages) < len(plain)
    assert all(len(m) <= serde.BATCH_BYTES for m in messages)
    opened = [bytes(f) for f in serde.unbatch(messages)]
    assert opened == plain  # same frames, same order
    _, got = serde.decode_model_stream(messages, pb.CurrentModel)
    for name, value in model.items():
        np.testing.assert_array_equal(got[name], value)
    # a frame bigger than a batch on its own (a huge header) goes alone, not wrapped
    header = pb.CurrentModel(owner="x" * serde.BATCH_BYTES)
    first = next(serde.encode_model_stream(header, {"w": np.ones(2, np.float32)}, batch=True))
    assert pb.ModelChunk.FromString(first).WhichOneof("part") == "header"


def _batch(*frames: bytes) -> bytes:
    return pb.ModelChunk(batch=pb.FrameBatch(frames=list(frames))).SerializeToString()


@pytest.mark.parametrize(
    ("messages", "error"),
    [
        (lambda f: [_batch()], "an empty batch"),
        (lambda f: [_batch(_batch(*f))], r"unexpected frame \(field 5"),
        (lambda f: [_batch(*f)[:-3]], "batch length"),
        (
            lambda f: [b"\x2a" + serde._varint(4) + b"\x10\x01\x10\x02"],
            r"a batch holds field 2 \(wire type 0\), not frames",
        ),
        (lambda f: [_batch(f[0]), _batch(*f[2:])], "before its end frame|chunk.*does not|offset"),
    ],
    ids=["empty", "nested", "truncated", "not-frames", "a-chunk-missing"],
)
def test_malformed_batches_are_refused_and_nothing_is_returned(messages, error) -> None:
    frames = _frames({"w": np.arange(10, dtype=np.float32)}, chunk_bytes=16)
    with pytest.raises(SerdeError, match=error):
        _decode(messages(frames))


def test_batches_and_single_frames_mix_in_one_stream() -> None:
    frames = _frames({"w": np.arange(40, dtype=np.float32)}, chunk_bytes=32)
    mixed = [frames[0], _batch(*frames[1:3]), *frames[3:-1], _batch(frames[-1])]
    _, got = _decode(mixed)
    np.testing.assert_array_equal(got["w"], np.arange(40, dtype=np.float32))
