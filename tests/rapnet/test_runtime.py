"""Process-level tuning (rapnet.runtime): each setting does what it claims, in a fresh process."""
from __future__ import annotations

import platform
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Minor page faults per forward pass of a small RAPNet at batch 16, in a worker thread (as a replica computes).
_FAULTS_PER_FORWARD = """
import resource, sys, threading, torch
from rapnet.build import build_model
from rapnet.config import ModelConfig
from rapnet.runtime import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
torch.set_num_threads(1)
model = build_model(ModelConfig(width=0.35)).eval()
x = torch.randn(16, 3, 32, 32)
out = {}
def run():
    with torch.inference_mode():
        for _ in range(3):
            model.run_to_exit(x, model.num_exits - 1)
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(10):
            model.run_to_exit(x, model.num_exits - 1)
        out["faults"] = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 10
worker = threading.Thread(target=run)
worker.start()
worker.join()
print(out["faults"])
"""


def _faults_per_forward(setting: str) -> float:
    out = subprocess.run([sys.executable, "-c", _FAULTS_PER_FORWARD, setting], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=120).stdout
    return float(out.strip().splitlines()[-1])


@pytest.mark.slow
@pytest.mark.skipif(platform.system() != "Linux" or platform.libc_ver()[0] != "glibc", reason="glibc mallopt")
def test_keeping_freed_memory_stops_the_page_faults_of_repeated_forward_passes():
    default, kept = _faults_per_forward("default"), _faults_per_forward("keep")
    # glibc's default hands large activations back to the kernel after each pass and faults them in again
    assert default > 200
    assert kept < default / 20


# Policies of a thread started before the switch and of one started after it, as a replica's threads are.
_POLICIES = """
import os, threading
from rapnet.runtime import prefer_throughput_scheduling, set_thread_scheduling, thread_scheduling_policies
set_thread_scheduling(os.SCHED_OTHER)  # the default policy, whatever this process inherited
started = threading.Event(); stop = threading.Event()
def wait():
    started.set(); stop.wait()
early = threading.Thread(target=wait); early.start(); started.wait()
before = thread_scheduling_policies()
assert prefer_throughput_scheduling()
late = []
worker = threading.Thread(target=lambda: late.append(os.sched_getscheduler(0) == os.SCHED_BATCH)); worker.start()
worker.join()
after = thread_scheduling_policies()
stop.set(); early.join()
print(sorted(before), sorted(after), late[0])
"""


@pytest.mark.skipif(platform.system() != "Linux", reason="Linux scheduling policies")
def test_throughput_scheduling_covers_every_thread_and_the_ones_started_later():
    out = subprocess.run([sys.executable, "-c", _POLICIES], cwd=ROOT, check=True, capture_output=True, text=True,
                         timeout=60).stdout
    assert out.strip().splitlines()[-1] == "['other'] ['batch'] True"
