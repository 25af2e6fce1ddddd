"""Cost of the gradient regularisers, SNS and the sensitivity probe (issue #12 §5, `make bench`).

Every ratio compares contenders measured in the same process, timed round-robin:

1. One optimisation step (``zero_grad``, objective forward, ``backward``, SGD step) of ``sagr``,
   ``jr`` and ``igr`` / one ``natural`` step: time and peak memory (targets: SAGR <= 3.5x time,
   <= 3x memory; JR and IGR reported; ``sagr_plain``, SAGR with PyTorch's own double
   backward as before issue #21, gives the before/after in the same run). A breakdown splits
   SAGR's step into building its loss (forward + the two create_graph input-gradient
   products) and the parameter backward.
2. One ``sns`` step / one ``pgd_at`` step with the same attack (PGD-10, alpha = eps/4; without
   --quick also the MNIST configs' PGD-40, alpha 0.01) (target <= 1.1x time; memory reported).
3. The sensitivity probe ``robustkit train`` adds by default (``SensitivityCallback`` built by
   the CLI's own ``_sensitivity``: the first 256 held-out images, PGD-10 alpha = eps/4, last
   iterate, every conv/linear layer, probe batch 128) / one MNIST training epoch, natural and
   PGD-AT. The epoch is extrapolated: 461 steps (59,000 training images at batch 128) x the
   measured step; the trainer's own bookkeeping per step is not included.

SmallCNN on the shipped MNIST sample at batch 128 with the MNIST configs' hyper-parameters.
Without --quick, also PreActResNet-18 on CIFAR-10-sized inputs (the shipped sample) at batch 32
for sections 1 and 2 (--no-cifar skips it; slow on a CPU).

Time: median over repeats of the paired ratio (one repeat = one call of every contender), after
a warm-up call of each; on CPU the clock is the process's CPU time (``_common.time_paired``).

Peak memory of a step: the peak, during the step, of allocated tensor bytes above the level at
its start. Gradients are freed before the step (``set_to_none``), so they count; parameters,
optimizer state and the batch do not. On CUDA ``torch.cuda.max_memory_allocated``; on CPU the
profiler's allocator events, at operator granularity (a temporary allocated and freed inside one
aten operator is not seen). On Linux CPUs also the growth of the resident set over the step
(``VmHWM`` after ``malloc_trim`` and a ``clear_refs`` reset) as a second opinion that includes
allocator caching and oneDNN scratch buffers.

Usage: python benchmarks/bench_regularisers.py [--quick] [--device cpu|cuda] [--no-cifar]
Writes bench_results/bench_regularisers.json.
"""

from __future__ import annotations

import os

os.environ.setdefault("KINETO_LOG_LEVEL", "5")  # the CPU profiler's start-up chatter (memory)

import argparse  # noqa: E402
import logging  # noqa: E402
import math  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import (  # noqa: E402
    RESULTS,
    cpu_tensor_peak,
    cuda_peak,
    device_info,
    median,
    paired_ratio,
    print_table,
    ratio,
    rss_growth,
    summary,
    time_paired,
    write_json,
)

from robustkit.data import DATASETS, build_loaders, load_dataset  # noqa: E402
from robustkit.models import create_model  # noqa: E402
from robustkit.objectives import TrainContext, create_objective  # noqa: E402
from robustkit.utils import resolve_device  # noqa: E402

log = logging.getLogger("bench_regularisers")

MNIST_EPOCH_STEPS = math.ceil((60_000 - 1_000) / 128)  # 461: full MNIST, 1,000 held out
TARGETS = {"sagr_time": 3.5, "sagr_memory": 3.0, "sns_time": 1.1}
MNIST_EPS = 0.3
# The MNIST configs' hyper-parameters (configs/train/mnist_*.yaml); "_"-suffixed names are
# variants reported for information (without --quick).
MNIST_REGULARISERS = {
    "natural": ("natural", {}),
    "sagr": ("sagr", {"lam": 1.0, "false_classes": "aggregate", "grad_of": "logit"}),
    "jr": ("jr", {"lam": 0.01, "n_proj": 1}),
    "igr": ("igr", {"lam": 1.0, "method": "double_backprop"}),
}
# SAGR with PyTorch's own double backward (the pre-#21 implementation): before/after in one run
# (``Step`` sets the objective's ``fast_conv`` attribute from the "_fast_conv" key)
SAGR_PLAIN = ("sagr", {"lam": 1.0, "false_classes": "aggregate", "grad_of": "logit",
                       "_fast_conv": False})
MNIST_VARIANTS = {
    "sagr_topM": ("sagr", {"lam": 1.0, "false_classes": "topM", "top_m": 2}),
    "igr_fd": ("igr", {"lam": 1.0, "method": "finite_difference", "h": 0.01}),
}
# configs/train/cifar10_*.yaml (IGR there is Finlay & Oberman's finite difference)
CIFAR_REGULARISERS = {
    "natural": ("natural", {}),
    "sagr": ("sagr", {"lam": 1.0, "false_classes": "aggregate", "grad_of": "logit"}),
    "jr": ("jr", {"lam": 0.01, "n_proj": 1}),
    "igr": ("igr", {"lam": 0.05, "method": "finite_difference", "h": 0.01}),
    "igr_db": ("igr", {"lam": 0.05, "method": "double_backprop"}),
    "sagr_plain": SAGR_PLAIN,
}


# ------------------------------------------------------------------ contenders
class Step:
    """One optimisation step of an objective on a fixed batch, as ``Trainer._train_step`` does
    it (zero_grad with ``set_to_none``, objective, backward, SGD step, ``after_step``), without
    the trainer's finiteness check and metric bookkeeping (the same for every objective)."""

    def __init__(self, name: str, hparams: dict, make_model: Callable[[], torch.nn.Module],
                 x: torch.Tensor, y: torch.Tensor) -> None:
        self.model = make_model().train()
        hparams = dict(hparams)
        fast_conv = hparams.pop("_fast_conv", None)
        self.objective = create_objective(name, self.model, **hparams)
        if fast_conv is not None:
            self.objective.fast_conv = fast_conv
        self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = x, y
        self.ctx = TrainContext(epoch=0, epochs=1, step=0)

    def zero(self) -> None:
        self.opt.zero_grad(set_to_none=True)

    def __call__(self) -> None:
        self.opt.zero_grad(set_to_none=True)
        out = self.objective(self.x, self.y, self.ctx)
        out.loss.backward()
        self.opt.step()
        self.objective.after_step()

    def loss_only(self) -> None:
        """The objective's loss with its graph, dropped without a backward (breakdown)."""
        self.objective(self.x, self.y, self.ctx).loss.detach()


def memory(steps: dict[str, Step], extra: dict[str, Callable[[], object]],
           device: torch.device, repeats: int) -> dict[str, dict]:
    """``{name: {"tensor_bytes": .., "rss_bytes": .. (CPU, Linux)}}``, medians over ``repeats``;
    every step has run before (warm-up), so optimizer state and lazy set-up are excluded."""
    fns = {**steps, **extra}
    out: dict[str, dict] = {}
    for name, fn in fns.items():
        owner = steps.get(name) or steps.get(name.split(":")[0])
        tensor, rss = [], []
        for _ in range(repeats):
            if owner is not None:
                owner.zero()  # the previous step's gradients are not part of this one
            if device.type == "cuda":
                tensor.append(cuda_peak(fn, device))
            else:
                tensor.append(cpu_tensor_peak(fn))
                if owner is not None:
                    owner.zero()
                r = rss_growth(fn)
                if r is not None:
                    rss.append(r)
        out[name] = {"tensor_bytes": int(median(tensor))}
        if rss:
            out[name]["rss_bytes"] = int(median(rss))
    return out


# ------------------------------------------------------------------ sections
def _paired(times: dict[str, list[float]], fn: Callable[[dict[str, float]], float]) -> float:
    """Median over repeats of ``fn`` applied to one repeat's times (a difference of two
    medians taken over different repeats would mix unrelated load)."""
    n = len(next(iter(times.values())))
    return statistics.median(fn({k: v[i] for k, v in times.items()}) for i in range(n))


def _mem_ratio(mem: dict, num: str, den: str, key: str = "tensor_bytes") -> float | None:
    if key not in mem[num] or key not in mem[den] or mem[den][key] <= 0:
        return None
    return mem[num][key] / mem[den][key]


def _mnist_model(device: torch.device) -> Callable[[], torch.nn.Module]:
    info = DATASETS["sample-mnist"]

    def make() -> torch.nn.Module:
        torch.manual_seed(0)  # the same initial weights for every contender
        return create_model("small_cnn", info.num_classes, info.mean, info.std, in_channels=1,
                            input_size=28).to(device)
    return make


def _cifar_model(device: torch.device) -> Callable[[], torch.nn.Module]:
    info = DATASETS["cifar10"]

    def make() -> torch.nn.Module:
        torch.manual_seed(0)
        return create_model("preact_resnet18", info.num_classes, info.mean, info.std,
                            in_channels=3, input_size=32).to(device)
    return make


def _batch(name: str, n: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The first ``n`` training images of a shipped sample, in [0, 1]."""
    ds = load_dataset(name, "train")
    return (ds.x[:n].float() / 255).to(device), ds.y[:n].long().to(device)


def probe_callback(model: torch.nn.Module):
    """The ``SensitivityCallback`` that ``robustkit train`` builds for an MNIST run with the
    default ``sensitivity`` section (n 256, PGD-10, alpha eps/4, layers auto, holdout batch 128),
    built by the CLI's own wiring so that the two cannot drift apart."""
    from robustkit.config import build_config
    from robustkit.config.callbacks import _sensitivity

    cfg = build_config({"data": {"name": "sample-mnist", "batch_size": 128, "holdout": 1000,
                                 "augment": False},
                        "model": {"name": "small_cnn"}}, name="bench_regularisers")
    loaders = build_loaders("sample-mnist", batch_size=128, holdout=1000, augment=False)
    callbacks = _sensitivity(cfg, loaders, DATASETS["sample-mnist"], model)
    if len(callbacks) != 1:
        raise RuntimeError(f"the CLI built {len(callbacks)} sensitivity callbacks, expected 1")
    return callbacks[0], cfg.sensitivity


def run_section(label: str, steps: dict[str, Step], extra: dict[str, Callable[[], object]],
                device: torch.device, repeats: int, mem_repeats: int) -> tuple[dict, dict, dict]:
    t0 = time.perf_counter()
    times = time_paired({**steps, **extra}, device, repeats)
    mem = memory(steps, {k: v for k, v in extra.items() if k.endswith(":loss")}, device,
                 mem_repeats)
    log.info("%s measured in %.0f s", label, time.perf_counter() - t0)
    return times, mem, summary(times)


def regularisers(label: str, specs: dict, pgd: dict[str, dict], make_model, x, y,
                 device: torch.device, repeats: int, mem_repeats: int, rows: list[dict],
                 probe=None) -> dict:
    """Sections 1-2 (and 3 when ``probe`` is given) on one model and batch."""
    steps = {name: Step(obj, hp, make_model, x, y) for name, (obj, hp) in specs.items()}
    for tag, hp in pgd.items():
        steps[f"pgd_at{tag}"] = Step("pgd_at", hp, make_model, x, y)
        steps[f"sns{tag}"] = Step("sns", {**hp, "lam": 1.0, "ratio": 0.1, "distance": "l1",
                                          "topk": "online", "base": "pgd_at"},
                                  make_model, x, y)
    extra: dict[str, Callable[[], object]] = {"sagr:loss": steps["sagr"].loss_only}
    if probe is not None:
        extra["probe"] = lambda: probe.measure(steps["natural"].model, device)
    times, mem, seconds = run_section(label, steps, extra, device, repeats, mem_repeats)
    out: dict = {"batch": len(y), "repeats": repeats, "seconds": seconds, "memory": mem,
                 "hparams": {k: {"objective": o, **h} for k, (o, h) in specs.items()},
                 "attacks": pgd, "time_ratio": {}, "time_ratio_of_minima": {},
                 "memory_ratio": {}, "rss_ratio": {}}

    def add(key: str, num: str, den: str, target: float | None = None,
            mem_target: float | None = None, what: str = "") -> None:
        r, m, rss = (paired_ratio(times, num, den), _mem_ratio(mem, num, den),
                     _mem_ratio(mem, num, den, "rss_bytes"))
        out["time_ratio"][key], out["time_ratio_of_minima"][key] = r, ratio(times, num, den)
        out["memory_ratio"][key], out["rss_ratio"][key] = m, rss
        rows.append({"name": f"{label} {what} time", "value": r, "target": target,
                     "ok": None if target is None else r <= target})
        if m is not None:
            note = "" if rss is None else f"(resident set {rss:.2f}x)"
            rows.append({"name": f"{label} {what} peak memory", "value": m,
                         "target": mem_target, "ok": None if mem_target is None else
                         m <= mem_target, "note": note})

    for name in specs:
        if name == "natural":
            continue
        sagr = name == "sagr"
        add(f"{name}/natural", name, "natural", TARGETS["sagr_time"] if sagr else None,
            TARGETS["sagr_memory"] if sagr else None, f"{name.upper()} / natural step")
    if "sagr_plain" in specs:  # issue #21: the same loss and gradients, other kernels
        add("sagr/sagr_plain", "sagr", "sagr_plain", None, None,
            "SAGR / SAGR with PyTorch's own double backward (pre-#21)")
    # Where SAGR's step goes: building the loss (forward + 2 create_graph VJPs) vs the rest
    # (parameter backward through both second-order graphs + SGD step), in natural steps.
    loss_build = _paired(times, lambda t: t["sagr:loss"] / t["natural"])
    backward = _paired(times, lambda t: (t["sagr"] - t["sagr:loss"]) / t["natural"])
    out["sagr_breakdown"] = {"loss_build_natural_steps": loss_build,
                             "backward_and_step_natural_steps": backward,
                             "loss_build_memory_ratio": _mem_ratio(mem, "sagr:loss",
                                                                   "natural")}
    rows.append({"name": f"{label}   SAGR loss build (fwd + 2 VJPs) / natural step",
                 "value": loss_build})
    rows.append({"name": f"{label}   SAGR backward + step / natural step", "value": backward})
    for tag, hp in pgd.items():
        what = f"SNS / PGD-AT step (PGD-{hp['steps']}, a={hp['alpha']:.4g})"
        add(f"sns{tag}/pgd_at{tag}", f"sns{tag}", f"pgd_at{tag}", TARGETS["sns_time"], None, what)
        extra = _paired(times, lambda t, tag=tag: (t[f"sns{tag}"] - t[f"pgd_at{tag}"])
                        / t["natural"])
        out.setdefault("sns_extra_natural_steps", {})[tag or "default"] = extra
        rows.append({"name": f"{label}   SNS - PGD-AT (PGD-{hp['steps']}) / natural step",
                     "value": extra})
    if probe is not None:
        out["probe"] = {"epoch_steps": MNIST_EPOCH_STEPS, "epoch": "extrapolated",
                        "ratio": {}}
        for name in ["natural", *(f"pgd_at{tag}" for tag in pgd)]:
            r = _paired(times, lambda t, name=name: t["probe"] / (MNIST_EPOCH_STEPS * t[name]))
            out["probe"]["ratio"][name] = r
            what = "natural" if name == "natural" else \
                f"PGD-AT (PGD-{pgd[name.removeprefix('pgd_at')]['steps']})"
            rows.append({"name": f"{label} sensitivity probe / {what} epoch "
                                 f"({MNIST_EPOCH_STEPS} steps, extrapolated)",
                         "value": r, "note": f"probe {median(times['probe']):.2f} s"})
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="MNIST only, PGD-10 only, 3 repeats: under a minute on one CPU thread")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: CPU time is then a stable clock on a "
                        "shared machine)")
    p.add_argument("--repeats", type=int, default=None,
                   help="round-robin repeats (default 7; 3 with --quick)")
    p.add_argument("--no-cifar", action="store_true",
                   help="skip PreActResNet-18 (always skipped with --quick)")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_regularisers.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("robustkit").setLevel(logging.WARNING)
    start = time.perf_counter()
    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # the same for every contender
    else:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 7)
    mem_repeats = 1 if args.quick else 3
    out: dict = {"bench": "regularisers", "quick": args.quick, "info": device_info(device),
                 "repeats": repeats, "targets": TARGETS}
    print(f"device {out['info']['device_name']} ({device}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, repeats {repeats}", flush=True)
    rows: list[dict] = []

    # MNIST: SmallCNN, batch 128
    make = _mnist_model(device)
    x, y = _batch("sample-mnist", 128, device)
    pgd = {"": {"eps": MNIST_EPS, "alpha": MNIST_EPS / 4, "steps": 10}}
    specs = dict(MNIST_REGULARISERS, sagr_plain=SAGR_PLAIN)
    if not args.quick:
        pgd["_40"] = {"eps": MNIST_EPS, "alpha": 0.01, "steps": 40}  # configs/train/mnist_*
        specs.update(MNIST_VARIANTS)
    callback, settings = probe_callback(make())
    out["mnist"] = regularisers("[mnist]", specs, pgd, make, x, y, device, repeats,
                                mem_repeats, rows, probe=callback)
    out["mnist"]["probe"]["settings"] = {"n": settings.n, "steps": settings.steps,
                                         "layers": callback.layers,
                                         "batch_size": callback.batch_size,
                                         "alpha": "eps/4", "eps": MNIST_EPS}

    # CIFAR-10 sizes: PreActResNet-18, batch 32 (BatchNorm: the double backward goes through it)
    if not (args.quick or args.no_cifar):
        xc, yc = _batch("sample-cifar10", 32, device)
        out["cifar"] = regularisers(
            "[cifar]", CIFAR_REGULARISERS,
            {"": {"eps": 8 / 255, "alpha": 2 / 255, "steps": 10}},
            _cifar_model(device), xc, yc, device, max(3, repeats // 2),
            max(1, mem_repeats // 2), rows)

    out["rows"] = rows
    out["checks"] = {r["name"].strip(): {"value": r["value"], "target": r["target"],
                                         "passed": r["ok"]}
                     for r in rows if r.get("target") is not None}
    out["passed"] = all(c["passed"] for c in out["checks"].values())
    out["wall_seconds"] = time.perf_counter() - start
    write_json(args.out, out)
    print_table(rows)
    print(f"wrote {args.out} ({out['wall_seconds']:.0f} s)")
    return out


if __name__ == "__main__":
    main()
