"""``robustkit.evaluate``: the library call behind ``robustkit evaluate`` (architecture.md §4.2).

From a model (an ``nn.Module`` or a ``--model`` string) and images, the whole RobustBench-protocol
evaluation: the attacks built from their ``--attacks`` names, pre-checks on the first batch,
``evaluate_attacks``, post-checks (perturbation sizes, gradient masking). The returned
``EvalResult`` carries the checks and the settings, so ``result.save(folder)`` writes the very
``results.json``, ``flags.json`` and RobustBench ``model_info`` file the CLI writes.

Example:
    >>> x, y = robustkit.data.load("sample-mnist", n=100)
    >>> res = evaluate("robustkit:mnist_smallcnn_robust", x, y, attacks="clean,pgd20", eps=0.3)
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any, Literal

import torch
from torch import Tensor, nn
from torch.utils.data import Dataset

from robustkit.errors import ConfigError, ModelError, user_input
from robustkit.evaluation.protocol import EvalResult, evaluate_attacks

__all__ = ["EVAL_TIMEOUT_S", "evaluate", "default_name", "check_name", "model_labels",
           "card_kind", "dataset_eps",
           "load_models", "load_test_images", "source_model", "default_out", "load_eval_data",
           "reset_state"]

logger = logging.getLogger(__name__)

# Collective timeout of a sharded evaluation: on a resume, a rank whose state is complete waits
# at the first gather for the others' remaining AutoAttack batches, which can take hours; the
# default 30 minutes would kill a healthy run (torchrun already stops every rank when one dies).
# 7 days in milliseconds also stays below 2**31 for backends that keep an int32.
EVAL_TIMEOUT_S = 7 * 24 * 3600


def evaluate(
    model: nn.Module | str,
    x: Tensor | Dataset,
    y: Tensor | None = None,
    *,
    attacks: str | Sequence[str] | Mapping[str, Any] = "clean,pgd20",
    eps: float | None = None,
    norm: Literal["Linf", "L2"] = "Linf",
    dataset: str | None = None,
    checkpoint: str | Path | None = None,
    name: str | None = None,
    subset: str | None = None,
    batch_size: int = 256,
    protocol: Literal["standalone", "cascade"] = "standalone",
    aa_version: Literal["standard", "plus", "custom"] = "standard",
    aa_attacks: Sequence[str] | None = None,
    seed: int = 0,
    device: torch.device | str | None = None,
    state_dir: str | Path | None = None,
    overwrite: bool = False,
    progress: Any = None,
    fingerprint: Mapping[str, Any] | None = None,
    shard: bool = False,
) -> EvalResult:
    """Evaluate one model by the RobustBench protocol, as ``robustkit evaluate`` does.

    Clean accuracy, then every attack on the clean-correct points (``protocol``), the
    per-example worst case as ``robust``, and the sanity checks of AutoAttack's authors
    (methods.md §1.5-1.6). Logs, never prints.

    Args:
        model: an ``nn.Module`` taking ``(N, C, H, W)`` in [0, 1], or a string as
            ``--model``: a registry name (with ``checkpoint``), ``FILE.py:FN``,
            ``robustbench:NAME`` or ``robustkit:NAME`` (a shipped reference model). A string
            needs ``dataset`` (classes, shape, mean/std) except ``robustkit:NAME``; it is
            built after ``seed_everything(seed)``, as the CLI builds it.
        x: ``(N, C, H, W)`` images in [0, 1] (with ``y``), or a dataset yielding
            ``(x, y, ...)`` (``y=None``), e.g. ``first_n(load_dataset(...), n)``.
        y: ``(N,)`` integer labels; ``None`` with a dataset.
        attacks: ``"clean,pgd20,autoattack"`` (the ``--attacks`` forms, a string or a list;
            default ``"clean,pgd20"``), or a mapping name -> ``Attack`` built on ``model``.
        eps: budget in [0, 1] pixel units; default: the dataset's for ``norm``.
        norm: ``"Linf"`` (default) or ``"L2"``: the threat model.
        dataset: a ``robustkit.data.DATASETS`` key; names the results and their RobustBench
            file (``None``: no model_info file) and gives the default ``eps``.
        checkpoint: weights for a registry or ``FILE.py:FN`` model (recorded with its sha256).
        name: the entry's name (default: the zoo name, ``FN`` of ``FILE.py:FN``, the registry
            name, or the model's class).
        subset: what the images are, for the results (default ``"<N> images"``; the CLI
            writes ``"first <N> test images"``).
        batch_size: images per attack call; default 256.
        protocol: ``"standalone"`` (default: each attack on every clean-correct point) or
            ``"cascade"`` (each on the points still robust).
        aa_version: AutoAttack's version: ``"standard"`` (default), ``"plus"``, ``"custom"``.
        aa_attacks: with ``"custom"``, e.g. ``["apgd-ce", "apgd-t"]``.
        seed: seed of the attacks' randomness; default 0.
        device: where the model runs; default: a module's own device, else CUDA when
            available.
        state_dir: folder of resumable per-batch flags (``None``: none kept).
        overwrite: discard a ``state_dir`` made with other settings instead of raising.
        progress: ``progress(name, total)`` -> a bar with ``update(k)`` and ``close()``.
        fingerprint: more settings a resume must match (the CLI adds ``data_root``).
        shard: split the batches over the ``torch.distributed`` ranks (torchrun).

    Returns:
        ``EvalResult`` with per-sample flags, ``checks`` and the settings of ``save()``.

    Raises:
        ModelError: a model string that cannot be built or loaded.
        ConfigError: ``attacks`` that cannot be built on this model (e.g. a torchattacks
            argument), naming the attack.
        ValueError: a bad argument (named), images outside [0, 1], labels outside the classes.
        StateMismatchError: ``state_dir`` holds another evaluation (and not ``overwrite``).

    Shape:
        ``x``: ``(N, C, H, W) in [0, 1]``; ``y``: ``(N,)``.

    Example:
        >>> res = evaluate("robustkit:mnist_smallcnn_robust", x, y, attacks="clean,pgd20")
        >>> res.to_frame()
    """
    from robustkit import distributed as dist
    from robustkit.attacks.specs import build_attacks, parse_attacks, strength, targets_needed
    from robustkit.data import DATASETS
    from robustkit.evaluation.checks import pre_checks
    from robustkit.evaluation.masking import post_checks
    from robustkit.evaluation.results import format_eps, sha256_file

    # before anything is loaded (evaluate_attacks checks these again, after the pre-checks)
    if norm not in ("Linf", "L2"):
        raise ValueError(f"norm must be 'Linf' or 'L2', got {norm!r}")
    if protocol not in ("standalone", "cascade"):
        raise ValueError(f"protocol must be 'standalone' or 'cascade', got {protocol!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
    if dataset is not None and dataset not in DATASETS:
        raise ValueError(f"dataset must be one of {sorted(DATASETS)} or None, got {dataset!r}")
    info = DATASETS[dataset] if dataset is not None else None
    if eps is None:
        if info is None:
            raise ValueError("eps: give eps, or dataset= for the dataset's default budget")
        eps = float(info.eps[norm])
    data = _data(x, y)
    n = len(data[1]) if isinstance(data, tuple) else len(data)  # type: ignore[arg-type]
    spec = model if isinstance(model, str) else None
    if spec is not None:
        net = _load(spec, info, checkpoint=checkpoint, device=device, norm=norm, seed=seed)
    elif isinstance(model, nn.Module):
        if checkpoint is not None:
            raise ValueError("checkpoint: only with a model string; load weights into a module "
                             "with robustkit.models.load_weights")
        net = model
    else:
        raise ValueError(f"model must be an nn.Module or a model string, got "
                         f"{type(model).__name__}")
    if device is None:
        p = next(iter(list(net.parameters()) + list(net.buffers())), None)
        device = p.device if p is not None else torch.device("cpu")
    device = torch.device(device)
    arch = architecture(spec, net)
    name = name if name is not None else (default_name(spec) if spec else arch)
    aa = list(aa_attacks) if aa_attacks is not None else None
    if isinstance(attacks, Mapping):  # built by the caller: no names to rank by effort
        built, specs = dict(attacks), []
        settings = {k: {"class": type(a).__name__, **a.settings()} for k, a in built.items()}
    else:
        specs = parse_attacks(attacks if isinstance(attacks, str) else list(attacks))
        with user_input(ConfigError, "attacks"):  # e.g. torchattacks:X(k=v) with a bad k
            built, settings = build_attacks(specs, net, eps=eps, norm=norm, seed=seed,
                                            aa_version=aa_version, aa_attacks=aa)
    subset = subset if subset is not None else f"{n} images"
    logger.info("%s on %s: %s, %s eps=%s, attacks: %s%s", spec or arch, dataset or "images",
                subset, norm, format_eps(eps), ", ".join(built) or "none",
                f"; sharded over {dist.world_size()} processes" if shard and
                dist.world_size() > 1 else "")
    if state_dir is not None:
        logger.info("per-batch state in %s: the same call (command) resumes", state_dir)
    # Every rank runs the same checks on the same first batch, so all agree on them.
    x0, y0 = _first_batch(data, min(n, batch_size), device)
    checks = pre_checks(net, x0, y0, num_targets=targets_needed(specs, aa_version, aa))
    ckpt_hash = sha256_file(checkpoint) if checkpoint is not None else None
    result = evaluate_attacks(
        net, data, built, batch_size=batch_size, protocol=protocol, seed=seed,
        state_dir=state_dir, overwrite=overwrite, progress=progress, device=device, norm=norm,
        shard=shard, fingerprint={
            "model": spec or arch, "model_code_sha256": model_code_sha256(spec),
            "checkpoint_sha256": ckpt_hash, "dataset": dataset, "threat_model": norm,
            "eps": eps, "attack_settings": settings, **dict(fingerprint or {})})
    result.checks = checks + post_checks(result, eps=eps, strength=strength(specs))
    result.meta = dict(
        model=spec or arch, dataset=dataset, threat_model=norm, eps=eps, seed=seed,
        subset=subset, checkpoint=checkpoint, architecture=arch, attacks=settings,
        extra={"name": name, "batch_size": batch_size, "device": str(device),
               "world_size": dist.world_size() if shard else 1})
    return result


def default_name(spec: str) -> str:
    """The entry's name for a model string: the zoo name, the factory's function name
    (``archs.py:lenet5_pgd`` -> ``lenet5_pgd``: one file often holds several models) or the
    registry name.

    Example:
        >>> default_name("robustbench:Standard"), default_name("archs.py:lenet5")
        ('Standard', 'lenet5')
    """
    if spec.startswith("robustbench:"):
        return spec.partition(":")[2]
    if ":" in spec:
        return spec.rpartition(":")[2]
    return spec


# ---- inputs of the commands that compare several models (robustkit sensitivity, inspect) -------
def check_name(name: str, flag: str = "--name") -> str:
    """``name`` when it is a name, not a path; a one-line ``ConfigError`` naming ``flag``.

    A name becomes part of file names (``<out>/model_info/.../<name>.json``, TensorBoard run
    folders), always through ``utils.safe_name``; a separator, ``.``/``..`` or a control
    character says the user meant a path, so it is refused rather than silently renamed.
    """
    from robustkit.utils import check_plain_name

    try:
        return check_plain_name(name, flag)
    except ValueError as err:
        raise ConfigError(f"{err}; it names the entry and its files inside --out") from None


def model_labels(models: Sequence[Mapping[str, Any]]) -> list[str]:
    """Labels of ``[{"spec", "checkpoint", "name"}]`` as ``robustkit evaluate`` names each model
    (``name``, else :func:`default_name`); repeated default names get the checkpoint's folder
    (else its stem) appended, so two checkpoints of one architecture stay apart.

    Raises:
        ConfigError: a name that is a path, or two models with one label.

    Example:
        >>> model_labels([{"spec": "small_cnn", "checkpoint": "runs/nat/best.pt", "name": None},
        ...               {"spec": "small_cnn", "checkpoint": "runs/at/best.pt", "name": None}])
        ['small_cnn@nat', 'small_cnn@at']
    """
    labels = [check_name(m["name"]) if m["name"] is not None else default_name(m["spec"])
              for m in models]
    for label in sorted(set(labels)):
        group = [i for i, lb in enumerate(labels) if lb == label and models[i]["name"] is None]
        if len(group) < 2:
            continue
        for tag in (lambda p: Path(p).parent.name, lambda p: Path(p).stem):
            cand = [f"{label}@{tag(models[i]['checkpoint'])}" if models[i]["checkpoint"]
                    else label for i in group]
            if len(set(cand)) == len(group) and all(c != f"{label}@" for c in cand):
                for i, c in zip(group, cand, strict=True):
                    labels[i] = c
                break
    seen = [lb for lb in labels if labels.count(lb) > 1]
    if seen:
        raise ConfigError(f"two models are labelled {seen[0]!r}; give each a --name after its "
                          "--model")
    return labels


def card_kind(spec: str) -> str | None:
    """``"robust"``/``"standard"`` from a shipped model's card (objective ``natural`` =
    standard) for ``robustkit:NAME``, else ``None`` (``saliency.compare`` then decides by
    adversarial accuracy)."""
    if not spec.startswith("robustkit:"):
        return None
    from robustkit.models import model_card

    try:
        objective = model_card(spec.partition(":")[2])["objective"]["name"]
    except (KeyError, TypeError, ValueError):  # no card, or one without an objective
        return None
    return ("standard" if objective == "natural" else "robust") if objective else None


def dataset_eps(dataset: str | None, eps: str | float | None) -> tuple[Any, float]:
    """``(DATASETS[dataset], eps)``: the L∞ budget given (a number or a fraction such as
    ``"8/255"``, in (0, 1]) or the dataset's; a ``ConfigError`` naming the flag otherwise."""
    from robustkit.data import DATASETS
    from robustkit.utils import parse_number

    if dataset is None:
        raise ConfigError("--dataset is required")
    if dataset not in DATASETS:
        raise ConfigError(f"--dataset {dataset!r}: unknown; valid: {', '.join(DATASETS)}")
    info = DATASETS[dataset]
    if eps is None:
        return info, float(info.eps["Linf"])
    with user_input(ConfigError, "--eps"):
        value = parse_number(eps)
    if not 0 < value <= 1:
        raise ConfigError(f"--eps {eps!r}: must lie in (0, 1] (pixel units)")
    return info, value


def load_models(models: Sequence[Mapping[str, Any]], labels: Sequence[str], dataset: str,
                device: Any) -> dict[str, nn.Module]:
    """``{label: model}`` of ``[{"spec", "checkpoint"}]`` built for ``dataset`` (its classes,
    shape, mean and std; L∞). Each runs one forward on a zero image of the dataset's shape, so
    a wrong class count or input shape is a one-line ``ModelError`` naming ``--model SPEC``."""
    from robustkit.data import DATASETS
    from robustkit.models import load_model

    info = DATASETS[dataset]
    c, h, _ = info.input_shape
    out = {}
    for label, m in zip(labels, models, strict=True):
        with user_input(ModelError, f"--model {m['spec']}"):
            out[label] = load_model(
                m["spec"], num_classes=info.num_classes, in_channels=c, input_size=h,
                mean=info.mean, std=info.std, checkpoint=m.get("checkpoint"),
                dataset=dataset.removeprefix("sample-"), threat_model="Linf", device=device)
    return out


def load_test_images(dataset: str, root: str | None, n: int) -> tuple[Tensor, Tensor, Any]:
    """``(x, y, boxes)``: the first ``n`` test images of ``dataset`` in file order (``boxes``
    ``(n, 4)`` for datasets with object boxes, else ``None``); ``n`` beyond the split is one
    ``ConfigError`` line naming ``--n-examples``."""
    from robustkit.data import first_n, load_dataset
    from robustkit.errors import DataError

    with user_input(DataError, f"--dataset {dataset}"):
        test = load_dataset(dataset, "test", root)
    if n > len(test):
        raise ConfigError(f"--n-examples {n} exceeds the {len(test)} test images of {dataset} "
                          "found")
    data = first_n(test, n)
    x = torch.stack([data[i][0] for i in range(n)])
    y = torch.stack([torch.as_tensor(data[i][1]) for i in range(n)]).long()
    return x, y, getattr(data, "boxes", None)


def source_model(name: str | None, models: Sequence[Mapping[str, Any]], labels: Sequence[str],
                 checkpoint: str | None, dataset: str, device: Any):
    """``(label, model)`` of ``--source-model NAME``: ``(label, None)`` when ``name`` is a
    label or the spec of one of ``models`` (measured with its own weights), ``(default_name,
    model)`` for another model spec (with ``checkpoint``), ``(None, None)`` without a name
    (white-box on each model)."""
    if name is None:
        if checkpoint is not None:
            raise ConfigError("--source-checkpoint needs --source-model")
        return None, None
    if checkpoint is not None and not Path(checkpoint).is_file():
        raise ConfigError(f"--source-checkpoint {checkpoint!r}: file not found")
    hits = [i for i, lb in enumerate(labels) if lb == name] or [
        i for i, m in enumerate(models) if m["spec"] == name]
    if len(hits) > 1:
        raise ConfigError(f"--source-model {name!r} matches {len(hits)} models; use one of the "
                          f"labels {', '.join(labels)}")
    if hits:
        if checkpoint is not None:
            raise ConfigError(f"--source-model {name!r} is a measured --model (with its own "
                              "weights); --source-checkpoint applies only to another model")
        return labels[hits[0]], None
    label = default_name(name)
    spec = [{"spec": name, "checkpoint": checkpoint}]
    return label, load_models(spec, [label], dataset, device)[label]


# ---- the steps of robustkit evaluate around evaluate() -----------------------------------------
def default_out(name: str, dataset: str, threat_model: str) -> Path:
    """``runs/evaluate/<name>-<dataset>-<threat model>`` (unsafe characters as ``_``)."""
    import re

    return Path("runs", "evaluate", re.sub(r"[^\w.-]+", "_", f"{name}-{dataset}-{threat_model}"))


def reset_state(out: Path, rank: int, world: int, overwrite: bool) -> None:
    """Before a (sharded) evaluation opens its state in ``out/state``: rank 0 removes stale
    temporary files of ``out``; ``overwrite`` discards earlier state, each rank its own folder
    (right with or without a shared file system), rank 0 the single-process state and the
    folders of other world sizes."""
    from robustkit.evaluation.state import discard_state, rank_dir
    from robustkit.utils import clean_tmp

    state = out / "state"
    if rank == 0:  # only rank 0 writes into out itself: no live temporary file is removed
        clean_tmp(out)
    if overwrite:
        if world > 1:
            discard_state(rank_dir(state, rank, world))
        if rank == 0:
            discard_state(state, keep_world=world if world > 1 else None)


def load_eval_data(dataset: str, root: str | None, n: int | None) -> tuple[Any, int, str | None]:
    """``(data, n, data_root)``: the first ``n`` (default all) test images of ``dataset`` as a
    dataset, and the resolved data folder that a resume must match (``None`` for the shipped
    ``sample-*`` sets, which ignore the root)."""
    from robustkit.data import first_n, load_dataset, resolve_root
    from robustkit.errors import DataError

    with user_input(DataError, f"--dataset {dataset}"):
        test = load_dataset(dataset, "test", root)
    n = n or len(test)
    if n > len(test):
        raise ConfigError(f"--n-examples {n} exceeds the {len(test)} test images of {dataset} "
                          "found")
    data_root = None if dataset.startswith("sample-") else str(resolve_root(root).resolve())
    return first_n(test, n), n, data_root


def architecture(spec: str | None, model: nn.Module) -> str:
    """The network's class (inside ``Sequential(normalize, model)``), with the registry name."""
    inner = getattr(model, "model", None) if isinstance(model, nn.Sequential) else None
    cls = type(inner if isinstance(inner, nn.Module) else model).__name__
    return cls if spec is None or ":" in spec else f"{spec} ({cls})"


def model_code_sha256(spec: str | None) -> str | None:
    """sha256 of FILE.py of a ``FILE.py:FN`` model (None for other forms): an edited forward
    pass with the same weights must not resume the old flags (the weights' hash cannot see it)."""
    from robustkit.evaluation.results import sha256_file

    if spec is None or spec.startswith(("robustbench:", "robustkit:")) or ":" not in spec:
        return None
    path = Path(spec.rpartition(":")[0])
    return sha256_file(path) if path.is_file() else None


def _data(x: Any, y: Any) -> Any:
    """``(x, y)`` tensors or a dataset, checked for the form only (values: evaluate_attacks)."""
    if isinstance(x, Tensor):
        if not isinstance(y, Tensor):
            raise ValueError(f"y must be a tensor of labels with a tensor x, got "
                             f"{type(y).__name__}")
        if x.dim() != 4 or y.dim() != 1 or len(x) != len(y) or len(x) == 0:
            raise ValueError(f"x must be (N, C, H, W) and y (N,) with N >= 1, got "
                             f"{tuple(x.shape)} and {tuple(y.shape)}")
        return x, y
    if y is not None:
        raise ValueError("y must be None when x is a dataset (it yields the labels)")
    if not hasattr(x, "__getitem__") or not hasattr(x, "__len__") or len(x) == 0:
        raise ValueError(f"x must be an image tensor or a non-empty dataset, got "
                         f"{type(x).__name__}")
    return x


def _first_batch(data: Any, k: int, device: torch.device) -> tuple[Tensor, Tensor]:
    if isinstance(data, tuple):
        x, y = data
        return x[:k].to(device), y[:k].long().to(device)
    batch = [data[i] for i in range(k)]
    x = torch.stack([b[0] for b in batch]).to(device)
    return x, torch.stack([torch.as_tensor(b[1]) for b in batch]).long().to(device)


def _load(spec: str, info: Any, *, checkpoint: Any, device: Any, norm: str,
          seed: int) -> nn.Module:
    """``load_model`` with the dataset's facts (or a ``robustkit:`` model card's)."""
    from robustkit.models import load_model
    from robustkit.utils import seed_everything

    if info is not None:
        c, h, _ = info.input_shape
        facts = dict(num_classes=info.num_classes, in_channels=c, input_size=h, mean=info.mean,
                     std=info.std, dataset=info.name.removeprefix("sample-"))
    elif spec.startswith("robustkit:"):
        from robustkit.models import model_card

        arch = model_card(spec.partition(":")[2])["architecture"]
        facts = dict(num_classes=arch["num_classes"], in_channels=arch["in_channels"],
                     input_size=arch["input_size"])
    else:
        raise ValueError(f"dataset: needed to build model {spec!r} (classes, image shape, "
                         "mean and std); give dataset=, or pass an nn.Module")
    seed_everything(seed)  # a registry model without checkpoint: the CLI's random weights
    # ModelError passes through; a ValueError of create_model (e.g. a bad class count) is
    # the pairing of this model with this dataset.
    with user_input(ModelError, f"model {spec}"):
        return load_model(spec, checkpoint=checkpoint, threat_model=norm,
                          device="auto" if device is None else device, **facts)
