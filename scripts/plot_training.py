#!/usr/bin/env python3
"""Loss curve of a testbed's training run: a PNG, a markdown table, and a copy of the JSON log."""
from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "allocmoe_edge" / "assets"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--arch", default="tiny-moe", help="testbed name (train_tiny_moe.py --arch): default paths")
    ap.add_argument("--log", type=Path, help="training log (default runs/<arch>/log.json)")
    ap.add_argument("--png", type=Path, help="loss curve (default assets/<arch>-loss.png)")
    ap.add_argument("--copy-log", type=Path, help="copy of the log (default assets/<arch>-train-log.json)")
    ap.add_argument("--table-every", type=int, default=100, help="steps between table rows")
    args = ap.parse_args()
    args.log = args.log or REPO / "runs" / args.arch / "log.json"
    args.png = args.png or ASSETS / f"{args.arch}-loss.png"
    args.copy_log = args.copy_log or ASSETS / f"{args.arch}-train-log.json"

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    log = json.loads(args.log.read_text())
    held = [r for r in log if "heldout_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 3.6), dpi=110)
    ax.plot([r["tokens"] / 1e6 for r in log], [r["loss"] for r in log], lw=0.8, label="train (batch)")
    ax.plot([r["tokens"] / 1e6 for r in held], [r["heldout_loss"] for r in held], "o-", ms=3, label="held-out")
    ax.set_xlabel("training tokens (M)")
    ax.set_ylabel("cross-entropy (nats)")
    ax.set_ylim(top=min(9.5, max(r["loss"] for r in log)))
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(args.png)
    shutil.copyfile(args.log, args.copy_log)

    print("| step | tokens | train loss | held-out loss | elapsed (min) |")
    print("|---:|---:|---:|---:|---:|")
    for r in held:
        if r["step"] % args.table_every == 0 or r is held[-1]:
            print(f"| {r['step']} | {r['tokens']:,} | {r['loss']:.3f} | {r['heldout_loss']:.3f} | "
                  f"{r['elapsed_s'] / 60:.1f} |")


if __name__ == "__main__":
    main()
