"""Where the CPU goes while the cloud tier serves: CPU seconds and minor page faults per process during the
served phase of one 32-client `cloud_bench.py` run, read from /proc (Linux only).

    python benchmarks/cloud_cpu_breakdown.py --chunk-hold-ms 50
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds() -> dict[int, tuple[str, float, int]]:
    """pid -> (command line, user + system CPU seconds so far, minor page faults so far) for every process this
    user can read."""
    out = {}
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{pid}/stat").read_text()
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ").strip()
        except OSError:
            continue  # the process ended meanwhile
        fields = stat[stat.rindex(")") + 2 :].split()  # after "pid (comm) ": minflt is field 10, utime and stime 14-15
        name = cmd[:100] or stat[stat.index("(") + 1 : stat.rindex(")")]
        out[int(pid)] = (name, (int(fields[11]) + int(fields[12])) / TICK, int(fields[7]))
    return out


def main() -> None:
    from rapnet.help_format import DefaultsHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=DefaultsHelpFormatter)
    parser.add_argument("--chunk-hold-ms", default="50", help="the front's chunk hold for the run")
    parser.add_argument("--window", type=float, default=8.0, help="seconds measured, inside the 10 s served phase")
    args = parser.parse_args()
    bench = subprocess.Popen(
        [sys.executable, str(ROOT / "benchmarks" / "cloud_bench.py"), "--clients", "32", "--repeats", "1",
         "--seconds", "10", "--chunk-hold-ms", args.chunk_hold_ms, "--out", os.devnull],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    start = end = None
    while bench.poll() is None:
        if start is None and any(" --client " in cmd for cmd, _, _ in cpu_seconds().values()):
            time.sleep(1.5)  # past the client's 1 s warm-up
            start, t0 = cpu_seconds(), time.time()
            time.sleep(args.window)
            end, t1 = cpu_seconds(), time.time()
        time.sleep(0.1)
    if start is None or end is None:
        sys.exit("the served phase was not seen: did cloud_bench.py fail?")
    print("\n".join(line for line in bench.stdout.read().splitlines() if line.startswith("rep ")))
    rows = sorted(((cpu - start[pid][1], faults - start[pid][2], pid, cmd) for pid, (cmd, cpu, faults) in end.items()
                   if pid in start), reverse=True)
    rows = [r for r in rows if r[0] >= 0.02]
    for seconds, faults, pid, cmd in rows:
        print(f"{seconds:6.2f} s  {faults:>9} minor faults  {pid:>7}  {cmd}")
    print(f"window {t1 - t0:.1f} s x {os.cpu_count()} CPUs; used {sum(r[0] for r in rows):.1f} CPU-s")


if __name__ == "__main__":
    main()
