"""The wire codec: round-trip bounds, strict and bounded decoding, and split == monolithic over the wire."""
from __future__ import annotations

import dataclasses
import struct
import tracemalloc
from pathlib import Path

import grpc
import numpy as np
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from protos.rapnet.v1 import inference_pb2 as pb
from rapnet import codec
from rapnet.codec import images as codec_images
from rapnet.codec import tensors as codec_tensors
from rapnet.codec import CodecError, ContractMismatch, DecodeLimits, EncodeOptions, LimitExceeded, MalformedMessage

ROOT = Path(__file__).resolve().parents[2]
CHECKPOINT = ROOT / "models" / "rapnet-cifar10.pt"  # the shipped model; without it the tests use an untrained one
FAST = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# --------------------------------------------------------------------------------------------------------
# Round trips within the stated error bounds
# --------------------------------------------------------------------------------------------------------

feature_arrays = hnp.arrays(
    np.float32,
    hnp.array_shapes(min_dims=1, max_dims=4, min_side=1, max_side=7),
    elements=st.floats(-1e4, 1e4, allow_nan=False, allow_infinity=False, width=32),
)
levels = st.sampled_from([None, 1, 3, 9])


def _roundtrip(x: np.ndarray, encoding: str, level, per_channel: bool = True,
               params: str = "f32") -> tuple[pb.Tensor, np.ndarray]:
    msg = codec.encode_tensor(torch.from_numpy(x), encoding, level, name="t", per_channel=per_channel, params=params)
    wire = pb.Tensor.FromString(msg.SerializeToString())
    out = codec.decode_tensor(wire, expected_shape=x.shape)
    assert out.dtype == torch.float32 and tuple(out.shape) == x.shape
    return wire, out.numpy()


@FAST
@given(feature_arrays, levels)
def test_fp32_is_exact(x, level):
    _, y = _roundtrip(x, "fp32", level)
    assert np.array_equal(x, y)


@FAST
@given(feature_arrays, levels)
def test_fp16_relative_error(x, level):
    _, y = _roundtrip(x, "fp16", level)
    # 2**-11 relative for normal float16 values; below 2**-14 the subnormal step 2**-24 dominates.
    assert np.all(np.abs(y - x) <= 2.0**-11 * np.abs(x) + 2.0**-25)


def _wire_scale(wire: pb.Tensor) -> np.ndarray:
    if wire.scale_f16:
        return np.frombuffer(wire.scale_f16, dtype="<f2").astype(np.float64)
    return np.asarray(wire.scale, dtype=np.float64)


def _scale_bound(wire: pb.Tensor, shape) -> np.ndarray:
    scale = _wire_scale(wire)
    if scale.size == 1:
        return np.full(shape, scale[0] / 2)
    bs = [1] * len(shape)
    bs[wire.quant_axis] = -1
    return np.broadcast_to((scale / 2).reshape(bs), shape)


@FAST
@given(feature_arrays, levels, st.sampled_from(["int8", "int4"]), st.booleans(), st.sampled_from(["f32", "f16"]))
def test_quantized_error_at_most_half_a_step(x, level, encoding, per_channel, params):
    wire, y = _roundtrip(x, encoding, level, per_channel, params)
    assert _wire_scale(wire).size == (x.shape[1 if x.ndim >= 2 else 0] if per_channel else 1)
    if params == "f16":  # every scale of these inputs fits float16, so the compact form is used
        assert not len(wire.scale) and len(wire.zero_point_u8) * 2 == len(wire.scale_f16)
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    # scale/2 exactly in real arithmetic; the slack covers float32 rounding of the dequantised value.
    assert np.all(err <= _scale_bound(wire, x.shape) * (1 + 1e-5) + 1e-6 * np.abs(x) + 1e-30)
    assert np.all(y[x == 0] == 0), "zero must be exactly representable"


def test_int4_packs_two_values_per_byte_and_checks_padding():
    x = np.arange(15, dtype=np.float32).reshape(1, 1, 3, 5)
    msg = codec.encode_tensor(x, "int4", None)
    assert msg.raw_size == len(msg.data) == 8
    assert np.abs(codec.decode_tensor(msg).numpy() - x).max() <= msg.scale[0] / 2 * (1 + 1e-5)
    msg.data = msg.data[:-1] + bytes([msg.data[-1] | 0xF0])
    with pytest.raises(MalformedMessage, match="padding"):
        codec.decode_tensor(msg)


@FAST
@given(hnp.arrays(np.float32, st.tuples(st.just(1), st.integers(1, 6), st.integers(1, 4)),
                  elements=st.floats(-(2.0**-10), 2.0**-10, allow_nan=False, width=32)), st.sampled_from(["int8", "int4"]))
def test_compact_params_keep_the_bound_for_tiny_ranges(x, encoding):
    """float16 scales are rounded *up* (never shrinking the range), subnormal float16 scales included."""
    wire, y = _roundtrip(x, encoding, 3, True, "f16")
    assert wire.scale_f16 and (_wire_scale(wire) > 0).all()
    err = np.abs(y.astype(np.float64) - x.astype(np.float64))
    assert np.all(err <= _scale_bound(wire, x.shape) * (1 + 1e-5) + 1e-6 * np.abs(x) + 1e-30)


def test_compact_params_are_smaller_and_fall_back_beyond_float16():
    x = np.random.default_rng(0).normal(size=(1, 160, 4, 4)).astype(np.float32)
    f32 = codec.encode_tensor(x, "int4", 3, params="f32")
    f16 = codec.encode_tensor(x, "int4", 3, params="f16")
    assert len(f16.scale_f16) == 320 and len(f16.zero_point_u8) == 160 and not len(f16.scale)
    assert f32.ByteSize() - f16.ByteSize() >= 160 * 4  # 8+ bytes per channel -> 3
    huge = np.array([[-3e38, 3e38]], dtype=np.float32)  # scale ~2.4e36: no float16 holds it
    msg = codec.encode_tensor(huge, "int8", None, params="f16")
    assert len(msg.scale) == 2 and not msg.scale_f16
    with pytest.raises(ValueError, match="parameter format"):
        codec.encode_tensor(x, "int8", 3, params="bf16")


def _compact(encoding="int8") -> pb.Tensor:
    x = np.random.default_rng(1).normal(size=(1, 4, 3, 3)).astype(np.float32)
    return codec.encode_tensor(x, encoding, 3, name="t", params="f16")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: m.scale.extend([1.0] * 4), "both"),
        (lambda m: m.zero_point.append(1.0), "both"),
        (lambda m: setattr(m, "scale_f16", m.scale_f16[:-1]), "whole float16s"),
        (lambda m: setattr(m, "scale_f16", m.scale_f16[:-2]), "scales"),
        (lambda m: setattr(m, "zero_point_u8", m.zero_point_u8 + b"\x01"), "zero points"),
        (lambda m: setattr(m, "zero_point_u8", b""), "zero points"),
        (lambda m: setattr(m, "zero_point_u8", b"\x00\x01\x02\xff"), "zero points must lie"),
        (lambda m: setattr(m, "scale_f16", np.array([1, 1, np.inf, 1], "<f2").tobytes()), "finite"),
        (lambda m: setattr(m, "scale_f16", np.array([1, 0, 1, 1], "<f2").tobytes()), "positive"),
        (lambda m: setattr(m, "scale_f16", np.array([1, -1, 1, 1], "<f2").tobytes()), "positive"),
    ],
)
def test_malformed_compact_params_are_refused(mutate, match):
    msg = _compact("int4" if "lie" in match else "int8")
    codec.decode_tensor(msg)
    mutate(msg)
    with pytest.raises(MalformedMessage, match=match) as info:
        codec.decode_tensor(pb.Tensor.FromString(msg.SerializeToString()))
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_compact_params_on_unquantised_encodings_are_refused():
    msg = _valid("fp16", 3)
    msg.scale_f16 = np.ones(4, "<f2").tobytes()
    with pytest.raises(MalformedMessage, match="unquantised"):
        codec.decode_tensor(msg)
    msg = _valid("fp32", None)
    msg.zero_point_u8 = b"\x00"
    with pytest.raises(MalformedMessage, match="unquantised"):
        codec.decode_tensor(msg)


def test_encoder_refuses_what_it_cannot_carry():
    with pytest.raises(ValueError, match="NaN"):
        codec.encode_tensor(torch.tensor([1.0, float("nan")]), "int8")
    with pytest.raises(ValueError, match="float16"):
        codec.encode_tensor(torch.tensor([1e6]), "fp16")


def test_zstd_dictionary_round_trip():
    rng = np.random.default_rng(0)
    samples = [codec.encode_tensor(rng.normal(size=(1, 8, 4, 4)).astype(np.float32), "int8", None).data
               for _ in range(200)]
    dictionary = codec.train_dictionary(samples, 1024)
    x = rng.normal(size=(1, 8, 4, 4)).astype(np.float32)
    msg = codec.encode_tensor(x, "int8", 3, dictionary=dictionary)
    assert msg.zstd_dict_id == dictionary.dict_id()
    ref = codec.decode_tensor(codec.encode_tensor(x, "int8", None))
    assert torch.equal(codec.decode_tensor(msg, dictionaries={dictionary.dict_id(): dictionary}), ref)
    with pytest.raises(MalformedMessage, match="dictionary"):
        codec.decode_tensor(msg)


# --------------------------------------------------------------------------------------------------------
# Strict decoding: every refusal is a CodecError with the right status
# --------------------------------------------------------------------------------------------------------


def _valid(encoding="int8", level=3, shape=(1, 4, 3, 3)) -> pb.Tensor:
    x = np.random.default_rng(1).normal(size=shape).astype(np.float32)
    return codec.encode_tensor(x, encoding, level, name="t")


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda m: setattr(m, "encoding", 9), "encoding"),
        (lambda m: setattr(m, "encoding", 0), "ENCODING_UNSPECIFIED"),
        (lambda m: setattr(m, "codec", 7), "codec"),
        (lambda m: setattr(m, "dtype", 0), "dtype"),
        (lambda m: setattr(m, "raw_size", m.raw_size + 1), "raw_size"),
        (lambda m: m.shape.__setitem__(1, 5), "raw_size"),
        (lambda m: m.shape.__setitem__(1, 0), "non-positive"),
        (lambda m: m.shape.__setitem__(1, -4), "non-positive"),
        (lambda m: m.shape.extend([1, 1]), "dimensions"),
        (lambda m: m.scale.append(1.0), "scales"),
        (lambda m: m.scale.__setitem__(0, float("nan")), "finite"),
        (lambda m: m.scale.__setitem__(0, 0.0), "positive"),
        (lambda m: m.zero_point.__setitem__(0, 300.0), "zero points"),
        (lambda m: setattr(m, "quant_axis", 7), "quant_axis"),
        (lambda m: setattr(m, "data", m.data[:-3]), "zstd"),
        (lambda m: setattr(m, "data", b"garbage" * 4), "zstd"),
        (lambda m: setattr(m, "zstd_dict_id", 1234), "dictionary"),
    ],
)
def test_malformed_tensors_are_refused(mutate, match):
    msg = _valid()
    mutate(msg)
    with pytest.raises(MalformedMessage, match=match) as info:
        codec.decode_tensor(msg)
    assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_uncompressed_size_and_nan_payload():
    msg = _valid("fp32", None)
    msg.data = msg.data[:-4]
    with pytest.raises(MalformedMessage, match="payload is"):
        codec.decode_tensor(msg)
    msg = _valid("fp32", None)
    msg.data = struct.pack("<f", float("inf")) + msg.data[4:]
    with pytest.raises(MalformedMessage, match="NaN or Inf"):
        codec.decode_tensor(msg)
    huge = _valid("int8", None)
    huge.scale[0] = 3e38  # finite scale, but (q - zp) * scale overflows float32
    with pytest.raises(MalformedMessage, match="NaN or Inf"):
        codec.decode_tensor(huge)


def test_expected_shape_mismatch():
    with pytest.raises(MalformedMessage, match="expects"):
        codec.decode_tensor(_valid(), expected_shape=(1, 4, 3, 4))


def test_allowed_sets_are_configurable():
    limits = DecodeLimits(allowed_encodings=frozenset({pb.ENCODING_INT8}), allowed_codecs=frozenset({pb.CODEC_ZSTD}))
    codec.decode_tensor(_valid("int8", 3), limits)
    with pytest.raises(MalformedMessage):
        codec.decode_tensor(_valid("fp32", 3), limits)
    with pytest.raises(MalformedMessage):
        codec.decode_tensor(_valid("int8", None), limits)


# --------------------------------------------------------------------------------------------------------
# Bounded decoding: inflated shapes and zstd bombs fail before allocating
# --------------------------------------------------------------------------------------------------------


def _rle_frame(blocks: int, declared: int | None, block_size: int = 128 * 1024) -> bytes:
    """A zstd frame of `blocks` RLE blocks (4 bytes each, block_size bytes of output each)."""
    out = struct.pack("<I", 0xFD2FB528)
    if declared is None:
        out += bytes([0x00, 0x38])  # no content size, window 2**17
    else:
        out += bytes([0xC0, 0x38]) + struct.pack("<Q", declared)  # 8-byte content size, window 2**17
    for i in range(blocks):
        header = (block_size << 3) | (1 << 1) | int(i == blocks - 1)
        out += header.to_bytes(3, "little") + b"\x00"
    return out


def test_rle_frame_helper_is_a_real_zstd_frame():
    frame = _rle_frame(2, 2 * 128 * 1024)
    assert zstandard.ZstdDecompressor().decompress(frame) == bytes(2 * 128 * 1024)


GIB = 1 << 30


@pytest.mark.parametrize(
    "frame, why",
    [
        (_rle_frame(256, GIB), "declares"),  # 1 KB frame declaring 1 GiB
        (_rle_frame(8192, GIB), "declares"),  # 32 KB frame that really decompresses to 1 GiB
        (_rle_frame(256, None), "content size"),  # no declared size: would need streaming into the unknown
        (_rle_frame(256, 36), "corrupt"),  # declares the right size, but the blocks produce 32 MiB
    ],
)
def test_zstd_bombs_fail_without_allocating(frame, why):
    msg = codec.encode_tensor(np.ones((1, 4, 3, 3), np.float32), "int8", 3)  # raw_size 36
    msg.data = frame
    tracemalloc.start()
    try:
        with pytest.raises(MalformedMessage, match=why):
            codec.decode_tensor(msg)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 4 * len(frame) + (1 << 20), f"decoder peaked at {peak} bytes"


def test_inflated_shapes_are_refused_before_decompression(monkeypatch):
    calls = []
    monkeypatch.setattr(codec_tensors, "zstd_decompress_bounded", lambda *a, **k: calls.append(a))
    for shape, raw_size in [((1, 1 << 20, 1 << 20, 1), 1 << 40), ((1 << 62, 2, 2, 2), 1 << 63), ((1, 2049, 32, 16), 2049 * 512)]:
        msg = _valid("int8", 3)
        del msg.shape[:]
        msg.shape.extend(shape)
        msg.raw_size = raw_size
        with pytest.raises(LimitExceeded):
            codec.decode_tensor(msg, DecodeLimits(max_elements=1 << 20))
    assert calls == []


def test_image_headers_are_checked_before_opencv_allocates(monkeypatch):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    png = codec.encode_image(pixels, "png")
    big = bytearray(png.data)
    big[16:24] = struct.pack(">II", 60000, 60000)  # IHDR claims 60000x60000 (10.8 GB of pixels)
    monkeypatch.setattr(codec_images.cv2, "imdecode", lambda *a: pytest.fail("imdecode must not run"))
    lying = pb.ImagePayload(format=pb.IMAGE_FORMAT_PNG, width=32, height=32, channels=3, data=bytes(big))
    with pytest.raises(MalformedMessage, match="60000x60000"):
        codec.decode_image(lying)
    declared = pb.ImagePayload(format=pb.IMAGE_FORMAT_PNG, width=60000, height=60000, channels=3, data=bytes(big))
    with pytest.raises(LimitExceeded):
        codec.decode_image(declared)
    jpeg = codec.encode_image(pixels, "jpeg")
    jpeg.width = 31
    with pytest.raises(MalformedMessage, match="declares 31x32"):
        codec.decode_image(jpeg)
    wrong_kind = pb.ImagePayload(format=pb.IMAGE_FORMAT_JPEG, width=32, height=32, channels=3, data=png.data)
    with pytest.raises(MalformedMessage, match="not a JPEG"):
        codec.decode_image(wrong_kind)


@pytest.mark.parametrize("fmt", ["png", "raw_zstd"])
def test_lossless_images_round_trip(fmt):
    pixels = np.random.default_rng(0).integers(0, 256, (32, 32, 3), dtype=np.uint8)
    msg = pb.ImagePayload.FromString(codec.encode_image(pixels, fmt).SerializeToString())
    assert np.array_equal(codec.decode_image(msg, expected_hwc=(32, 32, 3)), pixels)
    assert torch.equal(codec.pixels_to_tensor(codec.tensor_to_pixels(codec.pixels_to_tensor(pixels))),
                       codec.pixels_to_tensor(pixels))


def test_jpeg_round_trip_is_close():
    yy, xx = np.mgrid[0:32, 0:32]
    pixels = np.stack([xx * 8, yy * 8, (xx + yy) * 4], -1).astype(np.uint8)
    out = codec.decode_image(codec.encode_image(pixels, "jpeg", jpeg_quality=95))
    assert out.shape == pixels.shape and np.abs(out.astype(int) - pixels).mean() < 3


# --------------------------------------------------------------------------------------------------------
# Whole requests against a real model
# --------------------------------------------------------------------------------------------------------


def _realistic_images(n: int, seed: int = 0) -> np.ndarray:
    """Smooth colour gradients, blobs and sensor noise: image statistics close enough to CIFAR-10 photos."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:32, 0:32] / 31.0
    images = []
    for _ in range(n):
        base = rng.uniform(0, 255, (3, 1)) + rng.uniform(-120, 120, (3, 2)) @ np.stack([xx, yy]).reshape(2, -1)
        img = base.T.reshape(32, 32, 3)
        cy, cx, r = rng.uniform(6, 26, 2).tolist() + [rng.uniform(3, 10)]
        blob = np.exp(-(((yy * 31 - cy) ** 2 + (xx * 31 - cx) ** 2) / (2 * r * r)))[..., None]
        img = img * (1 - blob) + blob * rng.uniform(0, 255, 3) + rng.normal(0, 8, (32, 32, 3))
        images.append(np.clip(img, 0, 255).astype(np.uint8))
    return np.stack(images)


@pytest.fixture(scope="module")
def setup():
    """The shipped checkpoint if it exists; otherwise the default model with BatchNorm statistics calibrated
    on realistic images (an untrained network in eval mode with BN stats 0/1 gives near-constant logits).
    One torch thread: batch-1 forwards on a shared 2-core machine are ~60x slower with thread contention."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    if CHECKPOINT.is_file():
        from rapnet.checkpoint import load_model

        model, _ = load_model(CHECKPOINT)
    else:
        from rapnet.build import build_model
        from rapnet.config import ModelConfig

        torch.manual_seed(0)
        model = build_model(ModelConfig())
        for m in model.modules():
            if isinstance(m, torch.nn.modules.batchnorm._BatchNorm):
                m.reset_running_stats()
                m.momentum = None  # cumulative average over the calibration batches
        model.train()
        with torch.no_grad():
            batch = torch.cat([codec.pixels_to_tensor(p) for p in _realistic_images(64, seed=1)])
            model(batch)
    model.eval()
    yield model, codec.ModelContract.from_model(model)
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def images():
    return _realistic_images(8, seed=2)


def _wire(req: pb.InferRequest) -> bytes:
    return req.SerializeToString()


@pytest.mark.parametrize("fmt", ["png", "raw_zstd"])
def test_lossless_split_requests_give_identical_logits(setup, images, fmt):
    model, contract = setup
    last = model.num_exits - 1
    with torch.no_grad():
        for pixels in images[:3]:
            image = codec.pixels_to_tensor(pixels)
            for split in range(model.num_stages):
                exits = [k for k, s in enumerate(model.exit_stages) if s >= split]
                for level in (None, 3):
                    carry = model.edge_part(image, split)
                    req = codec.build_request(contract, carry, split, last, EncodeOptions("fp32", level, image_format=fmt),
                                              image=pixels)
                    parsed = codec.parse_request_bytes(_wire(req), contract)
                    for k in (exits[0], last):
                        assert torch.equal(model.cloud_part(parsed.carry, split, k), model.run_to_exit(image, k)), (
                            f"split {split} exit {k} zstd={level}"
                        )


def test_int8_zstd_split_requests_keep_the_class(setup, images):
    model, contract = setup
    last = model.num_exits - 1
    agree = total = 0
    with torch.no_grad():
        for pixels in images:
            image = codec.pixels_to_tensor(pixels)
            reference = model.run_to_exit(image, last)
            for split in range(model.num_stages):
                req = codec.build_request(contract, model.edge_part(image, split), split, last,
                                          EncodeOptions("int8", 3), image=pixels)
                logits = model.cloud_part(codec.parse_request_bytes(_wire(req), contract).carry, split, last)
                assert (logits - reference).abs().max() <= 0.2 * reference.abs().max()
                agree += int(logits.argmax() == reference.argmax())
                total += 1
    assert agree == total


def test_tensor_image_and_batched_requests(setup, images):
    model, contract = setup
    image = torch.cat([codec.pixels_to_tensor(p) for p in images[:2]])
    with torch.no_grad():
        carry = model.edge_part(image, 1)  # 'image' travels as a tensor when no pixels are given
        req = codec.build_request(contract, carry, 1, model.num_exits - 1, EncodeOptions("fp32", 3))
        parsed = codec.parse_request_bytes(_wire(req), contract)
        assert torch.equal(model.cloud_part(parsed.carry, 1, 3), model.run_to_exit(image, 3))


def test_contract_mismatches_are_failed_precondition(setup, images):
    model, contract = setup
    pixels = images[0]
    carry = model.edge_part(codec.pixels_to_tensor(pixels), 4)
    good = codec.build_request(contract, carry, 4, model.num_exits - 1, image=pixels)
    for field, value, match in [
        ("model_identity", "0" * 64, "made for model"),
        ("split_point", model.num_stages, "split point"),
        ("target_exit", model.num_exits, "exit"),
        ("target_exit", 0, "before split"),
    ]:
        req = pb.InferRequest()
        req.CopyFrom(good)
        setattr(req, field, value)
        with pytest.raises(ContractMismatch, match=match) as info:
            codec.parse_request(req, contract)
        assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION


def test_cloud_exit_requests(setup, images):
    model, contract = setup
    pixels = images[0]
    image_carry = model.edge_part(codec.pixels_to_tensor(pixels), 0)
    req = codec.build_request(contract, image_carry, 0, model.num_exits - 1, image=pixels, cloud_exit_price=0.0)
    parsed = codec.parse_request_bytes(_wire(req), contract)
    assert parsed.exit_price == 0.0 and parsed.exit == model.num_exits - 1  # price 0 is a price, not "unset"
    assert codec.parse_request_bytes(_wire(codec.build_request(contract, image_carry, 0, 2, image=pixels)),
                                     contract).exit_price is None
    with pytest.raises(ValueError, match="split point 0"):  # features cannot feed the predictor
        codec.build_request(contract, model.edge_part(codec.pixels_to_tensor(pixels), 4), 4, model.num_exits - 1,
                            image=pixels, cloud_exit_price=0.03)
    for price, error in [(-1.0, MalformedMessage), (float("nan"), MalformedMessage), (float("inf"), MalformedMessage)]:
        bad = pb.InferRequest()
        bad.CopyFrom(req)
        bad.cloud_exit.price = price
        with pytest.raises(error, match="cloud_exit.price") as info:
            codec.parse_request(bad, contract)
        assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT
    moved = pb.InferRequest()
    moved.CopyFrom(codec.build_request(contract, model.edge_part(codec.pixels_to_tensor(pixels), 4), 4,
                                       model.num_exits - 1, image=pixels))
    moved.cloud_exit.price = 0.03
    with pytest.raises(ContractMismatch, match="split point 0"):
        codec.parse_request(moved, contract)
    no_predictor = dataclasses.replace(contract, has_predictor=False)
    with pytest.raises(ContractMismatch, match="no exit predictor") as info:
        codec.parse_request(req, no_predictor)
    assert info.value.status == grpc.StatusCode.FAILED_PRECONDITION


def test_stop_confidence_travels_and_bad_values_are_refused(setup, images):
    model, contract = setup
    pixels = images[0]
    carry = model.edge_part(codec.pixels_to_tensor(pixels), 0)
    req = codec.build_request(contract, carry, 0, model.num_exits - 1, image=pixels, stop_confidence=0.9)
    assert codec.parse_request_bytes(_wire(req), contract).stop_confidence == pytest.approx(0.9)
    plain = codec.build_request(contract, carry, 0, 2, image=pixels)
    assert codec.parse_request_bytes(_wire(plain), contract).stop_confidence == 0.0  # unset: answer at target_exit
    with pytest.raises(ValueError, match="stop_confidence"):
        codec.build_request(contract, carry, 0, 2, image=pixels, stop_confidence=1.5)
    for value in (-0.1, 1.01, float("nan"), float("inf")):
        bad = pb.InferRequest()
        bad.CopyFrom(req)
        bad.stop_confidence = value
        with pytest.raises(MalformedMessage, match="stop_confidence") as info:
            codec.parse_request(bad, contract)
        assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_wrong_carry_is_invalid_argument(setup, images):
    model, contract = setup
    pixels = images[0]
    carry = model.edge_part(codec.pixels_to_tensor(pixels), 2)
    good = codec.build_request(contract, carry, 2, model.num_exits - 1, image=pixels)
    cases = []
    req = pb.InferRequest(); req.CopyFrom(good); req.ClearField("image"); cases.append((req, "needs carry"))
    req = pb.InferRequest(); req.CopyFrom(good); req.tensors.append(req.tensors[0]); cases.append((req, "duplicate"))
    req = pb.InferRequest(); req.CopyFrom(good); req.split_point = 1; cases.append((req, "expects"))
    req = pb.InferRequest(); req.CopyFrom(good); req.image.width = 16; cases.append((req, "expects"))
    for req, match in cases:
        with pytest.raises(MalformedMessage, match=match) as info:
            codec.parse_request(req, contract)
        assert info.value.status == grpc.StatusCode.INVALID_ARGUMENT


def test_menu_names_classes_and_options():
    from rapnet.codec import menu

    assert set(menu.DEFAULT_ENCODINGS) == set(menu.ENCODING_NAMES)
    assert set(menu.IMAGE_ENCODINGS).isdisjoint(menu.FEATURE_ENCODINGS)
    assert set(menu.LOSSLESS) <= set(menu.ENCODING_NAMES)
    assert menu.encodings_for_split(0) == menu.IMAGE_ENCODINGS and menu.encodings_for_split(3) == menu.FEATURE_ENCODINGS
    for name in menu.IMAGE_ENCODINGS:
        assert menu.encode_options(name).image_format in ("png", "raw_zstd", "jpeg")
    assert menu.encode_options("int8+zstd") == EncodeOptions("int8", 3, image_format="png")
    assert menu.encode_options("fp32+zstd") == EncodeOptions("fp32", 3)
    with pytest.raises(ValueError, match="choose one of png"):
        menu.encode_options("int4+zstd")


def test_parse_encodings_names_the_valid_choices():
    from rapnet.codec.menu import DEFAULT_ENCODINGS, parse_encodings

    assert parse_encodings("auto") == DEFAULT_ENCODINGS
    assert parse_encodings(" png, int8+zstd ,png") == ("png", "int8+zstd")
    for bad, why in [("png,webp", "unknown 'webp'"), (" , ", "no encoding given"), ("", "no encoding given")]:
        with pytest.raises(ValueError, match=why) as info:
            parse_encodings(bad)
        assert "choose auto or a comma-separated list of png, raw+zstd, jpeg" in str(info.value)


def test_the_menu_imports_without_torch():
    import subprocess
    import sys

    code = "import sys, rapnet.codec.menu; sys.exit('torch' in sys.modules or 'cv2' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], cwd=ROOT).returncode == 0


def test_recommended_encodings_match_the_benchmark_and_decode(setup, images):
    """The table in codec is the benchmark's pick (smallest deployable request within 0.3 points of fp32)."""
    import json

    bench = json.loads((ROOT / "benchmarks" / "results" / "codec.json").read_text())
    for split, rec in bench["recommended"].items():
        opts = codec.recommended_encoding(int(split))
        want = {k: v for k, v in rec["options"].items() if k not in ("dictionary", "send_image")}
        got = {k: getattr(opts, k) for k in want}
        assert got == want, f"split {split}: codec says {got}, the benchmark measured {want}"
        assert rec["accuracy_change_pts"] >= -bench["targets"]["int8_zstd_max_accuracy_loss_target_pts"] - 1e-9
    assert codec.recommended_encoding(99) == codec.SAFE_ENCODING
    with pytest.raises(ValueError):
        codec.recommended_encoding(-1)
    model, contract = setup
    last = model.num_exits - 1
    with torch.no_grad():
        for split in range(model.num_stages):
            image = codec.pixels_to_tensor(images[0])
            req = codec.build_request(contract, model.edge_part(image, split), split, last,
                                      codec.recommended_encoding(split), image=images[0])
            parsed = codec.parse_request_bytes(_wire(req), contract)
            assert parsed.split == split and set(parsed.carry) == set(contract.carry_shapes[split])


def test_response_top_k(setup):
    _, contract = setup
    resp = codec.build_response("r", torch.tensor([[0.1, 3.0, 2.0]]), 2, contract, 4, top_k=2)
    assert resp.class_index == 1 and [t.class_index for t in resp.top_k] == [1, 2]
    assert resp.model_identity == contract.identity


def test_response_matches_torch_softmax_for_numpy_and_torch_logits(setup):
    _, contract = setup
    logits = torch.randn(10, generator=torch.Generator().manual_seed(3)) * 4
    for sent in (logits, logits.numpy(), logits.to(torch.bfloat16)):
        expected = torch.softmax(torch.as_tensor(sent).float(), dim=0).topk(5)
        resp = codec.build_response("r", sent, 2, contract, 4)
        assert resp.class_index == int(expected.indices[0])
        assert [t.class_index for t in resp.top_k] == expected.indices.tolist()
        np.testing.assert_allclose([t.score for t in resp.top_k], expected.values.numpy(), rtol=1e-5)
    tie = codec.build_response("r", np.array([1.0, 5.0, 5.0, 0.0], dtype=np.float32), 2, contract, 4, top_k=3)
    assert [t.class_index for t in tie.top_k] == [1, 2, 0]  # ties: the lower class first, as argmax picks


# --------------------------------------------------------------------------------------------------------
# Fuzzing whole requests: garbage and mutations give a CodecError or a valid decode, nothing else
# --------------------------------------------------------------------------------------------------------

FUZZ_LIMITS = DecodeLimits(max_elements=1 << 16, max_total_bytes=1 << 20)


@pytest.fixture(scope="module")
def valid_requests(setup, images):
    model, contract = setup
    pixels = images[0]
    out = []
    with torch.no_grad():
        for split, enc, level, fmt, params in [(1, "int8", 3, "png", "f32"), (2, "int4", None, "jpeg", "f32"),
                                               (4, "fp16", 3, "raw_zstd", "f32"), (5, "fp32", None, "png", "f32"),
                                               (0, "int8", 3, "png", "f32"), (5, "int4", None, "png", "f16"),
                                               (3, "int8", 3, "png", "f16")]:
            carry = model.edge_part(codec.pixels_to_tensor(pixels), split)
            req = codec.build_request(contract, carry, split, model.num_exits - 1,
                                      EncodeOptions(enc, level, params=params, image_format=fmt), image=pixels)
            out.append(_wire(req))
    return out


def _decode_or_refuse(data: bytes, contract) -> None:
    try:
        parsed = codec.parse_request_bytes(data, contract, FUZZ_LIMITS)
    except CodecError as err:
        assert err.status in (grpc.StatusCode.INVALID_ARGUMENT, grpc.StatusCode.FAILED_PRECONDITION)
        return
    for t in parsed.carry.values():  # whatever decodes is finite and within the limits
        assert torch.isfinite(t).all() and t.numel() <= FUZZ_LIMITS.max_elements


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=4096))
def test_random_bytes_never_crash(setup, data):
    _decode_or_refuse(data, setup[1])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_requests_never_crash(setup, valid_requests, data):
    wire = bytearray(data.draw(st.sampled_from(valid_requests)))
    kind = data.draw(st.sampled_from(["flip", "truncate", "splice", "overwrite"]))
    if kind == "flip":
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(wire) - 1))
            wire[i] ^= 1 << data.draw(st.integers(0, 7))
    elif kind == "truncate":
        wire = wire[: data.draw(st.integers(0, len(wire) - 1))]
    elif kind == "splice":
        i = data.draw(st.integers(0, len(wire)))
        wire[i:i] = data.draw(st.binary(min_size=1, max_size=64))
    else:
        i = data.draw(st.integers(0, len(wire) - 1))
        chunk = data.draw(st.binary(min_size=1, max_size=16))
        wire[i : i + len(chunk)] = chunk
    _decode_or_refuse(bytes(wire), setup[1])


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.data())
def test_mutated_fields_never_crash(setup, valid_requests, data):
    req = pb.InferRequest.FromString(data.draw(st.sampled_from(valid_requests)))
    if req.tensors:
        t = req.tensors[data.draw(st.integers(0, len(req.tensors) - 1))]
        big = st.integers(-(1 << 63), (1 << 63) - 1)
        choice = data.draw(st.sampled_from(["shape", "raw_size", "scale", "zp", "axis", "enums", "data", "compact"]))
        if choice == "shape":
            t.shape[data.draw(st.integers(0, len(t.shape) - 1))] = data.draw(big)
        elif choice == "raw_size":
            t.raw_size = data.draw(st.integers(0, (1 << 64) - 1))
        elif choice == "scale" and len(t.scale):
            t.scale[0] = data.draw(st.floats(width=32))
        elif choice == "zp" and len(t.zero_point):
            t.zero_point[0] = data.draw(st.floats(width=32))
        elif choice == "compact":
            t.scale_f16 = data.draw(st.binary(max_size=400))
            t.zero_point_u8 = data.draw(st.binary(max_size=200))
        elif choice == "axis":
            t.quant_axis = data.draw(st.integers(-(1 << 31), (1 << 31) - 1))
        elif choice == "enums":
            t.encoding, t.codec, t.dtype = (data.draw(st.integers(0, 6)) for _ in range(3))
        else:
            t.data = _rle_frame(data.draw(st.integers(1, 64)), data.draw(st.one_of(st.none(), st.integers(0, GIB))))
    if req.HasField("image"):
        req.image.width = data.draw(st.sampled_from([req.image.width, 0, 1, 1 << 31]))
        req.image.format = data.draw(st.integers(0, 5))
    tracemalloc.start()
    try:
        _decode_or_refuse(req.SerializeToString(), setup[1])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < FUZZ_LIMITS.max_total_bytes * 4, f"decoding peaked at {peak} bytes"
