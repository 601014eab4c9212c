"""`rapnet-cloud`: serve the cloud stages over gRPC, make a dev certificate, make a token.

    rapnet-cloud make-dev-cert --out dev-certs
    rapnet-cloud make-token --out token.txt
    RAPNET_TOKEN=$(cat token.txt) rapnet-cloud serve --checkpoint models/rapnet-imagenette.pt --port 50051 \
        --tls-cert dev-certs/server.pem --tls-key dev-certs/server.key --metrics-port 9464
"""
from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

from .config import CloudConfig


def build_parser() -> argparse.ArgumentParser:
    from rapnet.help_format import DefaultsHelpFormatter
    from rapnet.shipped import model_for

    from .config import AutoscalingSettings, BatchSettings, FrontSettings, MetricsSettings

    def default(value) -> str:
        """How a flag that overrides one --config field says its default."""
        return f"default: the --config value, else {value}"

    parser = argparse.ArgumentParser(prog="rapnet-cloud", description=__doc__.split("\n")[0],
                                     formatter_class=DefaultsHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="serve the cloud stages of a checkpoint over gRPC (Ctrl-C stops)",
                           formatter_class=DefaultsHelpFormatter)
    # The edge's default for cameras, streams and image folders, so that `edge-agent --camera 0 --cloud ...`
    # meets the model it runs
    serve.add_argument("--checkpoint", default=str(model_for()),
                       help="checkpoint written by rapnet-train (default: the shipped camera-resolution model, "
                            "%(default)s)")
    serve.add_argument("--config", metavar="YAML",
                       help="CloudConfig file (batching, autoscaling, limits; cloud/config.py), which the flags below "
                            "override (default: none, CloudConfig's defaults)")
    serve.add_argument("--host", default=None, help=f"address to bind ({default(FrontSettings.host)})")
    serve.add_argument("--port", type=int, default=None,
                       help=f"gRPC port, 0 picks a free one ({default(FrontSettings.port)})")
    serve.add_argument("--address", default=None, metavar="HOST:PORT",
                       help="Ray cluster to attach to: its GCS address, e.g. the head's IP:6379 ('auto' takes the "
                            "newest Ray instance on this host); the front stops when that cluster goes away "
                            "(default: the --config value, else start Ray on 127.0.0.1)")
    serve.add_argument("--tls-cert", metavar="PEM", help="server certificate chain (default: none, plaintext, which "
                                                         "only a loopback address or --insecure allows)")
    serve.add_argument("--tls-key", metavar="PEM", help="server private key, with --tls-cert (default: none)")
    serve.add_argument("--client-ca", metavar="PEM",
                       help="require client certificates signed by this CA, mutual TLS (default: none)")
    serve.add_argument("--insecure", action="store_true", help="allow plaintext on a non-loopback address")
    serve.add_argument("--token-file", metavar="FILE", help="file holding the bearer token (default: $RAPNET_TOKEN)")
    serve.add_argument("--max-batch-size", type=int, default=None, metavar="N",
                       help=f"samples per forward pass in a replica ({default(BatchSettings.max_batch_size)})")
    serve.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS",
                       help=f"how long a replica batch waits for company ({default(BatchSettings.batch_wait_ms)})")
    serve.add_argument("--replicas", type=int, default=None, metavar="N",
                       help=f"fixed replica count, min = max ({default(AutoscalingSettings.min_replicas)})")
    serve.add_argument("--max-in-flight", type=int, default=None, metavar="N",
                       help=f"samples the front admits at once; beyond, RESOURCE_EXHAUSTED "
                            f"({default(FrontSettings.max_in_flight)})")
    serve.add_argument("--metrics-port", type=int, default=None,
                       help=f"Prometheus exporter port, 0 picks one ({default('none, no exporter')})")
    serve.add_argument("--metrics-host", default=None,
                       help=f"Prometheus exporter address ({default(MetricsSettings.host)})")
    serve.add_argument("--ray-temp-dir", default=None, metavar="DIR",
                       help="temp dir of the local Ray instance (default: the --config value, else Ray's own, "
                            "/tmp/ray)")

    cert = sub.add_parser("make-dev-cert", help="self-signed CA + server and client certs for 127.0.0.1/localhost",
                          formatter_class=DefaultsHelpFormatter)
    cert.add_argument("--out", required=True, metavar="DIR",
                      help="directory to write ca.pem, server.pem/.key, client.pem/.key")
    cert.add_argument("--days", type=int, default=30, help="validity of the certificates")
    cert.add_argument("--name", action="append", default=None,
                      help="extra DNS name or IP for the server cert, repeatable (default: none, 127.0.0.1 and "
                           "localhost only)")

    check = sub.add_parser("health", help="wait until a front reports SERVING over gRPC health (exit 0), else exit 1",
                           formatter_class=DefaultsHelpFormatter)
    check.add_argument("--target", required=True, metavar="HOST:PORT", help="the front's address")
    check.add_argument("--tls-ca", metavar="PEM", help="CA that signed the front's certificate (default: none, "
                                                       "plaintext, loopback only)")
    check.add_argument("--wait", type=float, default=0.0, metavar="S",
                       help="keep asking, once a second, for up to S seconds (0: ask once)")
    check.add_argument("--while-pid", type=int, default=None, metavar="PID",
                       help="give up at once when this process (the front) exits (default: none)")

    token = sub.add_parser("make-token", help="write a random bearer token (mode 600)",
                           formatter_class=DefaultsHelpFormatter)
    token.add_argument("--out", required=True, metavar="FILE", help="file to write the token to")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "make-dev-cert":
        from .security import make_dev_cert

        paths = make_dev_cert(args.out, days=args.days, extra_names=tuple(args.name or ()))
        print(f"CA (give to clients): {paths.ca}\nserver: {paths.cert} {paths.key}\nclient: {paths.client_cert} {paths.client_key}")
        return 0
    if args.command == "make-token":
        from rapnet.transport import BearerToken

        out = Path(args.out)
        fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            f.write(BearerToken.generate().value + "\n")
        print(f"token written to {out}")
        return 0
    if args.command == "health":
        return _health(args)
    return _serve(args)


def _health(args) -> int:
    """Ask grpc.health.v1 until SERVING or `--wait` runs out; says each change of answer on stderr."""
    import time

    import grpc

    from rapnet.transport import health_status, open_channel

    deadline = time.monotonic() + args.wait
    last = None
    try:
        channel = open_channel(args.target, ca=args.tls_ca)
    except ValueError as err:
        print(f"rapnet-cloud health: {err}", file=sys.stderr)
        return 2
    with channel:
        while True:
            try:
                answer = health_status(channel, timeout=2.0)
            except grpc.RpcError as err:
                answer = f"{err.code().name}: {err.details()}"
            if answer == "SERVING":
                print(f"{args.target}: SERVING")
                return 0
            if answer != last:
                print(f"{args.target}: {answer}", file=sys.stderr)
                last = answer
            gone = args.while_pid is not None and not _alive(args.while_pid)
            if gone or time.monotonic() >= deadline:
                why = f"process {args.while_pid} exited" if gone else f"not SERVING after {args.wait:g} s"
                print(f"rapnet-cloud health: {args.target} {why} (last answer: {answer})", file=sys.stderr)
                return 1
            time.sleep(1.0)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _serve(args) -> int:
    from . import logs
    from rapnet.transport import load_token

    from .security import TLSFiles
    from .server import CloudServer, StartError

    logs.configure()
    log = logs.get_logger("rapnet.cloud.cli")
    try:
        config = CloudConfig.from_yaml(args.config) if args.config else CloudConfig()
        replicas = {"min_replicas": args.replicas, "max_replicas": args.replicas} if args.replicas else {}
        config = config.with_overrides(
            front={"host": args.host, "port": args.port, "max_in_flight": args.max_in_flight},
            batch={"max_batch_size": args.max_batch_size, "batch_wait_ms": args.batch_wait_ms},
            autoscaling=replicas,
            metrics={"port": args.metrics_port, "host": args.metrics_host},
            ray={"address": args.address, "temp_dir": args.ray_temp_dir},
        )
        token = load_token(args.token_file)
        if token is None:
            raise ValueError("no bearer token: pass --token-file FILE or set RAPNET_TOKEN "
                             "(make one with `rapnet-cloud make-token --out token.txt`)")
        if bool(args.tls_cert) != bool(args.tls_key):
            raise ValueError("--tls-cert and --tls-key go together")
        if args.client_ca and not args.tls_cert:
            raise ValueError("--client-ca (mutual TLS) needs --tls-cert and --tls-key")
        tls = TLSFiles(args.tls_cert, args.tls_key, args.client_ca) if args.tls_cert else None
        server = CloudServer(args.checkpoint, config, token=token, tls=tls, insecure=args.insecure)
    except (ValueError, StartError) as err:
        print(f"rapnet-cloud: {err}", file=sys.stderr)
        return 2

    stop = threading.Event()
    state = {"started": False}

    def on_signal(signum, _frame) -> None:
        log.info("signal", extra=logs.fields(signal=signal.Signals(signum).name))
        first = not stop.is_set()
        stop.set()
        if first and not state["started"]:
            raise KeyboardInterrupt  # abandon start(); server.stop() below stops what it had started
    # Before start, so that a signal while Ray starts or the app deploys still ends in server.stop(): Ray's own
    # handler would exit at once and leave its helper processes behind (ensure_ray keeps this one in place).
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        try:
            server.start()
        except StartError as err:
            print(f"rapnet-cloud: {err}", file=sys.stderr)
            return 1
        state["started"] = True
        print(f"serving rapnet.v1.Inference on {server.address} (tls={'on' if tls else 'off'}"
              f"{', metrics on ' + str(config.metrics.host) + ':' + str(server.metrics_port) if server.metrics_port else ''})",
              flush=True)
        while not stop.is_set() and server.running:
            stop.wait(0.5)
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    if server.cluster_lost:
        print("rapnet-cloud: the Ray cluster went away (ray stop / ray down); the front stopped", file=sys.stderr,
              flush=True)
        sys.stdout.flush()
        os._exit(1)  # Ray's exit hooks would wait on the cluster that is gone: the process would stay
    return 0


if __name__ == "__main__":
    sys.exit(main())
