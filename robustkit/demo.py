"""``robustkit.demo.run``: the end-to-end pipeline of ``robustkit demo`` (``make demo``) as one
library call returning a ``DemoResult``, on the shipped samples only (no download).

1. Evaluate a real pretrained model, the standard CIFAR-10 ResNet-18 that ships inside
   ``pyautoattack``, on the first ``cifar_n`` images of the embedded CIFAR-10 test sample
   (clean, PGD-20, AutoAttack); ``cifar_n=0`` skips it.
2. Evaluate the shipped reference pair ``robustkit:mnist_smallcnn_standard`` and
   ``robustkit:mnist_smallcnn_robust`` (clean, PGD-40, AutoAttack) on the first ``mnist_n``
   images of the embedded MNIST test sample.
3. Train a small robust SmallCNN live with SRD-DAT on the embedded MNIST sample
   (``robustkit/assets/demo_configs/srd_dat.yaml``, package data) and evaluate it the same way.
4. Decide each model's kind (standard or robust) from its strongest evaluation:
   ``model_kind`` (the per-image worst case over every attack run, AutoAttack included); the
   saliency step and the page use these kinds.
5. Compare the neuron sensitivity (``robustkit.sensitivity.compare``) and the saliency
   (``robustkit.saliency.compare``, Gradient, SmoothGrad, AdaptGrad) of the three MNIST models.
6. Write ``OUT/index.html`` (``robustkit.reports.demo``).

``QUICK`` skips the CIFAR-10 step and AutoAttack (minutes even on a few robust images), and
trains one epoch on 512 images: a smoke test of the pipeline, which the page says.
The AutoAttack is the cheap one (the official APGD-CE + APGD-T, not the standard four-attack
version), cascaded after PGD: each attack runs only on the points still robust, as AutoAttack
chains its own attacks. Robust accuracy (per-example AND) is unchanged by the cascade; the
per-attack columns become cumulative. Every step writes what its command writes, into
``OUT/eval_<label>/``, ``OUT/srd_dat/``, ``OUT/sensitivity/`` and ``OUT/inspect/``; a second
run resumes the evaluations' state and the finished training run. Long steps log a heartbeat
(``robustkit.heartbeat``) every ~30 s; each step is logged as ``step k/N``.

Example:
    >>> result = robustkit.demo.run("runs/demo", QUICK)  # about a minute on two CPU cores
    >>> print(result.table()); result.page
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

__all__ = ["Sizes", "FULL", "QUICK", "DemoResult", "run", "check_sizes", "model_kind",
           "MODELS", "PAIR", "ROBUST_THRESHOLD", "resources_used"]

logger = logging.getLogger(__name__)

MODELS = ("srd_dat",)  # robustkit/assets/demo_configs/<name>.yaml, trained live in this order
PAIR = ("mnist_smallcnn_standard", "mnist_smallcnn_robust")  # shipped: robustkit:<name>
#: A model is "robust" when at least this fraction of the evaluated images stays correct under
#: its strongest evaluation (saliency.compare's threshold: standard models fall to ~0 %,
#: adversarially trained ones keep 40-95 %).
ROBUST_THRESHOLD = 0.2
MAX_EPOCHS = 1000  # a demo, not a training run; a typo (10000) would run for days
# The cheap AutoAttack, cascaded after PGD (see the module docstring).
_AA = dict(protocol="cascade", aa_version="custom", aa_attacks=["apgd-ce", "apgd-t"])
_EXPLAINERS = ["gradient", "smoothgrad", "adaptgrad"]


@dataclass(frozen=True)
class Sizes:
    """How much the demo computes.

    Attributes:
        cifar_n: CIFAR-10 test images evaluated, 0..1000 (0 skips the step).
        mnist_n: MNIST test images evaluated, 1..1000.
        sensitivity_n: MNIST test images of the sensitivity comparison, 2..1000.
        inspect_n: MNIST test images of the saliency comparison, 2..1000.
        epochs: training epochs (``None``: the config's 4), 1..1000.
        train_n: training images (``None``: all 5,500 of the sample).
        autoattack: run AutoAttack after PGD (``QUICK``: no, it costs minutes even on a few
            robust images: the kinds then rest on PGD alone, an upper bound on robustness).
        quick: a quick run (``QUICK``): the page and the log say so.
    """

    cifar_n: int = 100
    mnist_n: int = 200
    sensitivity_n: int = 200
    inspect_n: int = 12
    epochs: int | None = None
    train_n: int | None = None
    autoattack: bool = True
    quick: bool = False

    def describe(self) -> str:
        """``"cifar_n=100, mnist_n=200, ..."``: the sizes as the page's header states them."""
        return ", ".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self)
                         if f.name != "quick" and getattr(self, f.name) is not None)

    @property
    def attacks(self) -> str:
        """The attacks of the MNIST evaluations (PGD-40, then AutoAttack unless skipped)."""
        return "clean,pgd40" + (",autoattack" if self.autoattack else "")


FULL = Sizes()
#: About a minute on two idle CPU cores: no CIFAR-10 step, a few images, one short epoch.
QUICK = Sizes(cifar_n=0, mnist_n=32, sensitivity_n=32, inspect_n=4, epochs=1, train_n=512,
              autoattack=False, quick=True)

# field -> (dataset whose test split it counts, smallest value); the largest is that split's size
_COUNTS = {"cifar_n": ("sample-cifar10", 0), "mnist_n": ("sample-mnist", 1),
           "sensitivity_n": ("sample-mnist", 2),  # a bootstrap needs two images
           "inspect_n": ("sample-mnist", 2)}


def check_sizes(sizes: Sizes) -> None:
    """Refuse a size outside its range before any work.

    Raises:
        ValueError: ``"<field> <value>: must lie in [lo, hi]"``; ``hi`` is the size of the
            shipped test split a count draws from (``epochs``: ``MAX_EPOCHS``; ``train_n``:
            the 5,500 training images).
    """
    from robustkit.data import load_dataset

    found: dict[str, int] = {}
    bounds = {"epochs": (1, MAX_EPOCHS), "train_n": (1, 5500)}
    for name, (dataset, lo) in _COUNTS.items():
        if dataset not in found:
            found[dataset] = len(load_dataset(dataset, "test"))
        bounds[name] = (lo, found[dataset])
    for name, (lo, hi) in bounds.items():
        value = getattr(sizes, name)
        if value is None and name in ("epochs", "train_n"):
            continue
        if isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi:
            raise ValueError(f"{name} {value!r}: must lie in [{lo}, {hi}]")


def model_kind(results: Mapping[str, Any], threshold: float = ROBUST_THRESHOLD
               ) -> dict[str, Any]:
    """A model's kind from its strongest evaluation (a ``results.json`` dictionary).

    The strongest evaluation is the per-image worst case over every attack run (the
    ``robust`` column, with AutoAttack when it ran): a model that PGD leaves at 60 % but
    AutoAttack brings to 0 % is standard, not robust.

    Returns:
        ``{"kind": "robust" | "standard", "accuracy": worst-case accuracy, "attack": the
        attack with the lowest accuracy, "rule": one sentence saying how it was decided}``.

    Example:
        >>> model_kind({"n_examples": 200, "accuracy": {"clean": .99, "pgd40": .6,
        ...             "autoattack": .0, "robust": .0}})["kind"]
        'standard'
    """
    acc = dict(results["accuracy"])
    attacks = {k: v for k, v in acc.items() if k not in ("clean", "robust")}
    worst = acc.get("robust", min(attacks.values(), default=acc["clean"]))
    strongest = min(attacks, key=lambda k: (attacks[k], k != "autoattack")) if attacks \
        else "clean"
    kind = "robust" if worst >= threshold else "standard"
    rule = (f"{kind}: {100 * worst:.1f} % of the n = {results.get('n_examples', '?')} images "
            f"stay correct under every attack run ({', '.join(attacks) or 'none'}; lowest: "
            f"{strongest}), {'at least' if kind == 'robust' else 'below'} the "
            f"{100 * threshold:.0f} % threshold")
    return {"kind": kind, "accuracy": worst, "attack": strongest, "rule": rule}


@dataclass
class DemoResult:
    """What ``run`` made.

    Attributes:
        out: the output folder.
        sizes: the sizes it ran with.
        command: what made it (the page's header), e.g. ``"robustkit demo --quick"``.
        evaluations: ``{label: results.json dictionary}``, CIFAR-10 first when it ran.
        kinds: ``{label: model_kind(...)}`` of every evaluated model.
        sensitivity: the ``SensitivityReport``; saliency: the ``SaliencyReport``.
        runs: ``{name: run folder}`` of the live training runs.
        page: ``OUT/index.html``.
        seconds: wall time of the whole run.
    """

    out: Path
    sizes: Sizes
    command: str
    evaluations: dict[str, dict[str, Any]]
    kinds: dict[str, dict[str, Any]]
    sensitivity: Any
    saliency: Any
    runs: dict[str, Path]
    page: Path
    seconds: float
    files: dict[str, Path] = field(default_factory=dict)

    def table(self) -> str:
        """The MNIST accuracy table the CLI prints (percent per attack, the kind last)."""
        rows = {k: v for k, v in self.evaluations.items() if v.get("dataset") == "sample-mnist"}
        if not rows:
            return ""
        keys = list(next(iter(rows.values()))["accuracy"])
        width = max(len(n) for n in rows) + 2
        aa = ("AutoAttack = custom APGD-CE + APGD-T, not the standard version" if
              self.sizes.autoattack else "quick run: no AutoAttack, PGD-40 only")
        lines = [f"SmallCNN on MNIST (first {self.sizes.mnist_n} test images of the shipped "
                 f"sample, Linf eps 0.3; {aa}; cascade: each column is accuracy under that "
                 "attack and all before it)",
                 f"{'model':<{width}}" + "".join(f"{k:>12}" for k in keys) + "  kind"]
        for name, res in rows.items():
            kind = self.kinds.get(name, {}).get("kind", "")
            lines.append(f"{name:<{width}}" + "".join(f"{100 * res['accuracy'][k]:>11.1f}%"
                                                      for k in keys) + f"  {kind}")
        lines.append(f"kind: robust when at least {100 * ROBUST_THRESHOLD:.0f} % of the images "
                     "stay correct under every attack run "
                     f"({self.sizes.attacks.removeprefix('clean,').replace(',', ', ')})")
        return "\n".join(lines)


@contextlib.contextmanager
def resources_used() -> Iterator[tuple[dict[str, Path], str]]:
    """The demo's inputs inside the installed package: ``({name: config path}, model spec)``.

    ``as_file`` gives real paths even from a zipped install; the model spec is the
    ``FILE.py:FN`` form pointing at ``robustkit/testing.py``'s ``pyautoattack_resnet18``.
    """
    with contextlib.ExitStack() as stack:
        folder = resources.files("robustkit.assets").joinpath("demo_configs")
        configs = {m: stack.enter_context(resources.as_file(folder.joinpath(f"{m}.yaml")))
                   for m in MODELS}
        testing = stack.enter_context(
            resources.as_file(resources.files("robustkit").joinpath("testing.py")))
        yield configs, f"{testing}:pyautoattack_resnet18"


def run(out: str | Path = "runs/demo", sizes: Sizes = FULL, *, device: str = "cpu",
        command: str | None = None, progress: Callable[[str, int], Any] | None = None,
        train_callbacks: Sequence[Any] = ()) -> DemoResult:
    """Run the whole demo (see the module docstring) and write ``out/index.html``.

    Args:
        out: output folder (created).
        sizes: ``FULL`` (default, ``make demo``), ``QUICK`` or your own ``Sizes``.
        device: ``"cpu"`` (default) or ``"cuda"``.
        command: what made the run, for the page's header (default: this call).
        progress: ``progress(name, total)`` factory of bars for the evaluations and the
            comparisons; default heartbeat log lines (``robustkit.heartbeat``).
        train_callbacks: more trainer callbacks (the CLI adds its progress bar).

    Returns:
        A ``DemoResult``.

    Raises:
        ValueError: a size outside its range (``check_sizes``), named.
        OutputError: ``out`` cannot be written.
    """
    from robustkit.heartbeat import heartbeat_factory
    from robustkit.utils import check_writable, resolve_device

    check_sizes(sizes)
    resolve_device(device)
    out = check_writable(Path(out), "out")
    command = command or f"robustkit.demo.run({str(out)!r}, {'QUICK' if sizes.quick else 'FULL'})"
    progress = progress or heartbeat_factory()
    with resources_used() as (configs, factory):
        return _Pipeline(out, sizes, device, command, progress, list(train_callbacks),
                         configs, factory).run()


@dataclass
class _Pipeline:
    out: Path
    sizes: Sizes
    device: str
    command: str
    progress: Callable[[str, int], Any]
    train_callbacks: list[Any]
    configs: dict[str, Path]
    factory: str
    evaluations: dict[str, dict[str, Any]] = field(default_factory=dict)
    step_no: int = 0

    @property
    def steps(self) -> int:  # pair, per model (train, evaluate), sensitivity, inspect, page
        return 4 + 2 * len(MODELS) + (self.sizes.cifar_n > 0)

    def step(self, text: str) -> None:
        self.step_no += 1
        logger.info("== step %d/%d  %s ==", self.step_no, self.steps, text)

    def evaluate(self, model: str, label: str, dataset: str, n: int, attacks: str,
                 **kw: Any) -> None:
        from robustkit.data import load
        from robustkit.evaluation.api import evaluate

        folder = self.out / f"eval_{label}"
        x, y = load(dataset, n=n)
        res = evaluate(model, x, y, attacks=attacks, dataset=dataset, name=label,
                       subset=f"first {n} test images", device=self.device,
                       state_dir=folder / "state", progress=self.progress, **_AA, **kw)
        res.save(folder)
        self.evaluations[label] = json.loads((folder / "results.json").read_text())

    def run(self) -> DemoResult:
        start = time.perf_counter()
        s, out = self.sizes, self.out
        if s.quick:
            logger.info("quick run (%s): a smoke test of the pipeline, not numbers to read",
                        s.describe())
        if s.cifar_n > 0:
            self.step(f"standard ResNet-18 (pyautoattack) on the first {s.cifar_n} embedded "
                      "CIFAR-10 test images, Linf eps 8/255")
            self.evaluate(self.factory, "cifar10_resnet18", "sample-cifar10", s.cifar_n,
                          "clean,pgd20" + (",autoattack" if s.autoattack else ""))
        self.step(f"the shipped reference pair (robustkit:{PAIR[0]}, robustkit:{PAIR[1]}) on "
                  f"the first {s.mnist_n} MNIST test images, Linf eps 0.3")
        specs: dict[str, tuple[str, Path | None]] = {}  # label -> (model, checkpoint)
        for name in PAIR:
            specs[name] = (f"robustkit:{name}", None)
            self.evaluate(specs[name][0], name, "sample-mnist", s.mnist_n, s.attacks)
        runs: dict[str, Path] = {}
        for name in MODELS:
            self.step(f"train a small robust model live: {name} SmallCNN on the embedded MNIST "
                      "sample" + (f" ({s.epochs} epoch(s))" if s.epochs else ""))
            runs[name] = self.train(name)
            label = f"demo_{name}"
            self.step(f"evaluate {label} on the first {s.mnist_n} MNIST test images, Linf "
                      "eps 0.3")
            specs[label] = ("small_cnn", runs[name] / "last.pt")
            self.evaluate("small_cnn", label, "sample-mnist", s.mnist_n, s.attacks,
                          checkpoint=runs[name] / "last.pt")
        kinds = {lb: model_kind(r) for lb, r in self.evaluations.items()}
        for lb, k in kinds.items():
            logger.info("%s is %s", lb, k["rule"])
        sensitivity, saliency = self.compare(specs, kinds)
        self.step(f"write {out / 'index.html'}")
        from robustkit.reports.demo import write_demo_page

        seconds = time.perf_counter() - start
        page = write_demo_page(
            out / "index.html", evaluations=self.evaluations,
            evaluation_links={lb: f"eval_{lb}/results.json" for lb in self.evaluations},
            sensitivity=json.loads((out / "sensitivity" / "sensitivity.json").read_text()),
            inspect=json.loads((out / "inspect" / "summary.json").read_text()),
            runs=list(runs), seconds=seconds, kinds=kinds, command=self.command,
            sizes=s.describe(), quick=s.quick)
        return DemoResult(out=out, sizes=s, command=self.command, evaluations=self.evaluations,
                          kinds=kinds, sensitivity=sensitivity, saliency=saliency, runs=runs,
                          page=page, seconds=seconds,
                          files={"sensitivity": out / "sensitivity", "inspect": out / "inspect"})

    def train(self, name: str) -> Path:
        from robustkit.config import build

        run_dir = self.out / name
        # auto: a second run resumes its finished training (nothing to train) instead of
        # being refused for overwriting it
        overrides = [f"trainer.out_dir={run_dir}", f"trainer.device={self.device}",
                     "trainer.resume=auto"]
        s = self.sizes
        if s.epochs is not None:
            overrides.append(f"trainer.epochs={s.epochs}")
        if s.train_n is not None:
            overrides.append(f"data.limit={s.train_n}")
        if s.quick:  # held-out evaluation and probes on fewer images
            overrides += ["trainer.eval_n=64", "sensitivity.n=32", "saliency.n=2"]
        build(self.configs[name], overrides, callbacks=self.train_callbacks).fit()
        return run_dir

    def compare(self, specs: Mapping[str, tuple[str, Path | None]],
                kinds: Mapping[str, Mapping[str, Any]]) -> tuple[Any, Any]:
        from robustkit.data import DATASETS, load
        from robustkit.models import load_model
        from robustkit.saliency import compare as saliency_compare
        from robustkit.sensitivity import compare as sensitivity_compare
        from robustkit.utils import seed_everything

        s, info = self.sizes, DATASETS["sample-mnist"]
        c, h, _ = info.input_shape
        seed_everything(0)
        models = {lb: load_model(spec, num_classes=info.num_classes, in_channels=c,
                                 input_size=h, mean=info.mean, std=info.std,
                                 checkpoint=ckpt, dataset="mnist", threat_model="Linf",
                                 device=self.device)
                  for lb, (spec, ckpt) in specs.items()}
        model_info = {lb: {"model": spec, "checkpoint": None if ckpt is None else str(ckpt)}
                      for lb, (spec, ckpt) in specs.items()}
        about = {"dataset": "sample-mnist", "split": "test", "device": self.device}
        eps = float(info.eps["Linf"])
        self.step(f"neuron sensitivity of the MNIST models on the first {s.sensitivity_n} test "
                  "images (white-box PGD-20 on each, last iterate)")
        x, y = load("sample-mnist", n=s.sensitivity_n)
        sensitivity = sensitivity_compare(models, x, y, attack="pgd20", eps=eps,
                                          model_info=model_info, about=about,
                                          progress=self.progress)
        sensitivity.save(self.out / "sensitivity")
        self.step(f"saliency of the MNIST models (Gradient, SmoothGrad, AdaptGrad) on the first "
                  f"{s.inspect_n} test images and their PGD-20 counterparts")
        x, y = load("sample-mnist", n=s.inspect_n)
        saliency = saliency_compare(
            models, x, y, explainers=_EXPLAINERS, attack="pgd20", eps=eps,
            kinds={lb: kinds[lb]["kind"] for lb in models},
            kind_source="from the strongest evaluation: worst case over "
                        f"{s.attacks.removeprefix('clean,').replace(',', ', ')}, robust at >= "
                        f"{100 * ROBUST_THRESHOLD:.0f} % of the images",
            model_info=model_info, about=about, progress=self.progress)
        saliency.save(self.out / "inspect")
        return sensitivity, saliency
