"""Training-cost benchmark: the trainer's overhead and SRD-DAT's saving over TRADES.

(a) PGD-AT epoch time / (natural epoch time + time of the same PGD-10 attack run alone), over
    the same batches and model: the trainer and the objective should add nothing measurable
    (target <= 1.05). "One PGD step" is reported as the attack time / 10.
(b) SRD-DAT / TRADES over a whole short run with the same K, model, data and epochs: gradient
    evaluations per sample (attack steps + the 2 back-propagated training passes of both
    methods) and wall-clock (targets <= 0.7), also per tau_t phase of SRD-DAT's schedule.

SmallCNN on the shipped MNIST sample (eps 0.3), so it runs anywhere in minutes. Writes
``bench_results/bench_training.json``.

Example:
    >>> python benchmarks/bench_training.py --quick
    >>> python benchmarks/bench_training.py --device cuda --epochs 10 --images 4000
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, DistributedSampler, Subset

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, device_info, print_table, sync, write_json  # noqa: E402

from robustkit.attacks.pgd import PGD  # noqa: E402
from robustkit.data import DATASETS, build_loaders  # noqa: E402
from robustkit.models import create_model  # noqa: E402
from robustkit.objectives import create_objective  # noqa: E402
from robustkit.training.callbacks import EvalCallback  # noqa: E402
from robustkit.training.trainer import Trainer  # noqa: E402
from robustkit.utils import resolve_device  # noqa: E402

EPS = 0.3  # the MNIST L-inf budget (methods.md §1.4)
INFO = DATASETS["sample-mnist"]


def _model(device: torch.device, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same initial weights for every contender
    return create_model("small_cnn", INFO.num_classes, INFO.mean, INFO.std, in_channels=1,
                        input_size=28).to(device)


def _trainer(model, objective, epochs: int, device, callbacks=()) -> Trainer:
    opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
    return Trainer(model, objective, opt, epochs=epochs, device=device, callbacks=callbacks)


def _timed(fn, device: torch.device) -> tuple[float, float]:
    """(wall seconds, process CPU seconds) of ``fn()``. On a shared CPU the CPU time of this
    process is the load-robust measure (other processes' time is not counted)."""
    sync(device)
    wall, cpu = time.perf_counter(), time.process_time()
    fn()
    sync(device)
    return time.perf_counter() - wall, time.process_time() - cpu


class _OneEpoch:
    """Ends ``fit`` after every epoch, so two runs can alternate epochs (load drift is shared)."""

    def on_epoch_end(self, trainer) -> None:
        trainer.state.stop = True


def overhead(device: torch.device, images: int, repeats: int) -> dict:
    """(a): PGD-AT epoch / (natural epoch + PGD-10 alone) over pre-loaded device batches."""
    train = build_loaders("sample-mnist", batch_size=128, holdout=0, augment=False).train
    batches = [tuple(t.to(device) for t in b)
               for b, _ in zip(train, range(images // 128), strict=False)]
    nat_model, at_model = _model(device), _model(device)
    natural = create_objective("natural", nat_model)
    pgd_at = create_objective("pgd_at", at_model, eps=EPS, alpha=EPS / 4, steps=10)

    def attack_alone() -> None:  # the objective's own attack object, called as PGD-AT calls it
        for x, y, _ in batches:
            pgd_at.attack.perturb(x, y)

    fns = {
        "natural_epoch": lambda: _trainer(nat_model, natural, 1, device).fit(batches),
        "pgd_at_epoch": lambda: _trainer(at_model, pgd_at, 1, device).fit(batches),
        "pgd10_alone": attack_alone,
    }
    for fn in fns.values():  # warm-up (allocator, first-call costs)
        fn()
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(repeats):  # round-robin: load drift hits every contender alike
        for name, fn in fns.items():
            w, c = _timed(fn, device)
            wall[name].append(w)
            cpu[name].append(c)
    out = {"images": len(batches) * 128, "batch_size": 128, "repeats": repeats, "target": 1.05}
    for clock, times in (("wall", wall), ("cpu", cpu)):
        ratios = [a / (n + p) for a, n, p in zip(times["pgd_at_epoch"], times["natural_epoch"],
                                                 times["pgd10_alone"], strict=True)]
        out[clock] = {"seconds": times, "ratio": statistics.median(ratios),
                      "pgd_step_seconds": statistics.median(times["pgd10_alone"]) / 10}
    return out


def srd_vs_trades(device: torch.device, images: int, epochs: int, k: int, eval_n: int) -> dict:
    """(b): whole runs of TRADES and SRD-DAT, epochs alternating, same K, data and weights."""
    loaders = build_loaders("sample-mnist", batch_size=128, holdout=0, augment=False)
    subset = Subset(loaders.train.dataset, range(min(images, len(loaders.train.dataset))))
    sampler = DistributedSampler(subset, num_replicas=1, rank=0, shuffle=True, seed=0)
    train = DataLoader(subset, batch_size=128, sampler=sampler)
    objectives = {
        # TRADES at the same K and step eps/4 as SRD-DAT's eps_hi (methods.md §3.5, reduction 1).
        "trades": lambda m: create_objective("trades", m, beta=1.0, eps=EPS, alpha=EPS / 4,
                                             steps=k),
        "srd_dat": lambda m: create_objective("srd_dat", m, beta=1.0, eps_hi=EPS,
                                              eps_lo=EPS / 2, k_max=k, step_ratio=0.25),
    }
    runs = {}
    for name, make in objectives.items():
        model = _model(device)
        runs[name] = {"trainer": _trainer(model, make(model), epochs, device, [_OneEpoch()]),
                      "epoch_seconds": [], "epoch_cpu_seconds": []}
    for _ in range(epochs):
        for run in runs.values():  # epochs alternate: load drift hits both runs alike
            w, c = _timed(lambda run=run: run["trainer"].fit(train), device)
            run["epoch_seconds"].append(w)
            run["epoch_cpu_seconds"].append(c)
    test = DataLoader(loaders.test.dataset, batch_size=250)
    out = {"images": len(subset), "epochs": epochs, "k": k, "eps": EPS}
    for name, run in runs.items():
        history = run["trainer"].state.history
        steps = [h["train/steps_per_sample"] for h in history]
        evaluator = EvalCallback(test, lambda m: {"pgd20": PGD(m, eps=EPS, alpha=EPS / 4,
                                                                  steps=20)},
                                 max_batches=max(1, eval_n // 250))
        out[name] = {"epoch_seconds": run["epoch_seconds"],
                     "epoch_cpu_seconds": run["epoch_cpu_seconds"],
                     "attack_steps_per_sample": steps,
                     "tau_t": [h.get("train/tau_t") for h in history],
                     "final": evaluator.evaluate(run["trainer"].model, device)}
    s, t = out["srd_dat"], out["trades"]
    evals = lambda steps: [v + 2 for v in steps]  # noqa: E731 (+ backward through x and x')
    out["grad_evals_ratio"] = sum(evals(s["attack_steps_per_sample"])) / sum(
        evals(t["attack_steps_per_sample"]))
    out["attack_steps_ratio"] = sum(s["attack_steps_per_sample"]) / sum(
        t["attack_steps_per_sample"])
    out["wall_clock_ratio"] = sum(s["epoch_seconds"]) / sum(t["epoch_seconds"])
    out["cpu_time_ratio"] = sum(s["epoch_cpu_seconds"]) / sum(t["epoch_cpu_seconds"])
    phases: dict[str, dict] = {}
    for e, tau in enumerate(s["tau_t"]):
        p = phases.setdefault(f"tau={int(tau)}", {"epochs": [], "srd": 0.0, "trades": 0.0,
                                                   "srd_s": 0.0, "trades_s": 0.0,
                                                   "srd_c": 0.0, "trades_c": 0.0})
        p["epochs"].append(e)
        p["srd"] += s["attack_steps_per_sample"][e] + 2
        p["trades"] += t["attack_steps_per_sample"][e] + 2
        p["srd_s"] += s["epoch_seconds"][e]
        p["trades_s"] += t["epoch_seconds"][e]
        p["srd_c"] += s["epoch_cpu_seconds"][e]
        p["trades_c"] += t["epoch_cpu_seconds"][e]
    out["phases"] = {k_: {"epochs": p["epochs"], "grad_evals_ratio": p["srd"] / p["trades"],
                          "wall_clock_ratio": p["srd_s"] / p["trades_s"],
                          "cpu_time_ratio": p["srd_c"] / p["trades_c"]}
                     for k_, p in phases.items()}
    out["target"] = 0.7
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: about a minute")
    parser.add_argument("--device", default=None, help="cpu, cuda (default: CUDA if available)")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    parser.add_argument("--images", type=int, default=None, help="training images of (b)")
    parser.add_argument("--epochs", type=int, default=None, help="epochs of (b)")
    parser.add_argument("--k", type=int, default=10, help="attack steps of both methods in (b)")
    parser.add_argument("--repeats", type=int, default=None,
                        help="round-robin repeats of (a) (default 9; 3 with --quick): one repeat "
                             "varies by +-7 %% on a shared CPU, the median of 9 by about 2 %%")
    parser.add_argument("--out", type=Path, default=RESULTS / "bench_training.json")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    device = resolve_device(args.device)
    # 5 epochs: SRD-DAT's tau_t is 0, 0, 1, 2, 2, so every phase of its schedule is measured.
    images = args.images or (512 if args.quick else 2048)
    epochs = args.epochs or 5
    result = {"bench": "training", "quick": args.quick, **device_info(device),
              "overhead": overhead(device, 512 if args.quick else 1024,
                                   args.repeats or (3 if args.quick else 9)),
              "srd_vs_trades": srd_vs_trades(device, images, epochs, args.k,
                                             eval_n=250 if args.quick else 500)}
    write_json(args.out, result)
    a, b = result["overhead"], result["srd_vs_trades"]
    rows = [{"name": f"(a) PGD-AT / (natural + PGD-10), {clock}", "value": a[clock]["ratio"],
             "target": 1.05, "ok": a[clock]["ratio"] <= 1.05} for clock in ("wall", "cpu")]
    rows += [
            {"name": "(b) SRD-DAT/TRADES grad evals", "value": b["grad_evals_ratio"],
             "target": 0.7, "ok": b["grad_evals_ratio"] <= 0.7},
            {"name": "(b) SRD-DAT/TRADES wall-clock", "value": b["wall_clock_ratio"],
             "target": 0.7, "ok": b["wall_clock_ratio"] <= 0.7},
            {"name": "(b) SRD-DAT/TRADES CPU time", "value": b["cpu_time_ratio"],
             "target": 0.7, "ok": b["cpu_time_ratio"] <= 0.7},
            {"name": "    attack steps only", "value": b["attack_steps_ratio"]}]
    for phase, p in b["phases"].items():
        rows.append({"name": f"    {phase} epochs {p['epochs']} grad evals",
                     "value": p["grad_evals_ratio"]})
        rows.append({"name": f"    {phase} wall-clock", "value": p["wall_clock_ratio"]})
        rows.append({"name": f"    {phase} CPU time", "value": p["cpu_time_ratio"]})
    print(f"device {result['device']} ({result['device_name']}), {result['threads']} threads")
    print_table(rows)
    for name in ("trades", "srd_dat"):
        f = b[name]["final"]
        print(f"{name}: clean {f['eval/clean']:.3f}, PGD-20 {f['eval/pgd20']:.3f} (test sample)")
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
