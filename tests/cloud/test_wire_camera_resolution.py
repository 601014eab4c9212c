"""Split execution equals monolithic execution through the real wire, at camera resolution (224 px).

The shipped Imagenette architecture and weights (ImageNet layout, width 0.5) built at 224 px input. For every split
point and every lossless encoding of the menu that fits it (png and raw+zstd send the image at split 0, fp32+zstd
the features later), the edge's own path (its runtime's edge part, build_request, edge.link.CloudLink) sends the
request over a real gRPC connection on 127.0.0.1 to the real cloud front (cloud.front.InferenceFront: token, request
budget, decode, coalescing, answer), whose replica is the replicas' own batch function (cloud.batching.run_batch)
called in this process instead of through Ray. The cloud's logits must equal one forward pass of the whole network
to the same exit on the same pixels, bit for bit: both sides run the same float32 modules on the same values, each
as a batch of one (the requests go one at a time), and a lossless encoding gives the cloud exactly the edge's
values (PNG and raw+zstd the uint8 pixels, fp32+zstd the float32 bits). The answer's top-k scores are the softmax
of those logits (float32 on the wire). No Ray starts.
"""
from __future__ import annotations

import asyncio
import dataclasses
import threading

import cv2
import grpc
import numpy as np
import pytest
import torch

from rapnet.build import build_model
from rapnet.checkpoint import load_model, model_identity
from rapnet.codec import LOSSLESS, build_request, encode_options, encodings_for_split, pixels_to_tensor
from rapnet.codec.budget import link_message_limit
from rapnet.execution import as_runtime
from rapnet.preprocess import to_model_array
from rapnet.shipped import model_for

TOKEN = "wire-224-token-" + "q" * 24
SIZE = 224


class InProcessReplica:
    """A deployment handle whose replica is cloud.batching.run_batch in this process (what CloudStages runs), and
    which keeps every result it returned."""

    def __init__(self, model):
        from cloud.batching import priced_rule_costs

        self.model, self.costs, self.results = model, priced_rule_costs(model), []

    def remote(self, chunk):
        from cloud.batching import run_batch

        async def run():
            results = run_batch(self.model, chunk, None, self.costs)
            self.results.extend(results)
            return results

        return asyncio.ensure_future(run())


class FrontOnLoopback:
    """The real front (InferenceFront) on a grpc.aio server bound to 127.0.0.1, its event loop in a thread, with
    gRPC's receive limit set from the request budget as CloudServer sets it."""

    def __init__(self, contract, handle):
        from cloud.config import FrontSettings
        from cloud.front import InferenceFront
        from cloud.metrics import FrontMetrics
        from rapnet.transport import BearerToken

        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, name="front-loop", daemon=True)
        self.thread.start()

        async def start():
            front = InferenceFront(contract, handle, FrontSettings(port=0, refusal_delay_ms=0), BearerToken(TOKEN),
                                   FrontMetrics())
            server = grpc.aio.server(options=[("grpc.max_receive_message_length", front.budget.max_bytes)])
            server.add_generic_rpc_handlers((front.generic_handler(),))
            port = server.add_insecure_port("127.0.0.1:0")
            await server.start()
            return front, server, port

        self.front, self.server, port = asyncio.run_coroutine_threadsafe(start(), self.loop).result(30)
        self.address = f"127.0.0.1:{port}"

    def stop(self) -> None:
        asyncio.run_coroutine_threadsafe(self.server.stop(0), self.loop).result(30)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()


@pytest.fixture(scope="module")
def model_224():
    shipped, _ = load_model(model_for("imagenette"))
    model = build_model(dataclasses.replace(shipped.config, image_size=SIZE)).eval()
    model.load_state_dict(shipped.state_dict())  # the same weights: the layers do not depend on the input size
    return model, model_identity(model)


@pytest.fixture(scope="module")
def pixels():
    """A 224x224 RGB frame with image-like structure (smooth shapes and some noise): uint8, as a camera gives."""
    rng = np.random.default_rng(0)
    base = cv2.resize(rng.integers(0, 256, (7, 7, 3), dtype=np.uint8), (SIZE, SIZE), interpolation=cv2.INTER_CUBIC)
    noise = rng.integers(-12, 13, (SIZE, SIZE, 3))
    return np.clip(base.astype(np.int64) + noise, 0, 255).astype(np.uint8)


def _cases(runtime):
    """(split, encoding, exit): every split point the wire carries, every lossless menu encoding that fits it, to
    the first exit the cloud can answer from there and to the last."""
    for split in range(runtime.num_stages):
        exits = sorted({next(k for k, s in enumerate(runtime.exit_stages) if s >= split), runtime.num_exits - 1})
        for encoding in (e for e in encodings_for_split(split) if e in LOSSLESS):
            for exit_index in exits:
                yield split, encoding, exit_index


@pytest.mark.slow  # 3 s alone, up to 20 s on a busy 2-core host
def test_split_equals_monolithic_through_the_wire_at_224_px(model_224, pixels):
    from edge.link import CloudLink, CloudTarget

    model, identity = model_224
    runtime = as_runtime(model, identity)  # the edge's execution API (PyTorch here; ONNX Runtime on a device)
    contract = runtime.contract
    assert contract.carry_shapes[0]["image"] == (3, SIZE, SIZE)
    replica = InProcessReplica(model)
    front = FrontOnLoopback(contract, replica)
    link = CloudLink(CloudTarget(front.address, token=TOKEN, max_message_bytes=link_message_limit(contract)),
                     deadline_ms=60_000)
    x = to_model_array(pixels)  # the edge's preprocessing of the frame
    assert torch.equal(torch.from_numpy(x), pixels_to_tensor(pixels))  # the cloud's of the decoded image
    cases = list(_cases(runtime))
    try:
        with torch.inference_mode():
            for split, encoding, exit_index in cases:
                carry = {"image": None} if split == 0 else runtime.edge_part(x, split)
                image = pixels if "image" in carry else None
                request = build_request(contract, carry, split, exit_index, encode_options(encoding), image=image)
                reply = link.infer(request.SerializeToString(), expect=(request.request_id, identity, split))
                cloud = replica.results[-1]
                assert cloud.exit == reply.response.exit_used == exit_index
                whole = model.run_to_exit(torch.from_numpy(x), exit_index)[0].numpy()
                assert np.array_equal(cloud.logits, whole), (
                    f"split {split}, {encoding}, exit {exit_index}: largest difference "
                    f"{np.abs(cloud.logits - whole).max()}")
                probs = torch.softmax(torch.from_numpy(whole).double(), 0).numpy()
                assert reply.response.class_index == int(np.argmax(whole))
                for entry in reply.response.top_k:
                    assert entry.score == pytest.approx(probs[entry.class_index], rel=1e-6, abs=1e-7)
    finally:
        link.close()
        front.stop()
    assert len(replica.results) == len(cases) > runtime.num_stages  # every split point, both image encodings
    assert {(s, e) for s, e, _ in cases} >= {(0, "png"), (0, "raw+zstd"), (runtime.num_stages - 1, "fp32+zstd")}
