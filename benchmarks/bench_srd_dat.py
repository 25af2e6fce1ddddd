"""Where SRD-DAT's cost goes, against TRADES, on MNIST with the MNIST configs (issue #21).

Both objectives are built with the hyper-parameters of ``configs/train/mnist_srd_dat.yaml`` and
``configs/train/mnist_trades.yaml`` (eps 0.3, K = 40 steps of 0.01, beta 1; SRD-DAT's budgets in
[0.15, 0.3], step eps_i/30, FAT early stopping with tau 0 / 1 / 2). One training step is split:

- ``module_a``: SRD-DAT's eval-mode clean pass and budgets (``perturb`` minus its attack);
- ``attack``: the PGD (TRADES: its own clean pass + K steps; SRD-DAT: the early-stopped,
  per-sample PGD on the samples still active), with the real gradient evaluations per sample;
- ``loss``: the two train-mode forwards (x and x') and the loss;
- ``backward``: ``loss.backward()`` and the SGD step.

Profile (section 1): the same batches, steps of the two objectives alternating (ABAB), CPU time
of this process (``time.process_time``, one thread), for three model states and the three tau
phases of SRD-DAT's schedule: ``init`` (fresh weights: early training), ``trained`` (after the
accuracy check's epoch, if run) and ``robust`` (the shipped PGD-AT SmallCNN, 95.8 % held-out
PGD: late training). The cost of a whole run is extrapolated from the phases' lengths (tau 0
for 40 % of the epochs, 1 for 35 %, 2 for 25 %), once with the early model and once with the
robust one: the two bracket a real run, which moves from one to the other.

Accuracy check (section 2, skipped with --no-train): one epoch of each objective on the same
``--train-images`` images (default: the 6,000 shipped MNIST training images), the same initial
weights, then clean and PGD-20 (eps 0.3, alpha 0.01... eps/4 as ``robustkit evaluate``) accuracy
on the first ``--test-images`` shipped test images; time per epoch of each.

Usage: python benchmarks/bench_srd_dat.py [--quick] [--no-train] [--steps N]
Writes bench_results/bench_srd_dat.json.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, device_info, write_json  # noqa: E402

from robustkit.attacks.pgd import PGD  # noqa: E402
from robustkit.data import DATASETS, load_dataset  # noqa: E402
from robustkit.models import create_model  # noqa: E402
from robustkit.objectives import TrainContext, create_objective  # noqa: E402

log = logging.getLogger("bench_srd_dat")

EPS = 0.3
K = 40
TRADES = {"beta": 1.0, "eps": EPS, "alpha": 0.01, "steps": K}  # configs/train/mnist_trades.yaml
SRD = {"eps_hi": EPS, "eps_lo": EPS / 2, "q": 1.0, "lambda_gap": 0.7, "step_ratio": 1 / 30,
       "k_max": K, "tau_schedule": ((0.4, 0), (0.75, 1), (1.0, 2)), "inner_loss": "kl",
       "misclassified": "clean", "beta": 1.0, "gamma_max": 1.0, "gamma_ramp": (0.3, 0.6),
       "omega_max": 5.0, "eta0": 1 / 16}  # configs/train/mnist_srd_dat.yaml
# (epoch, epochs) of TrainContext that put SRD-DAT in each tau phase, and the phase's share of
# a run (tau 0 up to 0.4 T, 1 up to 0.75 T, 2 after; gamma_t is 0 / ramping / 1 there)
PHASES = {"tau=0": ((10, 100), 0.40), "tau=1": ((50, 100), 0.35), "tau=2": ((90, 100), 0.25)}
PARTS = ("module_a", "attack", "loss", "backward")
INFO = DATASETS["sample-mnist"]


def fresh_model(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model("small_cnn", INFO.num_classes, INFO.mean, INFO.std, in_channels=1,
                        input_size=28)


def robust_model() -> torch.nn.Module:
    from robustkit.models.pretrained import load_pretrained

    return load_pretrained("mnist_smallcnn_robust")


class Stepper:
    """One objective on its own copy of a model, with an SGD optimiser (the configs' lr 0.01,
    momentum 0.9); ``step`` runs one training step and returns its parts' CPU seconds."""

    def __init__(self, name: str, model: torch.nn.Module) -> None:
        self.name = name
        self.model = copy.deepcopy(model).train()
        self.objective = create_objective(name, self.model, **(TRADES if name == "trades"
                                                                else SRD))
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self._attack_seconds = 0.0
        attack = self.objective.attack
        inner = attack.perturb

        def timed_perturb(*args, **kwargs):
            t0 = time.process_time()
            try:
                return inner(*args, **kwargs)
            finally:
                self._attack_seconds += time.process_time() - t0
        attack.perturb = timed_perturb

    def step(self, x, y, ctx: TrainContext) -> dict[str, float]:
        self.opt.zero_grad(set_to_none=True)
        self._attack_seconds = 0.0
        t0 = time.process_time()
        adv = self.objective.perturb(x, y, ctx)
        t1 = time.process_time()
        out = self.objective.loss(x, y, adv, ctx)
        t2 = time.process_time()
        out.loss.backward()
        self.opt.step()
        t3 = time.process_time()
        steps = adv.info["steps_used"].float()
        return {"module_a": (t1 - t0) - self._attack_seconds, "attack": self._attack_seconds,
                "loss": t2 - t1, "backward": t3 - t2, "total": t3 - t0,
                "steps_per_sample": float(steps.mean()),
                "frac_attacked": float((adv.info["eps"] > 0).float().mean()),
                "frac_stopped": float(adv.info["stopped"].float().mean())}


def profile(state: str, model: torch.nn.Module, batches, phase_ctx: tuple[int, int]) -> dict:
    """ABAB steps of TRADES and SRD-DAT on ``batches`` from the same weights."""
    runs = {name: Stepper(name, model) for name in ("trades", "srd_dat")}
    epoch, epochs = phase_ctx
    rec: dict[str, list[dict]] = {name: [] for name in runs}
    for i, (x, y) in enumerate(batches):
        ctx = TrainContext(epoch=epoch, epochs=epochs, step=i)
        for name, run in runs.items():
            rec[name].append(run.step(x, y, ctx))
    out: dict = {"state": state, "epoch": epoch, "epochs": epochs, "steps": len(batches)}
    for name, rows in rec.items():
        out[name] = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        out[name]["steps_per_sample_mean"] = statistics.fmean(r["steps_per_sample"]
                                                             for r in rows)
    out["ratio_total"] = statistics.median(s["total"] / t["total"] for s, t in
                                           zip(rec["srd_dat"], rec["trades"], strict=True))
    # cost model: one gradient evaluation on the whole batch = the attack's cost per step
    t = out["trades"]
    unit = t["attack"] / (K + 1 / 3)  # TRADES' attack: its clean forward (~1/3) + K steps
    out["trades_units"] = {p: out["trades"][p] / unit for p in PARTS}
    out["srd_units"] = {p: out["srd_dat"][p] / unit for p in PARTS}
    return out


def extrapolate(rows: dict[str, dict]) -> dict:
    """Whole-run ratio from the per-phase step ratios weighted by the phases' lengths."""
    srd = sum(PHASES[p][1] * r["srd_dat"]["total"] for p, r in rows.items())
    trades = sum(PHASES[p][1] * r["trades"]["total"] for p, r in rows.items())
    steps = sum(PHASES[p][1] * r["srd_dat"]["steps_per_sample_mean"] for p, r in rows.items())
    return {"ratio": srd / trades, "srd_steps_per_sample": steps}


def accuracy_check(train_x, train_y, test_x, test_y, batch: int) -> dict:
    """One epoch of each objective from the same weights, then clean and PGD-20 accuracy."""
    out: dict = {"train_images": len(train_y), "test_images": len(test_y), "epochs": 1}
    g = torch.Generator().manual_seed(0)
    order = torch.randperm(len(train_y), generator=g)
    models = {}
    for name in ("trades", "srd_dat"):
        run = Stepper(name, fresh_model())
        t0, steps = time.process_time(), []
        for i in range(0, len(order), batch):
            idx = order[i:i + batch]
            ctx = TrainContext(epoch=0, epochs=1, step=i // batch, idx=idx)
            steps.append(run.step(train_x[idx], train_y[idx], ctx)["steps_per_sample"])
        out[name] = {"epoch_cpu_seconds": time.process_time() - t0,
                     "steps_per_sample": statistics.fmean(steps)}
        models[name] = run.model.eval()
        log.info("%s: one epoch in %.0f s CPU", name, out[name]["epoch_cpu_seconds"])
    for name, model in models.items():
        attack = PGD(model, eps=EPS, alpha=EPS / 4, steps=20)
        clean = robust = 0
        for i in range(0, len(test_y), 250):
            x, y = test_x[i:i + 250], test_y[i:i + 250]
            with torch.no_grad():
                clean += int((model(x).argmax(1) == y).sum())
            x_adv = attack(x, y)
            with torch.no_grad():
                robust += int((model(x_adv).argmax(1) == y).sum())
        out[name].update(clean=clean / len(test_y), pgd20=robust / len(test_y))
    out["epoch_ratio"] = out["srd_dat"]["epoch_cpu_seconds"] / out["trades"]["epoch_cpu_seconds"]
    return out, models


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="4 profile steps per phase and state, no accuracy check")
    p.add_argument("--steps", type=int, default=None,
                   help="profile steps per (state, phase) (default 12; 4 with --quick)")
    p.add_argument("--no-train", action="store_true", help="skip the accuracy check")
    p.add_argument("--train-images", type=int, default=6000)
    p.add_argument("--test-images", type=int, default=500)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", type=Path, default=RESULTS / "bench_srd_dat.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("robustkit").setLevel(logging.WARNING)
    torch.set_num_threads(args.threads)
    device = torch.device("cpu")
    steps = args.steps or (4 if args.quick else 12)
    start = time.perf_counter()
    train = load_dataset("sample-mnist", "train")
    test = load_dataset("sample-mnist", "test")
    tx, ty = train.x.float() / 255, train.y.long()
    batches = [(tx[i * 128:(i + 1) * 128], ty[i * 128:(i + 1) * 128]) for i in range(steps)]
    out: dict = {"bench": "srd_dat", "quick": args.quick, "info": device_info(device),
                 "hparams": {"trades": TRADES, "srd_dat": {**SRD, "tau_schedule": [
                     list(v) for v in SRD["tau_schedule"]]}},
                 "phases": {k: {"epoch": v[0][0], "epochs": v[0][1], "share": v[1]}
                            for k, v in PHASES.items()}, "profile": {}}
    states = {"init": fresh_model(), "robust": robust_model()}
    if not (args.quick or args.no_train):
        check, models = accuracy_check(tx[:args.train_images], ty[:args.train_images],
                                       test.x[:args.test_images].float() / 255,
                                       test.y[:args.test_images].long(), 128)
        out["accuracy_check"] = check
        states["trained"] = models["trades"]  # one TRADES epoch: an early-middle model
    for state, model in states.items():
        rows = {}
        for phase, (ctx, _) in PHASES.items():
            rows[phase] = profile(state, model, batches, ctx)
            r = rows[phase]
            log.info("%-8s %s: SRD-DAT/TRADES step %.3f, SRD-DAT steps/sample %.1f of %d "
                     "(attacked %.2f), parts in gradient evaluations: SRD %s | TRADES %s",
                     state, phase, r["ratio_total"], r["srd_dat"]["steps_per_sample_mean"], K,
                     r["srd_dat"]["frac_attacked"],
                     {k: round(v, 2) for k, v in r["srd_units"].items()},
                     {k: round(v, 2) for k, v in r["trades_units"].items()})
        out["profile"][state] = {"phases": rows, "whole_run": extrapolate(rows)}
        log.info("%-8s whole run (phases weighted): SRD-DAT/TRADES %.3f, %.1f steps/sample",
                 state, out["profile"][state]["whole_run"]["ratio"],
                 out["profile"][state]["whole_run"]["srd_steps_per_sample"])
    if "accuracy_check" in out:
        c = out["accuracy_check"]
        for name in ("trades", "srd_dat"):
            log.info("%s: 1 epoch on %d images: %.0f s CPU, %.1f steps/sample; clean %.3f, "
                     "PGD-20 %.3f on %d test images", name, c["train_images"],
                     c[name]["epoch_cpu_seconds"], c[name]["steps_per_sample"], c[name]["clean"],
                     c[name]["pgd20"], c["test_images"])
        log.info("epoch CPU time SRD-DAT/TRADES %.3f", c["epoch_ratio"])
    out["target"] = 0.7
    out["wall_seconds"] = time.perf_counter() - start
    write_json(args.out, out)
    log.info("wrote %s (%.0f s)", args.out, out["wall_seconds"])
    return out


if __name__ == "__main__":
    main()
