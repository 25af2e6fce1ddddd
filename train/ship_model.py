"""Ship a trained model as a ``robustkit:<name>`` reference model (maintainers' tool).

Writes ``robustkit/assets/models/<name>.pt`` (the bare model's state dict in float16, read back as
float32), ``<name>.json`` (the model card) and the sha256 and size of both into
``robustkit/assets/checksums.json`` (the other entries kept), which ``robustkit.models.pretrained``
checks on every read: an edited card is refused like edited weights. The card's numbers come
from ``robustkit evaluate`` result folders given on the command line, run on the *shipped*
(float16-rounded) weights, and from the training run's checkpoint and log.

Usage (from the repository root, after training and evaluating the float16 weights):
    python train/ship_model.py NAME --checkpoint RUN/best.pt --train-log RUN/train_time.json \
        --command "robustkit train -c ..." --eval clean_pgd40=EVAL_DIR --eval aa500=EVAL_DIR
    python train/ship_model.py NAME --checkpoint RUN/best.pt --export-only   # weights first
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import os
from pathlib import Path

import torch

from robustkit.training.checkpoint import load_checkpoint
from robustkit.utils import atomic_write, atomic_write_json

ASSETS = Path(__file__).resolve().parents[1] / "robustkit" / "assets"


def export_weights(checkpoint: Path, name: str) -> tuple[Path, dict]:
    """float16 state dict of the checkpoint's model; returns its path and the checkpoint."""
    state = load_checkpoint(checkpoint)
    weights = {k: v.half() if v.is_floating_point() else v for k, v in state["model"].items()}
    buf = io.BytesIO()
    torch.save(weights, buf)
    path = ASSETS / "models" / f"{name}.pt"
    atomic_write(path, buf.getvalue())
    record_checksums(f"models/{name}.pt")
    return path, state


def record_checksums(*names: str) -> None:
    """Record the sha256 and size of ``ASSETS/<name>`` for each name in ``checksums.json``.

    Merges: the other files' entries, and any other field of these (a sample's provenance),
    are kept. Every file the package ships under ``assets/`` must have its entry (the loaders
    refuse a file without one; ``tests/test_pretrained.py`` checks the set).
    """
    sums_path = ASSETS / "checksums.json"
    sums = json.loads(sums_path.read_text()) if sums_path.is_file() else {"files": {}}
    for name in names:
        data = (ASSETS / name).read_bytes()
        entry = sums["files"].setdefault(name, {})
        entry.update(sha256=hashlib.sha256(data).hexdigest(), bytes=len(data))
    atomic_write_json(sums_path, sums)
    os.chmod(sums_path, 0o644)  # atomic_write honours the umask; keep the shipped mode


def _eval_summary(folder: Path) -> dict:
    r = json.loads((folder / "results.json").read_text())
    return {"n": r["n_examples"], "subset": r["subset"], "eps": r["eps"],
            "eps_text": r["eps_text"], "threat_model": r["threat_model"], "seed": r["seed"],
            "accuracy": r["accuracy"], "components": r.get("components", {}),
            "attacks": r["attacks"], "protocol": r["protocol"]["name"],
            "checks_failed": [c["name"] for c in r.get("checks", []) if not c["passed"]],
            "checks_warned": [c["name"] for c in r.get("checks", [])
                              if c.get("severity") == "warning"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("name")
    p.add_argument("--checkpoint", type=Path, required=True)
    p.add_argument("--export-only", action="store_true",
                   help="weights and a card without evaluation numbers (evaluate those weights "
                        "as robustkit:NAME, then run again with --eval)")
    p.add_argument("--train-log", type=Path, help="JSON with wall_s and cpu_s of the training")
    p.add_argument("--command", default="", help="the command that trained the model")
    p.add_argument("--eval", action="append", default=[], metavar="KEY=DIR",
                   help="a robustkit evaluate output folder, run on the shipped weights")
    p.add_argument("--notes", default="")
    args = p.parse_args(argv)
    path, state = export_weights(args.checkpoint, args.name)
    print(f"weights: {path} ({path.stat().st_size} bytes)")
    cfg = state["config"]
    from robustkit.data import DATASETS

    info = DATASETS[cfg["data"]["name"]]
    c, h, _ = info.input_shape
    card = {
        "name": args.name,
        "spec": f"robustkit:{args.name}",
        "architecture": {"name": cfg["model"]["name"], "params": cfg["model"]["params"],
                         "num_classes": info.num_classes, "in_channels": c, "input_size": h,
                         "mean": list(info.mean), "std": list(info.std)},
        "weights": {"file": f"models/{args.name}.pt", "dtype": "float16 on disk, float32 loaded",
                    "checkpoint": {"epoch": state["epoch"], "step": state["step"],
                                   "tag": args.checkpoint.stem,
                                   "best_heldout": state.get("best")}},
        "objective": cfg["objective"],
        "data": {"dataset": cfg["data"]["name"],
                 "train": f"the first {60000 - cfg['data']['holdout']} MNIST training images "
                          f"(the last {cfg['data']['holdout']} held out for best.pt)"},
        "config": cfg,
        "command": args.command,
        "training": json.loads(args.train_log.read_text()) if args.train_log else {},
        "versions": state.get("versions", {}),
        "evaluation": {kv.split("=", 1)[0]: _eval_summary(Path(kv.split("=", 1)[1]))
                       for kv in args.eval},
        "history": [{k: v for k, v in h.items() if k.startswith(("eval/", "train/acc"))}
                    for h in state.get("history", [])],
        "notes": args.notes,
    }
    atomic_write_json(ASSETS / "models" / f"{args.name}.json", card)
    record_checksums(f"models/{args.name}.json")  # the card last: its bytes are final now
    print(f"card: {ASSETS / 'models' / (args.name + '.json')}")


if __name__ == "__main__":
    main()
