"""Starting and stopping the cloud tier: local Ray (or an existing cluster), the Serve app, the gRPC front.

    from cloud.server import start_local
    server = start_local("models/rapnet-cifar10.pt", port=0)   # returns once health is SERVING
    server.address, server.port, server.token                  # where and how the edge connects
    server.stop()

The front runs a grpc.aio server on its own event loop in a background thread of the calling process, so
`start_local` works from plain synchronous code (the edge agent's embedded default, tests, the CLI).
"""
from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import threading
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from rapnet.runtime import freeze_startup_heap, prefer_throughput_scheduling, set_thread_scheduling
from rapnet.transport import TOKEN_ENV, BearerToken

from .config import CloudConfig, RaySettings
from .logs import fields, get_logger
from .metrics import FrontMetrics
from .security import TLSFiles

log = get_logger("rapnet.cloud.server")
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING
SERVICE_NAMES = ("", "rapnet.v1.Inference")
# Environment variables that hold secrets: every process Ray starts inherits this process's environment, so they
# are withheld while Ray starts (the token is read once, at start-up, and lives in this process only).
SECRET_ENV = (TOKEN_ENV,)


class StartError(RuntimeError):
    """The cloud tier could not start; the message says why and what to do."""


def local_ray_environment() -> None:
    """Ray's local-only mode (every Ray port on 127.0.0.1) and no usage reporting. Ray reads the switch when
    it is imported, so where ray was imported already the flag is flipped in place as well; processes that
    ray.init starts inherit the environment."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    import sys

    constants = sys.modules.get("ray._private.ray_constants")
    if constants is not None:
        constants.ENABLE_RAY_CLUSTER = False


@contextlib.contextmanager
def _secrets_withheld():
    """SECRET_ENV out of os.environ meanwhile, so that the processes started now (Ray's) do not inherit them."""
    saved = {name: os.environ.pop(name) for name in SECRET_ENV if name in os.environ}
    try:
        yield
    finally:
        os.environ.update(saved)


@contextlib.contextmanager
def _callers_sigterm_handler_kept():
    """ray.init installs its own SIGTERM handler (exit at once); a handler this process installed before (the CLI's,
    which stops the front, deletes the app and shuts Ray down in order) is put back afterwards."""
    main = threading.current_thread() is threading.main_thread()
    before = signal.getsignal(signal.SIGTERM) if main else None
    try:
        yield
    finally:
        if callable(before):
            signal.signal(signal.SIGTERM, before)


def ensure_ray(settings: RaySettings, address: str | None = None) -> bool:
    """Connect to Ray: the running instance, the cluster at `address`, or a new local one bound to
    127.0.0.1 (num_cpus, capped object store, no dashboard, workers at `worker_niceness`). When this call starts
    or joins Ray, this process inlines call arguments up to `inline_args_bytes`. Secrets (SECRET_ENV) stay out of
    the environment of the processes it starts; a SIGTERM handler the caller installed stays in place. Returns
    True when it started Ray."""
    address = address or settings.address
    if address is None:
        local_ray_environment()
        os.environ["RAY_worker_niceness"] = str(settings.worker_niceness)  # read by the raylet ray.init starts
    # Read by this process's Ray core worker, which decides how the front's calls carry their arguments.
    os.environ["RAY_max_direct_call_object_size"] = str(settings.inline_args_bytes)
    import ray

    if ray.is_initialized():
        return False
    if address is not None:
        with _secrets_withheld(), _callers_sigterm_handler_kept():
            ray.init(address=address, namespace=settings.namespace, log_to_driver=False)
        return False
    kwargs = {}
    if settings.temp_dir:
        kwargs["_temp_dir"] = settings.temp_dir
    with _secrets_withheld(), _callers_sigterm_handler_kept():
        ray.init(
            address="local",  # a Ray of its own: never attach to another instance running on this host
            num_cpus=settings.num_cpus,
            object_store_memory=settings.object_store_bytes,
            include_dashboard=False,
            namespace=settings.namespace,
            _node_ip_address="127.0.0.1",
            log_to_driver=False,
            **kwargs,
        )
    return True


class CloudServer:
    """The running cloud tier. Use `start_local` (or `start`) to get one."""

    def __init__(self, checkpoint: str | os.PathLike, config: CloudConfig | None = None,
                 token: BearerToken | str | None = None, tls: TLSFiles | None = None, deploy: bool = True,
                 insecure: bool = False):
        self.checkpoint = str(Path(checkpoint).resolve())
        self.config = config or CloudConfig()
        if isinstance(token, str):
            token = BearerToken(token)
        self._token = token or BearerToken.generate()
        self.tls = tls
        self.deploy = deploy
        if tls is None and not self.config.front.is_loopback and not insecure:
            raise StartError(
                f"refusing plaintext gRPC on {self.config.front.host}: pass TLS files (--tls-cert/--tls-key), "
                "or bind 127.0.0.1, or accept the risk with insecure=True (--insecure)"
            )
        self.metrics = FrontMetrics()
        self.port: int | None = None
        self.metrics_port: int | None = None
        self.max_receive_bytes: int | None = None  # gRPC's receive limit once started (the model's request budget)
        self.identity: str | None = None
        self._owns_ray = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop_event: asyncio.Event | None = None
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._health: health.aio.HealthServicer | None = None
        self._handle = None
        self._front = None
        self._stopped = False
        self._policy_before: int | None = None  # the process's scheduling policy before start() changed it
        self.cluster_lost = False  # set when the Ray cluster this server attached to went away (the front stopped)
        self._gcs_address: str | None = None  # host:port of the attached cluster's GCS, which the front watches

    # ---- public ---------------------------------------------------------------------------------------
    @property
    def token(self) -> str:
        """The bearer token clients must send (generated when none was given)."""
        return self._token.value

    @property
    def host(self) -> str:
        return self.config.front.host

    @property
    def address(self) -> str:
        host = self.host
        return f"[{host}]:{self.port}" if ":" in host else f"{host}:{self.port}"

    @property
    def running(self) -> bool:
        """Whether the front is serving (started and not stopped)."""
        return self._thread is not None and self._thread.is_alive()

    @property
    def front(self):
        """The gRPC front (cloud.front.InferenceFront) once started, else None."""
        return self._front

    @property
    def handle(self):
        """The Serve deployment handle of the cloud stages once started, else None."""
        return self._handle

    @property
    def loop(self) -> asyncio.AbstractEventLoop | None:
        """The event loop the front runs on once started, else None."""
        return self._loop

    def start(self, timeout_s: float = 300.0) -> "CloudServer":
        if self.config.ray.address is None:
            local_ray_environment()  # before anything imports ray
        from ray import serve

        from rapnet.checkpoint import CheckpointError, load_model
        from rapnet.codec import ModelContract

        try:
            model, metadata = load_model(self.checkpoint)
        except CheckpointError as err:
            raise StartError(str(err)) from None
        self.identity = metadata["identity"]
        contract = ModelContract.from_model(model, self.identity)
        del model
        self._owns_ray = ensure_ray(self.config.ray)
        if not self._owns_ray:
            import ray

            self._gcs_address = ray.get_runtime_context().gcs_address
        cfg = self.config
        t0 = time.perf_counter()
        try:
            if self.deploy:
                from .app import build_app

                serve.start(proxy_location="Disabled")
                handle = serve.run(build_app(self.checkpoint, self.identity, cfg), name=cfg.app_name,
                                   route_prefix=None, blocking=False)
            else:
                handle = serve.get_deployment_handle(cfg.deployment_name, cfg.app_name)
        except Exception as err:  # noqa: BLE001 - Serve reports a failed deploy with several exception types
            self._shutdown_ray()
            raise StartError(f"the Serve application did not start: {err}") from None
        self._handle = handle
        log.info("deployed", extra=fields(app=cfg.app_name, seconds=round(time.perf_counter() - t0, 2),
                                          identity=self.identity[:12], replicas=cfg.autoscaling.min_replicas))
        if cfg.metrics.port is not None:
            self.metrics_port = self.metrics.serve(cfg.metrics.host, cfg.metrics.port)
        self._thread = threading.Thread(target=self._run_loop, args=(contract,), name="rapnet-cloud-front", daemon=True)
        self._thread.start()
        if not self._ready.wait(timeout_s) or self._failure is not None:
            failure = self._failure
            self.stop()
            raise StartError(f"the gRPC front did not become ready: {failure or 'timed out'}")
        freeze_startup_heap()
        if cfg.front.sched_batch:
            policy = os.sched_getscheduler(0) if hasattr(os, "sched_getscheduler") else None
            if prefer_throughput_scheduling():  # every thread is up by now; later ones inherit it
                self._policy_before = policy  # stop() restores it for a process that goes on (an agent, tests)
        log.info("serving", extra=fields(address=self.address, tls=self.tls is not None,
                                         mutual_tls=bool(self.tls and self.tls.client_ca), metrics_port=self.metrics_port))
        return self

    def stop(self) -> None:
        """Stop the front (in-flight calls get FrontSettings.grace_s), delete the app if this server deployed
        it, and shut Ray down if this server started it. Idempotent."""
        if self._stopped:
            return
        self._stopped = True
        if self._loop is not None and self._stop_event is not None and self._thread is not None and self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stop_event.set)
            self._thread.join(timeout=self.config.front.grace_s + 10)
        self.metrics.stop()
        if self.deploy and not self.cluster_lost:  # with the cluster gone there is no app left to delete
            try:
                from ray import serve

                serve.delete(self.config.app_name)
            except Exception as err:  # noqa: BLE001 - best effort on the way out
                log.warning("delete failed", extra=fields(error=str(err)))
        self._shutdown_ray()
        if self._policy_before is not None:
            set_thread_scheduling(self._policy_before)
        log.info("stopped", extra=fields(address=self.address if self.port else None))

    def wait(self) -> None:
        """Block until the front stops (the CLI's main loop)."""
        while self.running:
            self._thread.join(0.5)

    def __enter__(self) -> "CloudServer":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- internals ------------------------------------------------------------------------------------
    def _shutdown_ray(self) -> None:
        """Shut down the Ray instance this server started, and with it Serve's controller and replicas (stop()
        deleted the app gracefully before). serve.shutdown() is not called first: it has the controller kill
        itself while this process still has calls open on it (the shutdown call itself, the handle's long poll),
        which Serve submits with unlimited retries, so Ray reports each as a failed task on stdout ("Task
        ServeController.graceful_shutdown failed. There are infinite retries remaining ...") on every exit."""
        if self._owns_ray:
            import ray

            ray.shutdown()
            self._owns_ray = False

    def _run_loop(self, contract) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main(contract))
        except BaseException as err:  # noqa: BLE001 - reported to start() or logged
            self._failure = err
            log.error("front failed", extra=fields(error=f"{err.__class__.__name__}: {err}"))
        finally:
            self._ready.set()
            self._loop.close()

    async def _main(self, contract) -> None:
        from .front import InferenceFront, replica_handle

        front_cfg = self.config.front
        self._stop_event = asyncio.Event()
        front = InferenceFront(contract, replica_handle(self._handle, front_cfg.replica_transport), front_cfg,
                               self._token, self.metrics, max_chunk=self.config.batch.max_batch_size)
        front.coalescer.replicas = self.config.autoscaling.min_replicas
        self._front = front
        # gRPC refuses a larger message (RESOURCE_EXHAUSTED) before reading it into a buffer for the front: the
        # largest legitimate request for this model (rapnet.codec.budget), capped by front.max_message_bytes.
        self.max_receive_bytes = min(front_cfg.max_message_bytes, front.budget.max_bytes)
        server = grpc.aio.server(options=[("grpc.max_receive_message_length", self.max_receive_bytes),
                                          ("grpc.max_send_message_length", front_cfg.max_message_bytes),
                                          ("grpc.so_reuseport", 0)])
        server.add_generic_rpc_handlers((front.generic_handler(),))
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, server)
        for name in SERVICE_NAMES:
            await self._health.set(name, NOT_SERVING)
        target = f"[{front_cfg.host}]:{front_cfg.port}" if ":" in front_cfg.host else f"{front_cfg.host}:{front_cfg.port}"
        if self.tls is not None:
            port = server.add_secure_port(target, self.tls.server_credentials())
        else:
            port = server.add_insecure_port(target)
        if not port:
            raise StartError(f"cannot bind {target}: port in use or address not local")
        self.port = port
        await server.start()
        # SERVING only once a replica has answered (and holds the same model as the front).
        replica_identity = await self._handle.model_identity.remote()
        if replica_identity != self.identity:
            raise StartError(f"replica holds model {replica_identity[:12]}, the front {self.identity[:12]}")
        for name in SERVICE_NAMES:
            await self._health.set(name, SERVING)
        self._ready.set()
        watchers = [asyncio.create_task(self._watch_replicas())]
        if self._gcs_address is not None:
            watchers.append(asyncio.create_task(self._watch_cluster(self._gcs_address)))
        await self._stop_event.wait()
        for watcher in watchers:
            watcher.cancel()
        for name in SERVICE_NAMES:
            await self._health.set(name, NOT_SERVING)
        await server.stop(front_cfg.grace_s)

    async def _watch_replicas(self, period_s: float = 2.0, quick_s: float = 0.25, quick_for_s: float = 10.0) -> None:
        """Keep health and the front's replica count in step with the deployment: NOT_SERVING while no replica is
        running, and then the front answers UNAVAILABLE at once. Polls every `period_s`; every `quick_s` for
        `quick_for_s` after a call saw its replica die (Serve notices within a second or two) and while none runs."""
        loop = asyncio.get_running_loop()
        coalescer = self._front.coalescer
        lost = asyncio.Event()
        coalescer.on_replica_lost = lost.set
        last, quick_until = SERVING, 0.0
        while True:
            quick = last != SERVING or time.monotonic() < quick_until
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(lost.wait(), quick_s if quick else period_s)
            if lost.is_set():
                lost.clear()
                quick_until = time.monotonic() + quick_for_s
            try:
                running = await loop.run_in_executor(None, self.running_replicas)
            except Exception as err:  # noqa: BLE001 - a failed status poll must not kill the front
                log.warning("status poll failed", extra=fields(error=str(err)))
                continue
            coalescer.set_replicas(running)
            state = SERVING if running > 0 else NOT_SERVING
            if state != last:
                for name in SERVICE_NAMES:
                    await self._health.set(name, state)
                log.info("health", extra=fields(serving=state == SERVING, running_replicas=running))
                last = state

    async def _watch_cluster(self, gcs_address: str, period_s: float = 2.0, misses: int = 3) -> None:
        """Stop the front when the Ray cluster it attached to is gone (`ray stop` or `ray down` on the head):
        the GCS port refuses `misses` connections in a row. A front left behind would report SERVING while every
        call fails, and hold its port."""
        host, _, port = gcs_address.rpartition(":")
        missed = 0
        while missed < misses:
            await asyncio.sleep(period_s)
            try:
                _, writer = await asyncio.wait_for(asyncio.open_connection(host.strip("[]"), int(port)), period_s)
                writer.close()
                missed = 0
            except (OSError, asyncio.TimeoutError):
                missed += 1
        log.error("ray cluster gone, stopping", extra=fields(gcs_address=gcs_address))
        self.cluster_lost = True
        self._stop_event.set()

    def running_replicas(self) -> int:
        """How many replicas of the deployment Serve reports RUNNING."""
        from ray import serve

        app = serve.status().applications.get(self.config.app_name)
        if app is None:
            return 0
        dep = app.deployments.get(self.config.deployment_name)
        if dep is None:
            return 0
        return int(dep.replica_states.get("RUNNING", 0))


def start_local(checkpoint: str | os.PathLike, port: int = 0, token: str | BearerToken | None = None,
                tls: TLSFiles | None = None, config: CloudConfig | None = None, host: str = "127.0.0.1",
                address: str | None = None, deploy: bool = True, metrics_port: int | None = None,
                timeout_s: float = 300.0) -> CloudServer:
    """Serve `checkpoint` on host:port (0: a free port); start Ray in-process unless it runs or `address` is
    given. Returns once grpc.health.v1 says SERVING. With no token, one is generated: read `server.token`."""
    config = (config or CloudConfig()).with_overrides(
        front={"host": host, "port": port}, ray={"address": address},
        metrics={"port": metrics_port} if metrics_port is not None else {},
    )
    return CloudServer(checkpoint, config, token=token, tls=tls, deploy=deploy).start(timeout_s)
