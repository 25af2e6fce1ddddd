"""Speed map: what the usual levers do to attacks and training here (issue #21, `make bench`).

Levers, each against eager float32 in the same process (ratios < 1 are faster):

- ``compile``: ``torch.compile(model)`` (inductor, default mode);
- ``compile_max_autotune``: ``torch.compile(model, mode="max-autotune-no-cudagraphs")``;
- ``channels_last``: the model and the inputs in ``torch.channels_last`` memory format.

Workloads: PGD-10 (L∞, no random start) on the shipped-architecture SmallCNN (MNIST sample,
batch 128, eps 0.3, alpha eps/4); PGD-10 on the CIFAR ResNet-18 (batch 16, 8/255, 2/255; not with
--quick); one PGD-AT training step on the SmallCNN (PGD-10, CE on x', backward, SGD step).

Timing: after the warm-up (the first call, which holds compilation; reported apart as
``warmup_seconds``), ``--repeats`` rounds in which every variant runs once in turn (ABAB...), so
load drift on a shared machine hits them alike; ratio = median over rounds of the paired ratio to
eager. Clock: wall time (``perf_counter``), and the process's CPU time alongside (with one thread
the CPU time is the load-robust clock and is the one the ratio uses). Each thread count runs in
its own process (compiled CPU kernels fix their thread count when generated).

Agreement: on a fixed batch, each variant's logits and input gradient of the summed CE are
compared with eager's (largest absolute difference over the largest absolute value; tolerance
1e-4); the PGD-10 iterates' agreement is reported too (sign steps can flip on a rounding
difference, so it is not a pass/fail check).

Usage: python benchmarks/bench_speedmap.py [--quick] [--threads 1 2] [--repeats N]
Writes bench_results/bench_speedmap.json.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, device_info, write_json  # noqa: E402

from robustkit.attacks.pgd import PGD  # noqa: E402
from robustkit.data import DATASETS, load_dataset  # noqa: E402
from robustkit.models import create_model  # noqa: E402

log = logging.getLogger("bench_speedmap")

VARIANTS = ("eager", "compile", "compile_max_autotune", "channels_last")
TOLERANCE = 1e-4
WORKLOADS = {
    # name: (model, dataset, batch, eps, alpha, kind)
    "pgd10_smallcnn": ("small_cnn", "sample-mnist", 128, 0.3, 0.075, "attack"),
    "pgd10_resnet18": ("resnet18", "sample-cifar10", 16, 8 / 255, 2 / 255, "attack"),
    "pgd_at_step_smallcnn": ("small_cnn", "sample-mnist", 128, 0.3, 0.075, "train"),
}
QUICK = ("pgd10_smallcnn", "pgd_at_step_smallcnn")


def make_model(arch: str, dataset: str) -> torch.nn.Module:
    """The SmallCNN with the shipped standard MNIST weights (a fresh one has a zero last layer,
    so its logits and input gradients would agree with anything); others freshly initialised."""
    if arch == "small_cnn":
        from robustkit.models.pretrained import load_pretrained

        return load_pretrained("mnist_smallcnn_standard")
    info = DATASETS[dataset]
    torch.manual_seed(0)
    size = 28 if "mnist" in dataset else 32
    return create_model(arch, info.num_classes, info.mean, info.std,
                        in_channels=1 if "mnist" in dataset else 3, input_size=size)


def batch(dataset: str, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    ds = load_dataset(dataset, "train")
    return ds.x[:n].float() / 255, ds.y[:n].long()


def variant_model(model: torch.nn.Module, variant: str) -> torch.nn.Module:
    """The lever applied to a copy of ``model`` (eager and channels_last stay nn.Modules)."""
    m = copy.deepcopy(model)
    if variant == "channels_last":
        return m.to(memory_format=torch.channels_last)
    if variant == "compile":
        return torch.compile(m)
    if variant == "compile_max_autotune":
        return torch.compile(m, mode="max-autotune-no-cudagraphs")
    return m


def variant_input(x: torch.Tensor, variant: str) -> torch.Tensor:
    return x.contiguous(memory_format=torch.channels_last) if variant == "channels_last" else x


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """``max|a - b| / max|b|`` (0 when both are 0)."""
    scale = float(b.abs().max())
    return float((a - b).abs().max()) / scale if scale > 0 else float((a - b).abs().max())


def logits_and_grad(model: torch.nn.Module, x: torch.Tensor,
                    y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    xx = x.detach().clone().requires_grad_(True)
    z = model(xx)
    (g,) = torch.autograd.grad(F.cross_entropy(z, y, reduction="sum"), xx)
    return z.detach(), g.detach()


class Workload:
    """One workload's callable for one variant."""

    def __init__(self, name: str, variant: str, base: torch.nn.Module, x, y) -> None:
        _, _, _, eps, alpha, kind = WORKLOADS[name]
        self.kind, self.variant = kind, variant
        self.model = variant_model(base, variant)
        self.model.train(kind == "train")
        self.x, self.y = variant_input(x, variant), y
        self.attack = PGD(self.model, eps=eps, alpha=alpha, steps=10, random_start=False,
                          select="last")
        if kind == "train":
            self.opt = torch.optim.SGD(self.model.parameters(), lr=0.01, momentum=0.9)

    def __call__(self) -> None:
        x_adv = self.attack(self.x, self.y)
        if self.kind == "train":
            self.opt.zero_grad(set_to_none=True)
            F.cross_entropy(self.model(x_adv), self.y).backward()
            self.opt.step()


def agreement(name: str, base: torch.nn.Module, x, y, variant: str) -> dict:
    """Logits, input gradient and PGD-10 iterate of ``variant`` against eager, eval mode."""
    _, _, _, eps, alpha, _ = WORKLOADS[name]
    ref_model = copy.deepcopy(base).eval()
    m = variant_model(base, variant).eval()
    xv = variant_input(x, variant)
    z0, g0 = logits_and_grad(ref_model, x, y)
    z1, g1 = logits_and_grad(m, xv, y)
    a0 = PGD(ref_model, eps=eps, alpha=alpha, steps=10, random_start=False, select="last")(x, y)
    a1 = PGD(m, eps=eps, alpha=alpha, steps=10, random_start=False, select="last")(xv, y)
    out = {"logits_rel_diff": rel_diff(z1, z0), "input_grad_rel_diff": rel_diff(g1, g0),
           "pgd_iterate_max_abs_diff": float((a1 - a0).abs().max()),
           "pgd_iterate_equal_fraction": float((a1 == a0).float().mean())}
    out["agree"] = (out["logits_rel_diff"] <= TOLERANCE
                    and out["input_grad_rel_diff"] <= TOLERANCE)
    return out


def run_workload(name: str, repeats: int) -> dict:
    arch, dataset, n, *_ = WORKLOADS[name]
    base = make_model(arch, dataset)
    x, y = batch(dataset, n)
    res: dict = {"model": arch, "dataset": dataset, "batch": n, "variants": {}}
    fns = {}
    for variant in VARIANTS:
        entry: dict = {}
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                wl = Workload(name, variant, base, x, y)
                t0, c0 = time.perf_counter(), time.process_time()
                wl()  # warm-up: compilation happens here
                entry["warmup_seconds"] = time.perf_counter() - t0
                entry["warmup_cpu_seconds"] = time.process_time() - c0
                entry["agreement"] = agreement(name, base, x, y, variant)
            fns[variant] = wl
        except Exception as exc:  # a lever that fails here is a result, not a crash
            entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
            log.warning("%s %s failed: %s", name, variant, entry["error"])
        res["variants"][variant] = entry
        log.info("%s %s warm-up %.1f s", name, variant, entry.get("warmup_seconds", float("nan")))
    wall = {v: [] for v in fns}
    cpu = {v: [] for v in fns}
    for _ in range(repeats):  # round-robin: load drift hits every variant alike
        for v, fn in fns.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall[v].append(time.perf_counter() - t0)
            cpu[v].append(time.process_time() - c0)
    one_thread = torch.get_num_threads() == 1
    for v in fns:
        e = res["variants"][v]
        e["wall_seconds"] = wall[v]
        e["cpu_seconds"] = cpu[v]
        e["wall_median"] = statistics.median(wall[v])
        if "eager" in fns:
            e["ratio_wall"] = statistics.median(a / b for a, b in zip(wall[v], wall["eager"],
                                                                       strict=True))
            e["ratio_cpu"] = statistics.median(a / b for a, b in zip(cpu[v], cpu["eager"],
                                                                     strict=True))
            e["ratio"] = e["ratio_cpu"] if one_thread else e["ratio_wall"]
    res["clock"] = "cpu" if one_thread else "wall"
    return res


def worker(threads: int, names: list[str], repeats: int) -> dict:
    torch.set_num_threads(threads)
    out = {"threads": threads, "info": device_info(torch.device("cpu")),
           "load_average_start": os.getloadavg()[0], "workloads": {}}
    for name in names:
        out["workloads"][name] = run_workload(name, repeats)
    out["load_average_end"] = os.getloadavg()[0]
    return out


def table(result: dict) -> list[str]:
    lines = [f"{'workload':<22} {'thr':>3} {'variant':<21} {'ratio':>6} {'median s':>9} "
             f"{'warm-up s':>9}  agree  load"]
    for run in result["runs"]:
        for name, w in run["workloads"].items():
            for v, e in w["variants"].items():
                if "error" in e:
                    lines.append(f"{name:<22} {run['threads']:>3} {v:<21} failed: {e['error']}")
                    continue
                ag = e["agreement"]
                lines.append(
                    f"{name:<22} {run['threads']:>3} {v:<21} {e.get('ratio', float('nan')):>6.3f} "
                    f"{e['wall_median']:>9.3f} {e['warmup_seconds']:>9.1f}  "
                    f"{'yes' if ag['agree'] else 'NO':>5}  {run['load_average_start']:.1f}")
    return lines


def summarise(result: dict) -> dict:
    """Per workload and thread count, the fastest variant and whether any lever beat eager."""
    best: dict = {}
    for run in result["runs"]:
        for name, w in run["workloads"].items():
            ratios = {v: e["ratio"] for v, e in w["variants"].items() if "ratio" in e}
            if ratios:
                fastest = min(ratios, key=ratios.get)
                best[f"{name}@{run['threads']}"] = {"fastest": fastest,
                                                    "ratio": ratios[fastest]}
    return best


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="SmallCNN workloads only (no ResNet-18), 5 repeats")
    p.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 9; 5 with --quick)")
    p.add_argument("--workloads", nargs="+", default=None, choices=sorted(WORKLOADS))
    p.add_argument("--out", type=Path, default=RESULTS / "bench_speedmap.json")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("robustkit").setLevel(logging.WARNING)
    names = args.workloads or (list(QUICK) if args.quick else list(WORKLOADS))
    repeats = args.repeats or (5 if args.quick else 9)
    if args.worker:  # one thread count in this process; the parent reads the JSON
        write_json(args.out, worker(args.threads[0], names, repeats))
        return {}
    start = time.perf_counter()
    result: dict = {"bench": "speedmap", "quick": args.quick, "repeats": repeats,
                    "variants": list(VARIANTS), "tolerance": TOLERANCE, "runs": []}
    for threads in args.threads:
        with tempfile.TemporaryDirectory() as tmp:
            part = Path(tmp) / "part.json"
            cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", "--threads",
                   str(threads), "--repeats", str(repeats), "--out", str(part),
                   "--workloads", *names]
            env = dict(os.environ, OMP_NUM_THREADS=str(threads))
            subprocess.run(cmd, check=True, env=env)
            result["runs"].append(json.loads(part.read_text()))
    result["best"] = summarise(result)
    result["all_agree"] = all(e["agreement"]["agree"] for run in result["runs"]
                              for w in run["workloads"].values()
                              for e in w["variants"].values() if "agreement" in e)
    result["wall_seconds"] = time.perf_counter() - start
    write_json(args.out, result)
    print("\n".join(table(result)))
    print(f"all variants agree with eager within {TOLERANCE:g}: {result['all_agree']}")
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
