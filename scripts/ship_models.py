"""Copy a training run's checkpoints into models/ as the shipped set for a dataset, each with its metadata as JSON.

    python scripts/ship_models.py runs/imagenette imagenette      # models/{rapnet,sdn,static}-imagenette.{pt,json}

Each checkpoint is loaded first (rapnet.checkpoint.load_model checks its identity), so a damaged file is never
shipped. The JSON holds the checkpoint's metadata without its per-epoch log: the last epoch's log line and the
seconds of every epoch stand in for it.
"""
from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from rapnet.checkpoint import load_model  # noqa: E402
from rapnet.shipped import KINDS  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="rapnet-train's --out folder, holding rapnet.pt, sdn.pt and static.pt")
    p.add_argument("dataset", help="dataset name in the shipped file names (e.g. imagenette)")
    p.add_argument("--models", default=str(ROOT / "models"), help="destination folder (default: models/)")
    args = p.parse_args()
    for kind in KINDS:
        source = Path(args.run) / f"{kind}.pt"
        _, meta = load_model(source)
        target = Path(args.models) / f"{kind}-{args.dataset}.pt"
        shutil.copyfile(source, target)
        log = [entry for entry in meta.get("log", []) if "seconds" in entry]
        summary = {k: v for k, v in meta.items() if k != "log"}
        summary["final_epoch_log"] = log[-1] if log else None
        summary["epoch_seconds"] = [entry["seconds"] for entry in log]
        target.with_suffix(".json").write_text(json.dumps(summary, indent=1) + "\n")
        print(f"{target} ({target.stat().st_size / 1e6:.1f} MB, identity {meta['identity'][:16]})")


if __name__ == "__main__":
    main()
