"""Losing a node of a two-node Ray cluster under load: frames lost, and the time until full service again.

The cluster is real and local: a head and a second node on 127.0.0.1 (ray.cluster_utils.Cluster: separate raylets,
object stores and worker processes), each with one CPU and a custom resource naming it, so that the two single-CPU
replicas land one on each node. The front
(cloud.server.CloudServer) attaches to the head by its GCS address. Client threads send real frames (split 2, fp32)
through edge.link.CloudLink with a deadline; a failed call falls back to the edge's own answer (the full local model,
as an edge agent's fallback does). Then every process of the second node is killed with SIGKILL and a replacement node joins.

Measured from the kill: the first successful cloud answer; the front's replica count back at 2 (Serve replaced the
lost replica on the new node); frames answered by the cloud, by the fallback, and lost (no answer at all: target 0);
cloud answers that are wrong (OK with another class than the model gives: target 0).

    python benchmarks/node_failure.py              # ~1.5 minutes on 2 cores
    python benchmarks/node_failure.py --repeats 3
Writes benchmarks/results/node_failure.json.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rapnet.help_format import DefaultsHelpFormatter  # noqa: E402

SPLIT = 2
DEADLINE_MS = 3000


class LocalCluster:
    """A head and worker nodes on 127.0.0.1, each a node of its own (raylet, object store, workers), started through
    ray.cluster_utils.Cluster, Ray's harness for several nodes on one host, under one temp folder. `ray start` cannot
    do this on loopback: Ray's local-only mode (every port on 127.0.0.1) refuses a second node, and without it Ray
    replaces 127.0.0.1 by the host's outward address. close() ends every process of the cluster, whatever state the
    nodes are in, then any process whose command line still names the folder."""

    def __init__(self, object_store_bytes: int = 80 << 20):
        from ray.cluster_utils import Cluster

        from cloud.server import local_ray_environment

        local_ray_environment()  # every node's ports on 127.0.0.1
        os.environ.pop("RAPNET_TOKEN", None)  # nodes inherit this environment
        # Short: Ray's socket paths under it must stay within the 107 bytes of a Unix socket path.
        self.base = Path(tempfile.mkdtemp(prefix="rn-", dir="/tmp"))
        # Ray notes the newest cluster's address in its default temp dir, which `--address auto` reads: this
        # cluster's note stays in its own folder, not /tmp/ray, for the cluster's lifetime.
        self._tmpdir_before = os.environ.get("RAY_TMPDIR")
        os.environ["RAY_TMPDIR"] = str(self.base)
        (self.base / "ray").mkdir()
        self.object_store_bytes = object_store_bytes
        self.cluster = Cluster(shutdown_at_exit=True)
        self.nodes: dict = {}

    @property
    def address(self) -> str:
        return self.cluster.address

    def start_node(self, name: str, head: bool = False, num_cpus: int = 1) -> None:
        """A node with `num_cpus` CPUs and a custom resource naming it (`node_<name>`)."""
        args = {"num_cpus": num_cpus, "resources": {f"node_{name}": 1}, "object_store_memory": self.object_store_bytes,
                "node_ip_address": "127.0.0.1"}
        if head:
            args.update(temp_dir=str(self.base), include_dashboard=False)
        self.nodes[name] = self.cluster.add_node(wait=True, **args)

    def raylet_pid(self, name: str) -> int | None:
        node = self.nodes.get(name)
        if node is None:
            return None
        procs = node.all_processes.get("raylet") or []
        return procs[0].process.pid if procs and procs[0].process.poll() is None else None

    def raylet_pids(self) -> list[int]:
        """The live nodes' raylets: the parents of every worker process of this cluster."""
        return [pid for pid in map(self.raylet_pid, self.nodes) if pid is not None]

    def kill_node(self, name: str) -> None:
        """SIGKILL every process of the node (raylet, object store, its workers), the way a crashed machine leaves."""
        self.cluster.remove_node(self.nodes.pop(name), allow_graceful=False)

    def wait_for(self, ready, timeout_s: float, what: str) -> None:
        deadline = time.monotonic() + timeout_s
        while not ready():
            if time.monotonic() > deadline:
                raise RuntimeError(f"{what} not up after {timeout_s:g} s; logs in {self.base}")
            time.sleep(0.2)

    def close(self) -> None:
        with contextlib.suppress(Exception):  # a node may be half gone already
            for node in list(self.cluster.worker_nodes):
                self.cluster.remove_node(node, allow_graceful=False)
            if self.cluster.head_node is not None:
                self.cluster.remove_node(self.cluster.head_node, allow_graceful=False)
        self.nodes.clear()
        # Workers that outlived their raylet still name the folder.
        for pid, _ in self._ours():
            with contextlib.suppress(OSError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.5)
        shutil.rmtree(self.base, ignore_errors=True)
        if self._tmpdir_before is None:
            os.environ.pop("RAY_TMPDIR", None)
        else:
            os.environ["RAY_TMPDIR"] = self._tmpdir_before

    def leftovers(self) -> list[str]:
        """Processes still naming this cluster's folder (after close(): none)."""
        return [f"{pid} {' '.join(cmdline)[:120]}" for pid, cmdline in self._ours()]

    def _ours(self) -> list[tuple[int, list[str]]]:
        marker = str(self.base)
        return [(pid, cmdline) for pid, cmdline in processes() if any(marker in part for part in cmdline)]


def processes():
    """(pid, command line) of every process this user can read."""
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                yield int(entry.name), (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")[:-1]
            except OSError:
                continue


@dataclass
class Frames:
    """What happened to every frame the clients sent."""

    cloud: int = 0  # answered by the cloud with the model's own class
    fallback: int = 0  # the cloud call failed (a gRPC status), answered by the edge
    wrong: int = 0  # status OK but another class than the model gives: an answer that is not one
    lost: int = 0  # no answer at all (a client error the loop could not place)
    codes: dict[str, int] = field(default_factory=dict)  # the failed calls' status names
    first_ok_after_kill_s: float | None = None
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def as_dict(self) -> dict:
        return {"cloud": self.cloud, "fallback": self.fallback, "wrong": self.wrong, "lost": self.lost,
                "codes": dict(self.codes), "first_ok_after_kill_s": self.first_ok_after_kill_s}


def _frames(model, contract, n: int = 16):
    """n serialized requests (split SPLIT, fp32) with the class the model gives each: the cloud must answer the
    same class, and the edge's fallback answers it."""
    import torch

    from rapnet.codec import EncodeOptions, build_request

    gen = torch.Generator().manual_seed(0)
    frames = []
    with torch.no_grad():
        for i in range(n):
            image = torch.rand(1, 3, 32, 32, generator=gen)
            expected = int(model.run_to_exit(image, model.num_exits - 1).argmax())
            request = build_request(contract, model.edge_part(image, SPLIT), SPLIT, model.num_exits - 1,
                                    EncodeOptions(encoding="fp32", zstd_level=None), request_id=f"frame-{i}")
            frames.append((request, expected))
    return frames


def _client(link, frames, record: Frames, stop: threading.Event, kill_time: list[float]) -> None:
    from edge.link import CloudCallError

    i = 0
    while not stop.is_set():
        request, expected = frames[i % len(frames)]
        request.request_id = f"{threading.get_ident()}-{i}"
        i += 1
        try:
            reply = link.infer(request.SerializeToString(),
                               expect=(request.request_id, request.model_identity, request.split_point))
        except CloudCallError as err:
            with record.lock:
                record.fallback += 1  # the edge answers this frame itself (expected: the full local model)
                record.codes[err.code] = record.codes.get(err.code, 0) + 1
            time.sleep(0.05)
            continue
        except Exception:  # noqa: BLE001 - counted, never silent
            with record.lock:
                record.lost += 1
            continue
        with record.lock:
            if reply.response.class_index == expected:
                record.cloud += 1
                if kill_time and record.first_ok_after_kill_s is None:
                    record.first_ok_after_kill_s = time.monotonic() - kill_time[0]
            else:
                record.wrong += 1


def run_scenario(checkpoint: str, clients: int = 3, warm_s: float = 3.0, settle_s: float = 2.0,
                 recover_timeout_s: float = 120.0, replace: bool = True, log=print) -> dict:
    """One kill under load on a fresh two-node cluster; returns frames and recovery times. With `replace`, a new node
    joins and the run lasts until Serve runs two replicas again; without, until the first cloud answer after the
    kill. Cleans up every process it started, also on failure."""
    import ray
    import torch

    from cloud.config import CloudConfig
    from cloud.server import CloudServer
    from edge.link import CircuitBreaker, CloudLink, CloudTarget
    from rapnet.checkpoint import load_model
    from rapnet.codec import ModelContract

    torch.set_num_threads(1)
    model, metadata = load_model(checkpoint)
    model.eval()
    frames = _frames(model, ModelContract.from_model(model, metadata["identity"]))
    del model
    cluster = LocalCluster()
    server = links = None
    threads: list[threading.Thread] = []
    stop = threading.Event()
    record, kill_time = Frames(), []
    try:
        t0 = time.monotonic()
        cluster.start_node("head", head=True)
        cluster.start_node("second")
        log(f"cluster up in {time.monotonic() - t0:.1f} s ({cluster.address}, {cluster.base})")
        config = CloudConfig().with_overrides(
            front={"host": "127.0.0.1", "port": 0}, ray={"address": cluster.address},
            autoscaling={"min_replicas": 2, "max_replicas": 2}, batch={"max_batch_size": 8})
        server = CloudServer(checkpoint, config).start(timeout_s=180)
        cluster.wait_for(lambda: server.running_replicas() == 2, 120, "two replicas")
        free = ray.available_resources().get("CPU", 0.0)
        log(f"front {server.address}, 2 replicas, free CPUs {free:g} (0: one replica on each 1-CPU node)")
        links = [CloudLink(CloudTarget(server.address, token=server.token), DEADLINE_MS,
                           CircuitBreaker(failures=3, cooldown_s=0.5, max_cooldown_s=2.0)) for _ in range(clients)]
        threads = [threading.Thread(target=_client, args=(link, frames, record, stop, kill_time), daemon=True)
                   for link in links]
        for t in threads:
            t.start()
        time.sleep(warm_s)
        before = record.as_dict()
        cluster.kill_node("second")
        kill_time.append(time.monotonic())
        log(f"killed the second node after {before['cloud']} cloud answers")
        if not replace:
            cluster.wait_for(lambda: record.first_ok_after_kill_s is not None, recover_timeout_s,
                             "a cloud answer after the kill")
            time.sleep(settle_s)
            stop.set()
            for t in threads:
                t.join(timeout=DEADLINE_MS / 1e3 + 5)
            return {"frames": record.as_dict(), "cloud_answers_after_kill": record.cloud - before["cloud"],
                    "first_ok_after_kill_s": round(record.first_ok_after_kill_s, 3)}
        cluster.start_node("replacement")
        joined_s = time.monotonic() - kill_time[0]
        log(f"replacement node joined {joined_s:.1f} s after the kill")
        # Full service: Serve reported the lost replica (the count fell below 2) and then 2 running again.
        seen_loss: list[float] = []

        def back_to_two() -> bool:
            running = server.running_replicas()
            if running < 2 and not seen_loss:
                seen_loss.append(time.monotonic() - kill_time[0])
            return bool(seen_loss) and running == 2 and server.front.coalescer.replicas == 2

        cluster.wait_for(back_to_two, recover_timeout_s, "the lost replica noticed and replaced")
        full_s = time.monotonic() - kill_time[0]
        log(f"loss noticed {seen_loss[0]:.1f} s, two replicas again {full_s:.1f} s after the kill")
        time.sleep(settle_s)
        stop.set()
        for t in threads:
            t.join(timeout=DEADLINE_MS / 1e3 + 5)
        after_ok = record.cloud - before["cloud"]
        return {"frames": record.as_dict(), "cloud_answers_after_kill": after_ok,
                "replacement_joined_after_kill_s": round(joined_s, 2), "loss_noticed_after_kill_s": round(seen_loss[0], 2),
                "full_service_after_kill_s": round(full_s, 2),
                "first_ok_after_kill_s": None if record.first_ok_after_kill_s is None
                else round(record.first_ok_after_kill_s, 3)}
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=DEADLINE_MS / 1e3 + 5)
        for link in links or ():
            link.close()
        if server is not None:
            server.stop()
        if ray.is_initialized():
            ray.shutdown()
        cluster.close()


def main(argv: list[str] | None = None) -> int:
    from rapnet.machine import machine_info
    from rapnet.shipped import default_checkpoint

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(default_checkpoint()), help="model the cloud serves")
    parser.add_argument("--repeats", type=int, default=1, help="kills, each on a fresh cluster")
    parser.add_argument("--clients", type=int, default=3, help="client threads sending frames")
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/node_failure.json"), help="result file")
    parser.add_argument("--one-run", metavar="JSON", help=argparse.SUPPRESS)  # a repeat, in a process of its own
    args = parser.parse_args(argv)
    if args.one_run:
        result = run_scenario(args.checkpoint, clients=args.clients, log=lambda m: print("  " + m, flush=True))
        Path(args.one_run).write_text(json.dumps(result))
        return 0
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):  # each on a fresh cluster in a fresh process: Ray keeps state per process
            print(f"repeat {i + 1}/{args.repeats}", flush=True)
            out = Path(tmp) / f"run{i}.json"
            subprocess.run([sys.executable, __file__, "--checkpoint", args.checkpoint, "--clients", str(args.clients),
                            "--one-run", str(out)], check=True)
            runs.append(json.loads(out.read_text()))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    med = lambda key: statistics.median(r[key] for r in runs if r[key] is not None)  # noqa: E731
    result = {
        "benchmark": "node_failure",
        "what": "two-node local Ray cluster (1 CPU each, one replica per node), clients through edge.link with a "
                f"{DEADLINE_MS} ms deadline, the second node's processes SIGKILLed, a replacement node started at once",
        "clients": args.clients, "split": SPLIT, "repeats": args.repeats,
        "median_first_ok_after_kill_s": med("first_ok_after_kill_s"),
        "median_full_service_after_kill_s": med("full_service_after_kill_s"),
        "frames_lost": sum(r["frames"]["lost"] for r in runs),
        "wrong_answers": sum(r["frames"]["wrong"] for r in runs),
        "runs": runs, "machine": machine_info(), "threads": 1, "commit": commit,
        "note": "2-core host shared with a training run and other tests; times include Ray noticing the dead node",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("median_first_ok_after_kill_s", "median_full_service_after_kill_s",
                                              "frames_lost", "wrong_answers")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
