"""A victim client's latency while two authenticated clients flood the front with hostile but valid messages.

The hostile messages are valid InferRequest protobuf made of empty repeated entries (field 6, `tensors`, two bytes
each), the kind that costs a parser most per byte:
  * "1mib": just under 1 MiB, the limit the front had before the request budget (about half a million fields);
  * "budget": as large as the served model's request budget allows (rapnet.codec.budget), so gRPC lets it in and the
    front's field count refuses it.
Each flooder is a subprocess keeping 4 calls in flight, back to back. The victim is a subprocess with one closed-loop
caller sending real requests (split 4, the recommended encoding). Phases quiet, flood with "1mib", flood with
"budget" are interleaved and repeated; medians of the victim's p50 and p99 are reported, and the ratio of its p50
under each flood to its quiet p50 in the same repeat (target: within 2x).

    python benchmarks/hostile_clients.py                     # ~3 minutes on 2 cores
    python benchmarks/hostile_clients.py --seconds 6 --repeats 3
Writes benchmarks/results/hostile_clients.json.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
from rapnet.help_format import DefaultsHelpFormatter  # noqa: E402
from rapnet.machine import machine_info  # noqa: E402

TOKEN = "bench-token-" + "h" * 24
FLOODS = ("1mib", "budget")


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


# ------------------------------------------------------------------------------------------------------
# Client subprocesses
# ------------------------------------------------------------------------------------------------------


async def _run(address: str, payloads: list[bytes], callers: int, warmup_s: float, seconds: float) -> dict:
    import grpc

    limit = 4 << 20  # the flooders send more than the server takes: it must refuse, not the client
    options = [("grpc.max_send_message_length", limit), ("grpc.max_receive_message_length", limit)]
    async with grpc.aio.insecure_channel(address, options=options) as channel:
        call = channel.unary_unary("/rapnet.v1.Inference/Infer", request_serializer=None, response_deserializer=None)
        metadata = (("authorization", f"Bearer {TOKEN}"),)
        start = time.perf_counter()
        measure_from, stop_at = start + warmup_s, start + warmup_s + seconds
        latencies: list[float] = []
        codes: dict[str, int] = {}

        async def worker(k: int) -> None:
            i = k
            while time.perf_counter() < stop_at:
                t0 = time.perf_counter()
                try:
                    await call(payloads[i % len(payloads)], metadata=metadata, timeout=30)
                    code = "OK"
                except grpc.aio.AioRpcError as err:
                    code = err.code().name
                t1 = time.perf_counter()
                if t0 >= measure_from and t1 <= stop_at:
                    latencies.append(t1 - t0)
                    codes[code] = codes.get(code, 0) + 1
                i += callers

        await asyncio.gather(*(worker(k) for k in range(callers)))
    return {"latencies": latencies, "codes": codes}


def _client_main(args) -> None:
    data = Path(args.payloads).read_bytes()
    payloads, pos = [], 0
    while pos < len(data):
        (n,) = struct.unpack_from("<I", data, pos)
        payloads.append(data[pos + 4: pos + 4 + n])
        pos += 4 + n
    print(json.dumps(asyncio.run(_run(args.address, payloads, args.callers, args.warmup, args.seconds))))


def _write_payloads(path: Path, payloads: list[bytes]) -> str:
    path.write_bytes(b"".join(struct.pack("<I", len(p)) + p for p in payloads))
    return str(path)


def _spawn(address: str, payload_file: str, callers: int, warmup_s: float, seconds: float) -> subprocess.Popen:
    cmd = [sys.executable, __file__, "--client", "--address", address, "--payloads", payload_file,
           "--callers", str(callers), "--warmup", str(warmup_s), "--seconds", str(seconds)]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)})


def _result(proc: subprocess.Popen, timeout: float) -> dict:
    out, _ = proc.communicate(timeout=timeout)
    if proc.returncode:
        raise RuntimeError(f"client exited with {proc.returncode}")
    return json.loads(out.strip().splitlines()[-1])


# ------------------------------------------------------------------------------------------------------
# The run
# ------------------------------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--checkpoint", default=str(ROOT / "models" / "rapnet-cifar10.pt"), help="served model")
    parser.add_argument("--seconds", type=float, default=6.0, help="measured seconds per phase")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds before measuring, per phase")
    parser.add_argument("--repeats", type=int, default=3, help="rounds of quiet, 1mib, budget")
    parser.add_argument("--flood-callers", type=int, default=4, help="calls each flooder keeps in flight")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "hostile_clients.json"),
                        help="JSON result file")
    parser.add_argument("--client", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--address", help=argparse.SUPPRESS)
    parser.add_argument("--payloads", help=argparse.SUPPRESS)
    parser.add_argument("--callers", type=int, default=1, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        _client_main(args)
        return

    import numpy as np
    import torch

    from cloud.config import CloudConfig
    from cloud.server import start_local
    from rapnet.checkpoint import load_model
    from rapnet.codec import ModelContract, build_request, recommended_encoding, request_budget

    torch.set_num_threads(1)
    model, metadata = load_model(args.checkpoint)
    contract = ModelContract.from_model(model, metadata["identity"])
    budget = request_budget(contract)
    split = 4
    rng = np.random.default_rng(0)
    legit = []
    with torch.no_grad():
        for _ in range(16):
            image = torch.from_numpy(rng.standard_normal((1, 3, 32, 32)).astype(np.float32))
            legit.append(build_request(contract, model.edge_part(image, split), split, model.num_exits - 1,
                                       recommended_encoding(split)).SerializeToString())
    hostile = {"1mib": b"\x32\x00" * ((1 << 20) // 2 - 16), "budget": b"\x32\x00" * (budget.max_bytes // 2 - 8)}
    tmp = Path(tempfile.mkdtemp(prefix="rapnet-hostile-"))
    files = {"legit": _write_payloads(tmp / "legit.bin", legit),
             **{k: _write_payloads(tmp / f"{k}.bin", [v]) for k, v in hostile.items()}}

    config = CloudConfig().with_overrides(autoscaling={"min_replicas": 1, "max_replicas": 1})
    t0 = time.perf_counter()
    server = start_local(args.checkpoint, token=TOKEN, config=config)
    print(f"server up in {time.perf_counter() - t0:.1f} s at {server.address}; receive limit "
          f"{server.max_receive_bytes} bytes (the model's request budget)", flush=True)
    phases: dict[str, list[dict]] = {"quiet": [], **{k: [] for k in FLOODS}}
    try:
        for repeat in range(args.repeats):
            for phase in ("quiet", *FLOODS):
                floods = [] if phase == "quiet" else [
                    _spawn(server.address, files[phase], args.flood_callers, 0.0, args.warmup + args.seconds + 1.0)
                    for _ in range(2)]
                victim = _spawn(server.address, files["legit"], 1, args.warmup + 0.5, args.seconds)
                wait = args.warmup + args.seconds + 120
                seen = _result(victim, wait)
                flooded = [_result(f, wait) for f in floods]
                lat = seen["latencies"]
                entry = {"p50_ms": _pct(lat, 0.5) * 1e3, "p99_ms": _pct(lat, 0.99) * 1e3, "calls": len(lat),
                         "victim_codes": seen["codes"]}
                if flooded:
                    codes: dict[str, int] = {}
                    for f in flooded:
                        for code, n in f["codes"].items():
                            codes[code] = codes.get(code, 0) + n
                    entry.update(hostile_codes=codes, hostile_per_s=sum(codes.values()) / args.seconds,
                                 hostile_p50_ms=_pct([x for f in flooded for x in f["latencies"]], 0.5) * 1e3)
                phases[phase].append(entry)
                print(f"repeat {repeat + 1} {phase:>6}: victim p50 {entry['p50_ms']:.1f} ms, p99 "
                      f"{entry['p99_ms']:.1f} ms ({entry['calls']} calls)"
                      + (f"; hostile {entry['hostile_per_s']:.0f}/s {entry['hostile_codes']}" if flooded else ""),
                      flush=True)
    finally:
        server.stop()

    summary = {}
    for phase, runs in phases.items():
        summary[phase] = {"p50_ms": statistics.median(r["p50_ms"] for r in runs),
                          "p99_ms": statistics.median(r["p99_ms"] for r in runs)}
        if phase != "quiet":
            ratios = [r["p50_ms"] / q["p50_ms"] for r, q in zip(runs, phases["quiet"])]
            summary[phase].update(p50_vs_quiet=statistics.median(ratios), p50_vs_quiet_each=ratios,
                                  hostile_per_s=statistics.median(r["hostile_per_s"] for r in runs),
                                  hostile_codes=runs[-1]["hostile_codes"])
    result = {
        "benchmark": "hostile_clients", "command": "python benchmarks/hostile_clients.py", "machine": machine_info(),
        "checkpoint": args.checkpoint, "identity": metadata["identity"], "split": split,
        "request_budget": {"max_bytes": budget.max_bytes, "max_fields": budget.max_fields},
        "legit_request_bytes": statistics.median(map(len, legit)),
        "hostile_bytes": {k: len(v) for k, v in hostile.items()},
        "settings": {"seconds": args.seconds, "warmup": args.warmup, "repeats": args.repeats,
                     "flooders": 2, "flood_callers": args.flood_callers, "victim_callers": 1, "replicas": 1},
        "summary": summary, "runs": phases,
        "note": "shared 2-core machine; a model training run used both cores throughout, so absolute times are "
                "inflated and noisy; the ratios compare phases of the same run (quiet, 1mib, budget, repeated)",
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(json.dumps(summary, indent=1))


if __name__ == "__main__":
    main()
