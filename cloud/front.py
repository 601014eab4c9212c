"""The edge-facing gRPC front (grpc.aio): rapnet.v1.Inference over Ray Serve deployment handles.

Per call: bearer token (UNAUTHENTICATED), admission against a bound on samples in flight
(RESOURCE_EXHAUSTED, answered at once), bounded decoding with rapnet.codec (CodecError.status, i.e.
INVALID_ARGUMENT or FAILED_PRECONDITION), a deadline (the gRPC deadline, InferRequest.deadline_ms and
FrontSettings.request_timeout_s, whichever ends first: DEADLINE_EXCEEDED), then the deployment handle. A
replica that dies under a request is retried `retries` times on another one, then answered UNAVAILABLE; while no
replica runs, waiting and new samples are answered UNAVAILABLE at once; nothing waits forever. Scores that are not
finite are never answered OK (INTERNAL). Requests arrive as raw bytes (identity deserializer) so that undecodable
bytes are the codec's INVALID_ARGUMENT rather than gRPC's generic deserialization error, and so that the request
budget (size and field count of the largest legitimate request, rapnet.codec.budget) is checked before protobuf
parses them: parsing runs on the front's one event loop.
"""
from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from typing import Callable

import grpc
import numpy as np
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError

from protos.rapnet.v1 import inference_pb2 as pb
from rapnet.codec import (CodecError, DecodeLimits, ModelContract, build_response, clip, parse_request_bytes,
                          request_budget)
from rapnet.transport import BearerToken

from .batching import Sample, SampleResult
from .config import FrontSettings
from .logs import fields, get_logger
from .metrics import FrontMetrics

SERVICE = "rapnet.v1.Inference"
Code = grpc.StatusCode
_RETRYABLE = (RayActorError, ReplicaUnavailableError, DeploymentUnavailableError)
# Status details travel in gRPC metadata (8 KiB in all by default: longer ones turn the status into
# RESOURCE_EXHAUSTED) and into the log: client strings in them are clipped (rapnet.codec.clip), and the whole is capped.
MAX_DETAILS_CHARS = 1024
# Refusals of the client's own making (its request or token), answered after FrontSettings.refusal_delay_ms.
_PAUSED = frozenset({Code.INVALID_ARGUMENT, Code.UNAUTHENTICATED, Code.FAILED_PRECONDITION})


class Refusal(Exception):
    """A call ends with this status; `details` is safe to send and to log (capped at MAX_DETAILS_CHARS)."""

    def __init__(self, code: grpc.StatusCode, details: str):
        if len(details) > MAX_DETAILS_CHARS:
            details = details[: MAX_DETAILS_CHARS - 20] + f"... ({len(details)} chars)"
        super().__init__(details)
        self.code, self.details = code, details


def _no_replica() -> Refusal:
    return Refusal(Code.UNAVAILABLE, "no replica of the cloud stages is running (one died and Serve is replacing "
                                     "it); retry shortly")


@dataclass
class _Call:
    request_id: str = ""
    split: int | None = None
    exit: int | None = None


class InferenceFront:
    def __init__(self, contract: ModelContract, handle, settings: FrontSettings, token: BearerToken,
                 metrics: FrontMetrics, limits: DecodeLimits | None = None, max_chunk: int = 32):
        self.contract, self.handle, self.settings, self.token, self.metrics = contract, handle, settings, token, metrics
        # One sample per request: the response describes one image.
        self.limits = limits or DecodeLimits(max_batch=1)
        # The largest legitimate request for this model, checked on the raw bytes before they are parsed (the
        # server also sets gRPC's receive limit from it).
        self.budget = request_budget(contract, self.limits)
        self.in_flight = 0
        self.log = get_logger("rapnet.cloud.front")
        self.coalescer = Coalescer(handle, settings, metrics, max_chunk)

    def generic_handler(self) -> grpc.GenericRpcHandler:
        return grpc.method_handlers_generic_handler(SERVICE, {
            "Infer": grpc.unary_unary_rpc_method_handler(
                self.Infer, request_deserializer=None, response_serializer=pb.InferResponse.SerializeToString),
            "InferStream": grpc.stream_stream_rpc_method_handler(
                self.InferStream, request_deserializer=None, response_serializer=pb.InferResponse.SerializeToString),
        })

    # ---- methods --------------------------------------------------------------------------------------
    async def Infer(self, raw: bytes, context: grpc.aio.ServicerContext) -> pb.InferResponse:
        started = time.perf_counter()
        call = _Call()
        try:
            self._authorize(context)
            response = await self._answer(raw, context, call)
        except Refusal as refusal:
            del raw  # nothing of the request is held while the refusal waits (_pause)
            self._finish("Infer", refusal.code, call, started, context, refusal.details)
            await self._pause(refusal.code, context)
            await context.abort(refusal.code, refusal.details)
        self._finish("Infer", Code.OK, call, started, context)
        return response

    async def InferStream(self, raws, context: grpc.aio.ServicerContext):
        """Answers flow back as they complete (out of order; each carries its request_id). The first refused
        message ends the stream with its status; the client reopens the stream."""
        try:
            self._authorize(context)
        except Refusal as refusal:
            self._finish("InferStream", refusal.code, _Call(), time.perf_counter(), context, refusal.details)
            await self._pause(refusal.code, context)
            await context.abort(refusal.code, refusal.details)
        answers: asyncio.Queue = asyncio.Queue()
        window = asyncio.Semaphore(self.settings.stream_window)
        tasks: set[asyncio.Task] = set()
        done = object()

        async def one(raw: bytes) -> None:
            started, call = time.perf_counter(), _Call()
            try:
                answer = await self._answer(raw, context, call)
                self._finish("InferStream", Code.OK, call, started, context)
            except Refusal as refusal:
                self._finish("InferStream", refusal.code, call, started, context, refusal.details)
                answer = refusal
            finally:
                window.release()
            await answers.put(answer)

        async def read() -> None:
            async for raw in raws:
                await window.acquire()
                task = asyncio.create_task(one(raw))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            while tasks:
                await asyncio.gather(*list(tasks), return_exceptions=True)
            await answers.put(done)

        reader = asyncio.create_task(read())
        try:
            while True:
                answer = await answers.get()
                if answer is done:
                    break
                if isinstance(answer, Refusal):
                    await self._pause(answer.code, context)
                    await context.abort(answer.code, answer.details)
                yield answer
            await reader  # surfaces a broken request stream
        finally:
            reader.cancel()
            for task in list(tasks):
                task.cancel()

    async def _pause(self, code: grpc.StatusCode, context) -> None:
        """Answer a refusal of the client's own making after `refusal_delay_ms` (within its deadline): a client
        that keeps sending malformed or unauthenticated calls back to back then gets at most one answer per pause
        and call in flight, instead of taking the front's event loop from everyone else. Waiting costs nothing."""
        if code not in _PAUSED or not self.settings.refusal_delay_ms:
            return
        pause = self.settings.refusal_delay_ms / 1e3
        remaining = context.time_remaining()
        if remaining is not None:
            pause = min(pause, remaining - 0.05)
        if pause > 0:
            await asyncio.sleep(pause)

    # ---- one sample -----------------------------------------------------------------------------------
    def _authorize(self, context) -> None:
        if not self.token.matches(context.invocation_metadata()):
            raise Refusal(Code.UNAUTHENTICATED, "missing or wrong bearer token: send metadata 'authorization: Bearer <token>'")

    async def _answer(self, raw: bytes, context, call: _Call) -> pb.InferResponse:
        if self.in_flight >= self.settings.max_in_flight:
            raise Refusal(Code.RESOURCE_EXHAUSTED,
                          f"server busy: {self.in_flight} samples in flight (limit {self.settings.max_in_flight}); retry later")
        self.in_flight += 1
        self.metrics.in_flight.inc()
        try:
            return await self._answer_admitted(raw, context, call)
        finally:
            self.in_flight -= 1
            self.metrics.in_flight.dec()

    async def _answer_admitted(self, raw: bytes, context, call: _Call) -> pb.InferResponse:
        deadline = self._deadline(context)
        try:
            parsed = parse_request_bytes(raw, self.contract, self.limits, budget=self.budget)
        except CodecError as err:
            raise Refusal(err.status, str(err)) from None
        call.request_id, call.split, call.exit = parsed.request_id, parsed.split, parsed.exit
        split = str(parsed.split)
        self.metrics.decode.labels(split).observe(parsed.decode_ms / 1e3)
        if parsed.deadline_ms and parsed.client_sent_unix_ns and self.settings.honour_request_deadline_ms:
            left = parsed.client_sent_unix_ns / 1e9 + parsed.deadline_ms / 1e3 - time.time()
            deadline = min(deadline, time.monotonic() + left)
        carry = {key: tensor.numpy() for key, tensor in parsed.carry.items()}
        sample = Sample(parsed.split, parsed.exit, carry, exit_price=parsed.exit_price,
                        stop_confidence=parsed.stop_confidence)
        result = await self._dispatch(sample, deadline)
        if result.error is not None or result.logits is None:
            raise Refusal(Code.INTERNAL, f"the replica failed on this request ({result.error})")
        if not np.isfinite(result.logits).all():  # never an OK whose scores are NaN
            raise Refusal(Code.INTERNAL, f"the model's scores for this request are not finite (exit {result.exit}, "
                                         f"split {parsed.split}): the checkpoint misbehaves on this input")
        self._record_batch(result, split)
        call.exit = result.exit
        return build_response(parsed.request_id, result.logits, result.exit, self.contract, parsed.split,
                              queue_ms=result.queue_ms, compute_ms=result.compute_ms, decode_ms=parsed.decode_ms)

    def _deadline(self, context) -> float:
        remaining = context.time_remaining()
        budget = self.settings.request_timeout_s if remaining is None else min(remaining, self.settings.request_timeout_s)
        if budget <= 0:
            raise Refusal(Code.DEADLINE_EXCEEDED, "the request's deadline had passed when it arrived")
        return time.monotonic() + budget

    async def _dispatch(self, sample: Sample, deadline: float) -> SampleResult:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise Refusal(Code.DEADLINE_EXCEEDED, "deadline exceeded before a replica answered")
        future = self.coalescer.submit(sample)
        try:
            return await asyncio.wait_for(future, remaining)  # on timeout the sample is dropped if not yet sent
        except asyncio.TimeoutError:
            raise Refusal(Code.DEADLINE_EXCEEDED, "deadline exceeded before a replica answered") from None

    def _record_batch(self, result: SampleResult, split: str) -> None:
        m = self.metrics
        m.queue.labels(split).observe(result.queue_ms / 1e3)
        if result.first_in_batch:
            m.batch_size.observe(result.batch_size)
        if result.first_in_group:
            m.compute.labels(split).observe(result.compute_ms / 1e3)
            m.group_size.labels(split).observe(result.split_group_size)

    def _finish(self, method: str, code: grpc.StatusCode, call: _Call, started: float, context, details: str = "") -> None:
        seconds = time.perf_counter() - started
        self.metrics.requests.labels(method, code.name).inc()
        if code is Code.OK:
            self.metrics.latency.labels(str(call.split)).observe(seconds)
            return
        if self.log.isEnabledFor(logging.INFO):  # a flood of refusals costs no log work unless logged
            self.log.info("refused", extra=fields(
                method=method, code=code.name, details=details, request_id=clip(call.request_id), split=call.split,
                exit=call.exit, ms=round(seconds * 1e3, 3), peer=context.peer(),
            ))


class Coalescer:
    """Turns samples into chunks, one deployment-handle call per chunk.

    A Ray Serve handle call costs milliseconds of CPU in the caller and the replica on a small machine, more
    than a whole CIFAR forward pass, so the front does not pay it per sample. It keeps at most
    `pipeline_per_replica x running replicas` calls outstanding: a sample that arrives while a call slot is
    free leaves at once (no added latency when idle); under load samples wait for a slot and leave together,
    up to `max_chunk` per call. Replicas then merge chunks with @serve.batch. A chunk whose replica died is
    re-sent `retries` times to another replica (only its samples that are still waiting), then its samples get
    UNAVAILABLE, at once where no other replica runs. The server's health watcher reports the running replicas
    (`set_replicas`; `on_replica_lost` asks it to look at once): while none runs, waiting samples and new ones are
    answered UNAVAILABLE rather than held by Serve's router past their deadline.

    While every replica has a chunk to work on, a partial chunk waits for company: up to the replicas' recent
    compute time per batch (by then a replica is free to take it, so the wait costs little latency), never longer
    than `chunk_hold_ms` (0: never wait). Fewer, fuller calls: each costs milliseconds of CPU on both sides.
    """

    def __init__(self, handle, settings: FrontSettings, metrics: FrontMetrics, max_chunk: int):
        self.handle, self.settings, self.metrics, self.max_chunk = handle, settings, metrics, max_chunk
        self.replicas = 1  # running replicas; the server's health watcher keeps it current (set_replicas)
        self.pending: list[tuple[Sample, float, asyncio.Future]] = []  # (sample, arrival, caller's future)
        self.outstanding = 0
        self.sending: dict[asyncio.Task, list[tuple[Sample, asyncio.Future]]] = {}  # handle calls in flight
        self.on_replica_lost: Callable[[], None] | None = None  # a call saw its replica die
        self.hold_timer: asyncio.TimerHandle | None = None
        self.batch_compute_s = 0.0  # moving average of the replicas' compute time per batch
        self.log = get_logger("rapnet.cloud.front")

    def submit(self, sample: Sample) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        if self.replicas == 0:
            future.set_exception(_no_replica())
            return future
        self.pending.append((sample, time.monotonic(), future))
        self._flush()
        return future

    def set_replicas(self, running: int) -> None:
        """How many replicas run now. With none, every waiting sample is answered UNAVAILABLE now (and new ones
        at once until one runs again): Serve's router would hold their calls until a replica is back."""
        self.replicas = running
        if running > 0:
            self._flush()
            return
        refusal = _no_replica()
        pending, self.pending = self.pending, []
        _fail([(sample, future) for sample, _, future in pending], refusal)
        for task, chunk in list(self.sending.items()):
            _fail(chunk, refusal)
            task.cancel()

    def _flush(self) -> None:
        limit = self.settings.pipeline_per_replica * max(1, self.replicas)
        hold_s = min(self.settings.chunk_hold_ms / 1e3, self.batch_compute_s)
        while self.pending and self.outstanding < limit:
            every_replica_busy = self.outstanding >= max(1, self.replicas)
            if hold_s and every_replica_busy and len(self.pending) < self.max_chunk:
                wait = self.pending[0][1] + hold_s - time.monotonic()
                if wait > 0:
                    if self.hold_timer is None:
                        self.hold_timer = asyncio.get_running_loop().call_later(wait, self._hold_expired)
                    return
            chunk = [(s, f) for s, _, f in self.pending[: self.max_chunk] if not f.done()]
            del self.pending[: self.max_chunk]
            if chunk:
                self.outstanding += 1
                asyncio.get_running_loop().create_task(self._send(chunk))

    def _hold_expired(self) -> None:
        self.hold_timer = None
        self._flush()

    async def _send(self, chunk: list[tuple[Sample, asyncio.Future]]) -> None:
        task = asyncio.current_task()
        try:
            attempt = 0
            while True:
                chunk = [(s, f) for s, f in chunk if not f.done()]  # drop samples whose callers gave up
                if not chunk:
                    return
                self.sending[task] = chunk
                now = time.time()
                for sample, _ in chunk:
                    sample.enqueued_unix = now
                response = self.handle.remote([s for s, _ in chunk])
                try:
                    results = await _result(response)
                    break
                except asyncio.CancelledError:
                    response.cancel()
                    raise
                except BackPressureError as err:
                    return _fail(chunk, Refusal(Code.RESOURCE_EXHAUSTED, f"replicas are saturated ({err}); retry later"))
                except Exception as err:  # noqa: BLE001 - sorted here; every waiting sample gets a status
                    if not _is_replica_loss(err):
                        return _fail(chunk, Refusal(Code.INTERNAL, f"replica error: {err.__class__.__name__}"))
                    if self.on_replica_lost is not None:
                        self.on_replica_lost()
                    if attempt >= self.settings.retries or self.replicas <= 1:  # no other replica to try
                        return _fail(chunk, Refusal(
                            Code.UNAVAILABLE, f"the replica serving this request died ({attempt + 1} attempt(s)); retry"))
                    attempt += 1
                    self.metrics.retries.inc(len(chunk))
                    self.log.warning("retry", extra=fields(reason="replica lost", error=err.__class__.__name__,
                                                           samples=len(chunk)))
            for result in results:
                if result.first_in_batch:
                    observed = result.compute_ms / 1e3
                    self.batch_compute_s += (0.2 if self.batch_compute_s else 1.0) * (observed - self.batch_compute_s)
            for (_, future), result in zip(chunk, results):
                if not future.done():
                    future.set_result(result)
        finally:
            self.sending.pop(task, None)
            self.outstanding -= 1
            self._flush()


def replica_handle(handle, transport: str):
    """The deployment handle the front sends chunks through, over the configured transport.

    "grpc" is Serve's direct gRPC channel from the handle to each replica (what RAY_SERVE_USE_GRPC_BY_DEFAULT turns
    on process-wide); "ray" is Serve's default, Ray actor calls passing object references. Samples and results are
    plain dataclasses of numpy arrays, so standard pickle carries them; cloudpickle is only needed for code.
    """
    if transport == "ray":
        return handle.options(_by_reference=True)
    return handle.options(_by_reference=False, request_serialization="pickle", response_serialization="pickle")


def _fail(chunk, refusal: Refusal) -> None:
    for _, future in chunk:
        if not future.done():
            future.set_exception(refusal)


async def _result(response):
    return await response


def _is_replica_loss(err: BaseException) -> bool:
    if isinstance(err, _RETRYABLE):
        return True
    if isinstance(err, RayTaskError):
        cause = getattr(err, "cause", None)
        return isinstance(cause, _RETRYABLE)
    return False
