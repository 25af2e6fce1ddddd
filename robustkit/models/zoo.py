"""RobustBench model-zoo adapter: ``robustbench:<name>`` models. The only importer of robustbench.

robustbench 1.1.1 imports a top-level ``autoattack`` package that no PyPI release provides
(its ``eval`` module does ``from autoattack import AutoAttack``); the official AutoAttack is
packaged as ``pyautoattack``, so it is aliased as ``autoattack`` before robustbench is
imported. Only ``robustbench.utils.load_model`` is used: robustkit runs the protocol itself.
The zoo downloads weights (Google Drive, Hugging Face) on first use and needs network access;
a file already at ``<model_dir>/<dataset>/<threat_model>/<name>.pt`` is used offline.
"""

from __future__ import annotations

import contextlib
import difflib
import importlib
import importlib.util
import io
import logging
import os
import socket
import sys
import urllib.error
import warnings
from pathlib import Path
from types import ModuleType
from typing import Literal

from torch import nn

from robustkit.errors import ModelError

__all__ = ["load_zoo_model", "default_model_dir"]

logger = logging.getLogger(__name__)

# RobustBench's datasets; the shipped CIFAR-10 sample is the first CIFAR-10 test images.
_ZOO_DATASETS = {"cifar10": "cifar10", "sample-cifar10": "cifar10", "cifar100": "cifar100",
                 "imagenet": "imagenet"}
_THREAT_MODELS = ("Linf", "L2", "corruptions")


def default_model_dir() -> Path:
    """``$ROBUSTKIT_ZOO_DIR``, else ``~/.cache/robustkit/robustbench`` (never the working tree)."""
    env = os.environ.get("ROBUSTKIT_ZOO_DIR")
    return Path(env) if env else Path.home() / ".cache" / "robustkit" / "robustbench"


def _import_robustbench() -> ModuleType:
    """Import robustbench, first aliasing ``pyautoattack`` as ``autoattack`` when needed."""
    if importlib.util.find_spec("autoattack") is None:
        import pyautoattack
        import pyautoattack.state

        sys.modules.setdefault("autoattack", pyautoattack)
        sys.modules.setdefault("autoattack.state", pyautoattack.state)
    with warnings.catch_warnings():
        # robustbench imports pkg_resources and timm uses torch.jit.interface: both only warn
        # about their own deprecations, which a robustkit user cannot act on.
        warnings.simplefilter("ignore", DeprecationWarning)
        warnings.simplefilter("ignore", FutureWarning)
        warnings.filterwarnings("ignore", message="pkg_resources is deprecated")
        try:
            robustbench = importlib.import_module("robustbench")
            importlib.import_module("robustbench.utils")
        except ImportError as err:
            raise ModelError(
                f"robustbench:<name> models need robustbench==1.1.1 with setuptools<81 "
                f"(pip install --no-deps robustbench==1.1.1): {err}"
            ) from err
    return robustbench


def _network_error_types() -> tuple[type[BaseException], ...]:
    types: list[type[BaseException]] = [
        ConnectionError, TimeoutError, socket.gaierror, socket.timeout, urllib.error.URLError,
    ]
    with contextlib.suppress(ImportError):
        import requests

        types += [requests.exceptions.ConnectionError, requests.exceptions.Timeout]
    with contextlib.suppress(ImportError):
        from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

        types += [LocalEntryNotFoundError, OfflineModeIsEnabled]
    return tuple(types)


def _is_network_error(err: BaseException) -> bool:
    """True when ``err`` or anything in its cause/context chain is a connection failure."""
    types, seen = _network_error_types(), set()
    current: BaseException | None = err
    while current is not None and id(current) not in seen:
        if isinstance(current, types):
            return True
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return False


def load_zoo_model(
    name: str,
    *,
    dataset: str | None,
    threat_model: Literal["Linf", "L2", "corruptions"] = "Linf",
    model_dir: str | Path | None = None,
) -> nn.Module:
    """Fetch a RobustBench zoo model (weights downloaded once into ``model_dir``), in eval mode.

    Croce et al., "RobustBench: a standardized adversarial robustness benchmark", NeurIPS
    2021 Datasets and Benchmarks, https://arxiv.org/abs/2010.09670. Zoo models take [0, 1]
    inputs and normalise inside, like robustkit's.

    Args:
        name: the zoo's model name, e.g. ``"Carmon2019Unlabeled"`` or ``"Standard"``.
        dataset: ``"cifar10"`` (or ``"sample-cifar10"``), ``"cifar100"`` or ``"imagenet"``.
        threat_model: ``"Linf"``, ``"L2"`` or ``"corruptions"``. Default ``"Linf"``.
        model_dir: download folder. Default ``default_model_dir()``.

    Raises:
        ModelError: no dataset or one the zoo lacks, unknown name (close names suggested),
            robustbench not importable, or no network access to download the weights.

    Example:
        >>> model = load_zoo_model("Standard", dataset="cifar10", threat_model="Linf")
        >>> logits = model(torch.rand(2, 3, 32, 32))
    """
    if not name:
        raise ModelError("robustbench:<name> needs a model name, e.g. robustbench:Standard")
    if dataset is None or dataset not in _ZOO_DATASETS:
        raise ModelError(
            f"robustbench:{name}: the RobustBench zoo has models for "
            f"{', '.join(sorted(set(_ZOO_DATASETS.values())))}, not dataset={dataset!r}"
        )
    if threat_model not in _THREAT_MODELS:
        raise ModelError(f"robustbench:{name}: threat_model must be one of "
                         f"{', '.join(_THREAT_MODELS)}, got {threat_model!r}")
    zoo_dataset = _ZOO_DATASETS[dataset]
    robustbench = _import_robustbench()
    from robustbench.model_zoo import model_dicts
    from robustbench.model_zoo.enums import BenchmarkDataset, ThreatModel

    known = model_dicts[BenchmarkDataset(zoo_dataset)][ThreatModel(threat_model)]
    if name not in known:
        close = difflib.get_close_matches(name, list(known), n=5, cutoff=0.5)
        hint = f"; close names: {', '.join(close)}" if close else ""
        raise ModelError(f"robustbench:{name} is not in the zoo for {zoo_dataset}/{threat_model} "
                         f"({len(known)} models{hint})")
    folder = Path(model_dir) if model_dir is not None else default_model_dir()
    captured = io.StringIO()
    try:
        # robustbench prints "Downloading ..." itself; the library stays quiet and logs it.
        with contextlib.redirect_stdout(captured):
            model = robustbench.utils.load_model(
                model_name=name, model_dir=str(folder), dataset=zoo_dataset,
                threat_model=threat_model,
            )
    except Exception as err:
        if not _is_network_error(err):
            raise
        target = folder / zoo_dataset / threat_model / f"{name}.pt"
        raise ModelError(
            f"robustbench:{name}: the RobustBench model zoo needs network access to download "
            f"the weights, and the download failed ({type(err).__name__}). Run once with "
            f"network access, or copy the weights file to {target}."
        ) from err
    finally:
        if captured.getvalue().strip():
            logger.info("robustbench: %s", captured.getvalue().strip())
    return model.eval()
