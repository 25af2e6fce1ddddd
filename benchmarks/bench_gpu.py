"""GPU speed map in one go (issue #21): every figure the first lent GPU should give.

On a CUDA device, against eager float32 in the same process (ratio < 1 is faster):

- levers: ``bf16`` (``torch.autocast("cuda", torch.bfloat16)``), ``channels_last``,
  ``channels_last_bf16``, ``compile`` (inductor default), ``compile_reduce_overhead``
  (``mode="reduce-overhead"``: CUDA graphs), ``compile_max_autotune``
  (``mode="max-autotune-no-cudagraphs"``);
- workloads: PGD-10 and one PGD-AT step (PGD-10, CE on x', backward, SGD) on the SmallCNN
  (MNIST sizes, batch 128) and the CIFAR ResNet-18 (batch 128 and a small batch of 16);
- AutoAttack "standard" on the shipped MNIST pair (``mnist_smallcnn_standard`` and
  ``mnist_smallcnn_robust``, the first ``--aa-images`` shipped test images, eps 0.3) through
  robustkit's adapter and through ``pyautoattack`` directly: time and robust accuracy of each,
  and whether the flags agree.

Timing: the first call of each lever (compilation, CUDA-graph capture, cudnn autotuning) is
timed apart as ``warmup_seconds``; then ``--repeats`` round-robin rounds (each lever once per
round), wall time after ``torch.cuda.synchronize``, ratio = median of the paired ratios to eager.
Agreement: logits and the input gradient of the summed CE against eager float32, as a relative
max difference (and the cosine of the input gradients); tolerance 1e-4 for float32 levers,
1e-1 for bf16 ones (8-bit mantissa: 7.5 % on the SmallCNN's input gradient on a CPU).

Without a CUDA device it does nothing: it prints one line, writes ``{"skipped": true, ...}`` and
exits 0 (``make bench`` and the test suite run it that way).

Usage: python benchmarks/bench_gpu.py [--quick] [--repeats N] [--aa-images N] [--out FILE]
Writes bench_results/bench_gpu.json.
"""

from __future__ import annotations

import argparse
import copy
import logging
import statistics
import sys
import time
import warnings
from collections.abc import Callable
from contextlib import nullcontext
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, device_info, write_json  # noqa: E402

log = logging.getLogger("bench_gpu")

LEVERS = ("eager", "bf16", "channels_last", "channels_last_bf16", "compile",
          "compile_reduce_overhead", "compile_max_autotune")
TOLERANCE = {"float32": 1e-4, "bfloat16": 1e-1}  # bf16 keeps 8 bits of mantissa
# name: (architecture, dataset, batch, eps, alpha)
MODELS = {
    "smallcnn_b128": ("small_cnn", "sample-mnist", 128, 0.3, 0.075),
    "resnet18_b128": ("resnet18", "sample-cifar10", 128, 8 / 255, 2 / 255),
    "resnet18_b16": ("resnet18", "sample-cifar10", 16, 8 / 255, 2 / 255),
}
QUICK_MODELS = ("smallcnn_b128", "resnet18_b16")
WORKLOADS = ("pgd10", "pgd_at_step")


# ------------------------------------------------------------------ CPU-safe helpers
def cuda_status() -> tuple[bool, str]:
    """``(usable, reason)``: whether a CUDA device can run this benchmark, and why not."""
    if not torch.cuda.is_available():
        return False, "no CUDA device (torch.cuda.is_available() is False)"
    try:
        torch.zeros(1, device="cuda")
    except Exception as exc:  # a driver that cannot start a context
        return False, f"CUDA device present but unusable: {type(exc).__name__}: {exc}"
    return True, ""


def skipped(reason: str) -> dict:
    """The JSON written where there is no GPU."""
    return {"bench": "gpu", "skipped": True, "reason": reason, "torch": torch.__version__}


def lever_dtype(lever: str) -> str:
    return "bfloat16" if "bf16" in lever else "float32"


def lever_settings(lever: str) -> dict:
    """What a lever changes: ``memory_format``, ``autocast`` dtype, ``compile`` mode."""
    if lever not in LEVERS:
        raise ValueError(f"unknown lever {lever!r}; known: {list(LEVERS)}")
    mode = {"compile": "default", "compile_reduce_overhead": "reduce-overhead",
            "compile_max_autotune": "max-autotune-no-cudagraphs"}.get(lever)
    return {"channels_last": lever.startswith("channels_last"),
            "autocast": torch.bfloat16 if "bf16" in lever else None, "compile": mode}


def plan(quick: bool) -> list[tuple[str, str, str]]:
    """Every (model, workload, lever) the run measures, in order."""
    models = QUICK_MODELS if quick else tuple(MODELS)
    return [(m, w, lever) for m in models for w in WORKLOADS for lever in LEVERS]


def agrees(rel_logits: float, rel_grad: float, lever: str) -> bool:
    tol = TOLERANCE[lever_dtype(lever)]
    return rel_logits <= tol and rel_grad <= tol


def paired_ratios(times: dict[str, list[float]], base: str = "eager") -> dict[str, float]:
    """Median over rounds of ``times[lever][i] / times[base][i]``."""
    return {k: statistics.median(a / b for a, b in zip(v, times[base], strict=True))
            for k, v in times.items()}


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    scale = float(b.abs().max())
    diff = float((a - b).abs().max())
    return diff / scale if scale > 0 else diff


# ------------------------------------------------------------------ GPU measurements
class Lever:
    """A model copy and inputs with one lever applied; ``run(workload)`` is one call."""

    def __init__(self, lever: str, base: torch.nn.Module, x, y, eps: float, alpha: float,
                 train: bool) -> None:
        from robustkit.attacks.pgd import PGD

        s = lever_settings(lever)
        model = copy.deepcopy(base).train(train)
        if s["channels_last"]:
            model = model.to(memory_format=torch.channels_last)
            x = x.contiguous(memory_format=torch.channels_last)
        if s["compile"] is not None:
            model = torch.compile(model, mode=s["compile"])
        self.model, self.x, self.y, self.autocast = model, x, y, s["autocast"]
        self.attack = PGD(model, eps=eps, alpha=alpha, steps=10, random_start=False,
                          select="last")
        self.opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9) if train else None

    def ctx(self):
        return (torch.autocast(self.x.device.type, dtype=self.autocast)
                if self.autocast is not None else nullcontext())

    def __call__(self) -> None:
        with self.ctx():
            x_adv = self.attack(self.x, self.y)
            if self.opt is not None:
                self.opt.zero_grad(set_to_none=True)
                F.cross_entropy(self.model(x_adv), self.y).backward()
                self.opt.step()

    def logits_and_grad(self) -> tuple[torch.Tensor, torch.Tensor]:
        xx = self.x.detach().clone().requires_grad_(True)
        with self.ctx():
            z = self.model(xx)
            (g,) = torch.autograd.grad(F.cross_entropy(z.float(), self.y, reduction="sum"), xx)
        return z.detach(), g.detach()


def _sync() -> None:
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        torch.cuda.synchronize()


def _timed(fn: Callable[[], object]) -> float:
    """Wall seconds of ``fn()``, the device synchronised before and after."""
    _sync()
    t0 = time.perf_counter()
    fn()
    _sync()
    return time.perf_counter() - t0


def measure_model(name: str, repeats: int, device: torch.device,
                  levers: tuple[str, ...] = LEVERS, batch: int | None = None) -> dict:
    """Every lever on both workloads for one entry of ``MODELS`` (``batch`` overrides its batch
    size; the tests run it on a CPU with the uncompiled levers)."""
    from robustkit.data import DATASETS, load_dataset
    from robustkit.models import create_model

    arch, dataset, n, eps, alpha = MODELS[name]
    n = batch or n
    info = DATASETS[dataset]
    torch.manual_seed(0)
    mnist = "mnist" in dataset
    if arch == "small_cnn":  # trained weights: a fresh SmallCNN's last layer is zero
        from robustkit.models.pretrained import load_pretrained

        base = load_pretrained("mnist_smallcnn_standard", device=device)
    else:
        base = create_model(arch, info.num_classes, info.mean, info.std,
                            in_channels=1 if mnist else 3,
                            input_size=28 if mnist else 32).to(device)
    ds = load_dataset(dataset, "train")
    x = (ds.x[:n].float() / 255).to(device)
    y = ds.y[:n].long().to(device)
    out: dict = {"model": arch, "batch": n, "eps": eps, "alpha": alpha, "workloads": {}}
    for workload in WORKLOADS:
        train = workload == "pgd_at_step"
        fns, res = {}, {}
        ref = Lever("eager", base, x, y, eps, alpha, False).logits_and_grad()
        for lever in levers:
            entry: dict = {"dtype": lever_dtype(lever), **{
                k: str(v) for k, v in lever_settings(lever).items()}}
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    fn = Lever(lever, base, x, y, eps, alpha, train)
                    entry["warmup_seconds"] = _timed(fn)
                    fn()  # CUDA graphs record on the second call
                    z, g = Lever(lever, base, x, y, eps, alpha, False).logits_and_grad()
                entry["logits_rel_diff"] = rel_diff(z, ref[0])
                entry["input_grad_rel_diff"] = rel_diff(g, ref[1])
                entry["input_grad_cosine"] = float(F.cosine_similarity(
                    g.float().flatten(), ref[1].float().flatten(), dim=0))
                entry["agree"] = agrees(entry["logits_rel_diff"], entry["input_grad_rel_diff"],
                                        lever)
                fns[lever] = fn
            except Exception as exc:  # one failing lever is a result, not the end of the run
                entry["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:300]}"
                log.warning("%s %s %s failed: %s", name, workload, lever, entry["error"])
            res[lever] = entry
        times: dict[str, list[float]] = {k: [] for k in fns}
        for _ in range(repeats):
            for lever, fn in fns.items():
                times[lever].append(_timed(fn))
        ratios = paired_ratios(times) if "eager" in times else {}
        for lever in fns:
            res[lever].update(seconds=times[lever], median_seconds=statistics.median(
                times[lever]), ratio=ratios.get(lever))
        out["workloads"][workload] = res
        log.info("%s %s: %s", name, workload, {k: round(v, 3) for k, v in ratios.items()})
    return out


def autoattack_pair(n: int, device: torch.device) -> dict:
    """AutoAttack standard, eps 0.3, on the shipped MNIST pair: robustkit vs pyautoattack."""
    import pyautoattack

    from robustkit.attacks.autoattack import AutoAttack
    from robustkit.data import load
    from robustkit.models.pretrained import load_pretrained

    x, y = load("sample-mnist", n=n)
    x, y = x.to(device), y.to(device)
    out: dict = {"n": n, "eps": 0.3, "version": "standard"}
    for name in ("mnist_smallcnn_standard", "mnist_smallcnn_robust"):
        model = load_pretrained(name, device=device)
        ours = AutoAttack(model, eps=0.3, version="standard", batch_size=n)
        direct = pyautoattack.AutoAttack(model, norm="Linf", eps=0.3, version="standard",
                                         device=device, seed=0)
        got: dict = {}

        def run_ours(ours=ours, got=got) -> None:
            got["ours"] = ours.perturb(x, y).x_adv

        def run_direct(direct=direct, got=got) -> None:
            got["direct"] = direct.run_standard_evaluation(x, y, batch_size=n)

        t_ours, t_direct = _timed(run_ours), _timed(run_direct)
        with torch.no_grad():
            ok_ours = model(got["ours"]).argmax(1) == y
            ok_direct = model(got["direct"]).argmax(1) == y
        out[name] = {"robustkit_seconds": t_ours, "pyautoattack_seconds": t_direct,
                     "ratio": t_ours / t_direct,
                     "robust_acc_robustkit": float(ok_ours.float().mean()),
                     "robust_acc_pyautoattack": float(ok_direct.float().mean()),
                     "flags_equal": bool(torch.equal(ok_ours, ok_direct))}
        log.info("AutoAttack %s: %s", name, out[name])
    return out


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true",
                   help=f"models {list(QUICK_MODELS)} only, 5 repeats, 200 AutoAttack images")
    p.add_argument("--repeats", type=int, default=None, help="rounds (default 20; 5 --quick)")
    p.add_argument("--aa-images", type=int, default=None,
                   help="AutoAttack images of the shipped MNIST test sample (default 500)")
    p.add_argument("--no-autoattack", action="store_true")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_gpu.json")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("robustkit").setLevel(logging.WARNING)
    usable, reason = cuda_status()
    if not usable:
        result = skipped(reason)
        write_json(args.out, result)
        print(f"bench_gpu: skipped, {reason}; wrote {args.out}")
        return result
    start = time.perf_counter()
    device = torch.device("cuda")
    torch.backends.cudnn.benchmark = True
    repeats = args.repeats or (5 if args.quick else 20)
    result: dict = {"bench": "gpu", "skipped": False, "quick": args.quick,
                    "info": device_info(device), "repeats": repeats, "levers": list(LEVERS),
                    "tolerance": TOLERANCE, "models": {}}
    for name in (QUICK_MODELS if args.quick else MODELS):
        result["models"][name] = measure_model(name, repeats, device)
        write_json(args.out, result)  # a partial map survives a later failure
    if not args.no_autoattack:
        try:
            result["autoattack"] = autoattack_pair(
                args.aa_images or (200 if args.quick else 500), device)
        except Exception as exc:
            result["autoattack"] = {"error": f"{type(exc).__name__}: {exc}"}
            log.warning("AutoAttack comparison failed: %s", result["autoattack"]["error"])
    result["wall_seconds"] = time.perf_counter() - start
    write_json(args.out, result)
    print(f"wrote {args.out} ({result['wall_seconds']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
