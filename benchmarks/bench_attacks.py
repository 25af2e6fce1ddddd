"""Attack speed: robustkit vs torchattacks / pyautoattack, measured in one run (`make bench`).

Sections (every ratio compares contenders timed round-robin in the same process):

1. PGD-10 with identical work (L∞, random start, last iterate): robustkit vs torchattacks.PGD
   (target <= 1.0x) and vs the ideal 10 x (forward + CE + input backward) (target <= 1.05x), on a
   small CIFAR CNN at batch 128 and pyautoattack's example ResNet-18 at batch 32.
2. Evaluation with ``stop_on_success``: PGD-20 on a standard model (pyautoattack's ResNet-18
   with its weights ``model_test.pt``, first CIFAR-10 test images) vs torchattacks' PGD-20
   (target <= 0.3x at equal or lower robust accuracy), and the same ratio on a robust model.
   No robust CIFAR checkpoint exists offline, so the robust model is a small CNN PGD-trained on
   the shipped MNIST sample inside this script (cached under bench_results/).
3. AutoAttack (custom, APGD-CE) through robustkit vs pyautoattack called directly on the same
   64 images (target <= 1.02x).

Usage: python benchmarks/bench_attacks.py [--quick] [--device cpu|cuda]
Writes bench_results/bench_attacks.json.
"""

from __future__ import annotations

import argparse
import logging
import pickle
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import (  # noqa: E402
    RESULTS,
    device_info,
    median,
    paired_ratio,
    print_table,
    ratio,
    time_paired,
    write_json,
)

from robustkit.attacks import PGD, AutoAttack  # noqa: E402
from robustkit.testing import pyautoattack_resnet18  # noqa: E402

log = logging.getLogger("bench_attacks")
CIFAR_RAW = Path(__file__).resolve().parents[2] / "shared/data/cifar10/cifar-10-batches-py"


# ------------------------------------------------------------------ models and data
def cifar_test(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """First n CIFAR-10 test images in file order, [0, 1]."""
    try:
        from robustkit.data import load_dataset

        ds = load_dataset("sample-cifar10", "test")
        if n <= len(ds.y):
            return ds.x[:n].float() / 255, ds.y[:n].long()
    except Exception as err:  # the data package may be missing on a bare machine
        log.warning("sample-cifar10 unavailable (%s); reading %s", err, CIFAR_RAW)
    with open(CIFAR_RAW / "test_batch", "rb") as f:
        d = pickle.load(f, encoding="bytes")
    x = torch.tensor(d[b"data"][:n]).view(-1, 3, 32, 32).float() / 255
    return x, torch.tensor(d[b"labels"][:n])


def mnist_train() -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from robustkit.data import load_dataset

        ds = load_dataset("sample-mnist", "train")
        x, y = ds.x, ds.y
    except Exception:
        import numpy as np

        d = np.load(Path(__file__).resolve().parents[1] / "robustkit/assets/mnist_sample.npz")
        x, y = torch.from_numpy(d["x_train"]), torch.from_numpy(d["y_train"])
    return x.float() / 255, y.long()


def mnist_test(n: int) -> tuple[torch.Tensor, torch.Tensor]:
    try:
        from robustkit.data import load_dataset

        ds = load_dataset("sample-mnist", "test")
        x, y = ds.x, ds.y
    except Exception:
        import numpy as np

        d = np.load(Path(__file__).resolve().parents[1] / "robustkit/assets/mnist_sample.npz")
        x, y = torch.from_numpy(d["x_test"]), torch.from_numpy(d["y_test"])
    return x[:n].float() / 255, y[:n].long()


def _create(name: str, fallback, **kw) -> nn.Module:
    try:
        from robustkit.models import create_model

        return create_model(name, 10, **kw)
    except Exception as err:
        log.warning("robustkit.models.%s unavailable (%s): a local stand-in is used", name, err)
        return fallback()


def cifar_cnn() -> nn.Module:
    return _create("cifar_cnn", lambda: nn.Sequential(
        nn.Conv2d(3, 32, 3, padding=1), nn.ReLU(), nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(),
        nn.MaxPool2d(2), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(128 * 64, 256), nn.ReLU(), nn.Linear(256, 10)))


def robust_mnist(device: torch.device, epochs: int) -> nn.Module:
    """A small CNN PGD-trained (ε = 0.3) on the 6,000-image MNIST sample; cached."""
    model = _create("small_cnn", lambda: nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2), nn.Flatten(),
        nn.Linear(64 * 49, 200), nn.ReLU(), nn.Linear(200, 10)), in_channels=1, input_size=28)
    cache = RESULTS / f"mnist_pgd_cnn_{epochs}ep.pt"
    if cache.exists():
        model.load_state_dict(torch.load(cache, weights_only=True, map_location="cpu"))
        return model.to(device).eval()
    model.to(device)
    x_all, y_all = mnist_train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for epoch in range(epochs):
        eps = min(0.3, 0.1 * (epoch + 1))  # ramp ε up: PGD-AT at 0.3 from scratch stalls
        attack = PGD(model, eps=eps, alpha=eps / 4, steps=7, select="last")
        for idx in torch.randperm(len(y_all), generator=g).split(128):
            x, y = x_all[idx].to(device), y_all[idx].to(device)
            model.train()
            x_adv = attack(x, y)  # the attack runs in eval mode and restores train mode
            loss = F.cross_entropy(model(x_adv), y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
    log.info("trained the robust MNIST CNN in %.0f s", time.perf_counter() - t0)
    RESULTS.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), cache)
    return model.eval()


# ------------------------------------------------------------------ sections
def _summary(t: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    return {k: {"min": min(v), "median": median(v), "all": v} for k, v in t.items()}


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(1) == y).float().mean().item()


def ideal_pgd(model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int) -> None:
    """The floor: ``steps`` x (forward + CE + input gradient), nothing else."""
    xa = x.clone().requires_grad_(True)
    for _ in range(steps):
        torch.autograd.grad(F.cross_entropy(model(xa), y), xa)


def pgd10(name, model, x, y, device, repeats, rows, out) -> None:
    import torchattacks

    ours = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, select="last")
    best = PGD(model, eps=8 / 255, alpha=2 / 255, steps=10)
    theirs = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=10, random_start=True)
    t = time_paired({"robustkit": lambda: ours(x, y), "torchattacks": lambda: theirs(x, y),
                     "ideal": lambda: ideal_pgd(model, x, y, 10),
                     "robustkit_best": lambda: best(x, y)}, device, repeats)
    r_ta, r_id = ratio(t, "robustkit", "torchattacks"), ratio(t, "robustkit", "ideal")
    out[f"pgd10_{name}"] = {"batch": len(y), "seconds": _summary(t),
                            "paired_ratio_vs_torchattacks": paired_ratio(t, "robustkit",
                                                                         "torchattacks"),
                            "ratio_vs_torchattacks": r_ta, "ratio_vs_ideal": r_id,
                            "ratio_best_vs_ideal": ratio(t, "robustkit_best", "ideal")}
    rows.append({"name": f"PGD-10 {name} b{len(y)}: robustkit / torchattacks", "value": r_ta,
                 "target": 1.0, "ok": r_ta <= 1.0})
    rows.append({"name": f"PGD-10 {name} b{len(y)}: robustkit / ideal", "value": r_id,
                 "target": 1.05, "ok": r_id <= 1.05})
    rows.append({"name": f"PGD-10 {name} b{len(y)}: select=best / ideal",
                 "value": out[f"pgd10_{name}"]["ratio_best_vs_ideal"], "note": "info"})


def early_stop(name, model, x, y, eps, alpha, device, repeats, rows, out, target) -> None:
    import torchattacks

    ours = PGD(model, eps=eps, alpha=alpha, steps=20, stop_on_success=True)
    theirs = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=20, random_start=True)
    adv = {}

    def run(key, attack):
        def fn():
            torch.manual_seed(0)
            adv[key] = attack(x, y)
        return fn

    t = time_paired({"robustkit": run("robustkit", ours), "torchattacks": run("torchattacks",
                                                                                theirs)},
                    device, repeats)
    acc = {k: accuracy(model, v, y) for k, v in adv.items()}
    r = ratio(t, "robustkit", "torchattacks")
    out[f"pgd20_stop_{name}"] = {"n": len(y), "eps": eps, "alpha": alpha,
                                 "clean_acc": accuracy(model, x, y), "robust_acc": acc,
                                 "seconds": _summary(t), "ratio": r,
                                 "paired_ratio": paired_ratio(t, "robustkit", "torchattacks")}
    label = f"PGD-20 stop_on_success, {name} (n={len(y)}): robustkit / torchattacks"
    ok = r <= target if target is not None else None
    if target is not None:
        ok = ok and acc["robustkit"] <= acc["torchattacks"]
    rows.append({"name": label, "value": r, "target": target, "ok": ok,
                 "note": f"robust acc {acc['robustkit']:.3f} vs torchattacks "
                         f"{acc['torchattacks']:.3f}, clean "
                         f"{out[f'pgd20_stop_{name}']['clean_acc']:.3f}"})


def autoattack(name, model, x, y, eps, device, repeats, rows, out) -> None:
    import pyautoattack

    ours = AutoAttack(model, eps=eps, version="custom", attacks=["apgd-ce"], batch_size=len(y))
    direct = pyautoattack.AutoAttack(model, norm="Linf", eps=eps, version="custom",
                                     attacks=["apgd-ce"], device=device, seed=0)
    t = time_paired({"robustkit": lambda: ours(x, y),
                     "pyautoattack": lambda: direct.run_standard_evaluation(
                         x, y, batch_size=len(y))}, device, repeats)
    r = ratio(t, "robustkit", "pyautoattack")
    out[f"autoattack_{name}"] = {"n": len(y), "seconds": _summary(t), "ratio": r,
                                 "paired_ratio": paired_ratio(t, "robustkit", "pyautoattack")}
    rows.append({"name": f"AutoAttack APGD-CE {name} (n={len(y)}): robustkit / direct",
                 "value": r, "target": 1.02, "ok": r <= 1.02})


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help="fewer repeats and images")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu or cuda")
    p.add_argument("--out", type=Path, default=RESULTS / "bench_attacks.json")
    p.add_argument("--threads", type=int, default=1,
                   help="CPU intra-op threads (default 1: CPU time is then a stable clock on a "
                        "shared machine)")
    args = p.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    logging.getLogger("auto-attack").setLevel(logging.WARNING)
    from robustkit.utils import resolve_device

    device = resolve_device(args.device)
    gpu = device.type == "cuda"
    if not gpu:
        torch.set_num_threads(args.threads)
    if gpu:
        torch.backends.cudnn.benchmark = True  # the same for every contender
    repeats = (3 if args.quick else 7) if gpu else (5 if args.quick else 7)
    n_eval = 256 if gpu else (64 if args.quick else 128)
    rows: list[dict] = []
    out: dict = {"info": device_info(device), "quick": args.quick, "repeats": repeats}
    print(f"device {out['info']['device_name']} ({device}), torch {torch.__version__}, "
          f"threads {torch.get_num_threads()}, repeats {repeats}", flush=True)

    torch.manual_seed(0)
    x_c, y_c = cifar_test(max(n_eval, 128))
    resnet = pyautoattack_resnet18().to(device)
    cnn = cifar_cnn().to(device).eval()
    pgd10("cifar_cnn", cnn, x_c[:128].to(device), y_c[:128].to(device), device, repeats, rows,
          out)
    pgd10("resnet18", resnet, x_c[:32].to(device), y_c[:32].to(device), device, repeats, rows,
          out)
    xs, ys = x_c[:n_eval].to(device), y_c[:n_eval].to(device)
    # Ratios far from their targets (about 0.1 against 0.3) need fewer repeats.
    few = max(2, repeats // 3)
    early_stop("standard resnet18 cifar10", resnet, xs, ys, 8 / 255, 2 / 255, device,
               few, rows, out, target=0.3)
    mnist = robust_mnist(device, epochs=8 if gpu else (3 if args.quick else 5))
    xm, ym = (t.to(device) for t in mnist_test(n_eval))
    early_stop("robust mnist cnn (PGD-trained here)", mnist, xm, ym, 0.3, 0.0375, device,
               few, rows, out, target=None)
    autoattack("mnist cnn", mnist, xm[:64], ym[:64], 0.3, device, repeats, rows, out)
    if gpu:
        autoattack("resnet18", resnet, xs[:64], ys[:64], 8 / 255, device, repeats, rows, out)
    out["rows"] = rows
    write_json(args.out, out)
    print_table(rows)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
