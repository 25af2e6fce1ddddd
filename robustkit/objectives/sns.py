"""SNS: sensitive-neuron stabilisation (methods.md §4.3).

Zhang, Liu, Liu, Xu, Yu, Ma & Li, "Interpreting and Improving Adversarial Robustness of Deep
Neural Networks With Neuron Sensitivity", IEEE TIP 30, 2021 (https://arxiv.org/abs/1909.06978).
Only the idea is published ("constraining the similarities of sensitive neurons between benign
and adversarial examples"); the exact form below is methods.md's reconstruction [R].
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from robustkit import distributed as dist
from robustkit.attacks.base import Attack, AttackResult
from robustkit.objectives.base import ObjectiveOutput, TrainContext, detach_metrics
from robustkit.objectives.functional import (
    accuracy,
    attack_metrics,
    check_hparam,
    per_sample_kl,
)
from robustkit.objectives.pgd_objective import PGDObjective
from robustkit.objectives.schedules import gamma_t
from robustkit.sensitivity import FeatureTap, resolve_layers, top_k_neurons

__all__ = ["SNS", "default_layers", "neuron_distance", "batch_sensitivity"]

log = logging.getLogger(__name__)

Distance = Literal["l1", "l2", "cos", "relative_l1"]
_DISTANCES = ("l1", "l2", "cos", "relative_l1")
# Keeps 1 - cos finite for an all-zero map (a dead ReLU channel): cos is then 0.
_COS_EPS = 1e-8
# relative_l1: added to the (detached) ‖F(x)‖₁ of a sample, so all-zero clean features give a
# finite term (‖ΔF‖₁ / 1e-6) instead of a division by zero.
_REL_EPS = 1e-6
# methods.md §4.3's default step sizes of the two bases: PGD-AT (§2.1) and TRADES (§2.2).
_DEFAULT_ALPHA = {"pgd_at": 2 / 255, "trades": 0.007}


def default_layers(model: nn.Module) -> list[str]:
    """The layers SNS regularises when none are named (methods.md §4.3's table).

    In order: the last two of the sibling modules named ``layer<i>`` (ResNet-18 and
    PreActResNet-18: ``layer3``, ``layer4``); else of those named ``block<i>`` (WRN: ``block2``,
    ``block3``; ``cifar_cnn``: ``block3``, ``block4``, its last conv block); else the last two
    convolutions in model order (``small_cnn``: ``conv3``, ``conv4``, its last conv block).

    Raises:
        ValueError: the model has none of these (name the layers instead).
    """
    bare = dist.unwrap(model)
    names = [n for n, _ in bare.named_modules() if n]
    for stem in ("layer", "block"):
        groups: dict[str, list[tuple[int, str]]] = {}
        for name in names:
            parent, _, leaf = name.rpartition(".")
            match = re.fullmatch(rf"{stem}(\d+)", leaf)
            if match:
                groups.setdefault(parent, []).append((int(match.group(1)), name))
        if groups:  # the shallowest such family (a ResNet's stages, not anything inside them)
            parent = min(groups, key=lambda p: (p.count(".") if p else -1, p))
            return [name for _, name in sorted(groups[parent])[-2:]]
    convs = [n for n, m in bare.named_modules() if isinstance(m, nn.Conv1d | nn.Conv2d | nn.Conv3d)]
    if not convs:
        raise ValueError("layers=None: this model has no layer<i>/block<i> stages and no "
                         "convolution; name the regularised modules in layers")
    return convs[-2:]


def _rankable(sigma: Tensor) -> Tensor:
    """``sigma`` for ranking only: NaN/inf (an fp16 overflow of the features) become finite.

    The loss of such a batch is non-finite anyway, and the trainer skips or aborts that step
    (fp16 scale calibration, or ``NonFiniteLossError``); ``top_k_neurons`` refuses non-finite
    values, so without this the objective would raise before the trainer could decide.
    """
    if bool(torch.isfinite(sigma).all()):
        return sigma
    return torch.nan_to_num(sigma, nan=0.0, posinf=torch.finfo(sigma.dtype).max, neginf=0.0)


def _maps(feat: Tensor) -> Tensor:
    """``(N, C, ...)`` -> ``(N, C, H·W)``; a linear layer's ``(N, C)`` gets H·W = 1."""
    if feat.dtype in (torch.float16, torch.bfloat16):  # autocast: distances in float32 at least
        feat = feat.float()
    return feat.flatten(2) if feat.dim() > 2 else feat.unsqueeze(-1)


def neuron_distance(a: Tensor, b: Tensor, distance: Distance = "l1") -> Tensor:
    """Per-sample, per-neuron distance between two feature maps (methods.md §4.3).

    Args:
        a, b: features of the same layer on x and x', ``(N, C, H, W)`` or ``(N, C)``.
        distance: ``"l1"``: ``1/(HW)·‖F(x) − F(x')‖₁`` (per element, the paper-style σ);
            ``"l2"``: ``1/(HW)·‖F(x) − F(x')‖₂²`` (squared, per element); ``"cos"``:
            ``1 − cos(F(x), F(x'))`` over the H·W positions (an all-zero map has cos 0);
            ``"relative_l1"``: per sample n, ``‖F(x_n) − F(x'_n)‖₁ / (sg(‖F(x_n)‖₁) + 1e-6)``
            with both norms over all C channels and H·W positions passed in (``a`` is F(x),
            the reference) and ``sg`` stop-gradient; entry (n, c) is channel c's share
            ``C·‖F^c(x_n) − F^c(x'_n)‖₁ / (sg(‖F(x_n)‖₁) + 1e-6)``, so the mean over the
            channels is the sample's relative L1 (SNS then takes the mean over samples).
            Invariant to a common rescaling of the features, unlike ``"l1"``/``"l2"``.

    Shape: ``(N, C, ...) x 2 -> (N, C)``; gradients flow through both arguments (for
    ``"relative_l1"`` not through the denominator).
    """
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {tuple(a.shape)} and "
                         f"{tuple(b.shape)}")
    fa, fb = _maps(a), _maps(b)
    if distance == "l1":
        return (fa - fb).abs().mean(-1)
    if distance == "l2":
        return (fa - fb).pow(2).mean(-1)
    if distance == "cos":
        return 1 - F.cosine_similarity(fa, fb, dim=-1, eps=_COS_EPS)
    if distance == "relative_l1":
        norm = fa.detach().abs().sum(dim=(1, 2))  # sg(‖F(x_n)‖₁): (N,)
        return fa.shape[1] * (fa - fb).abs().sum(-1) / (norm + _REL_EPS)[:, None]
    raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")


def batch_sensitivity(a: Tensor, b: Tensor) -> Tensor:
    """σ of each neuron over one batch of pairs, detached: ``1/N Σ_n 1/(HW)‖F(x_n) − F(x'_n)‖₁``.

    The quantity ``robustkit.sensitivity`` calls σ (``reduction="elementwise"``), here on the
    features the training passes already computed (train mode), without a gradient.

    Shape: ``(N, C, ...) x 2 -> (C,)`` (float32, or float64 for float64 features).
    """
    with torch.no_grad():
        return (_maps(a.detach()) - _maps(b.detach())).abs().mean(-1).mean(0)


class SNS(PGDObjective):
    """Sensitive-neuron stabilisation: a base AT loss plus λ times the distance between the
    clean and adversarial behaviour of each layer's most sensitive neurons (methods.md §4.3).

    ``L = base + λ_t · mean_l (1/|S_l|) Σ_{m∈S_l} 1/N Σ_n d(F_l^m(x_n), F_l^m(x'_n))``, where
    ``base`` is ``CE(f(x'), y)`` (PGD-AT) or TRADES' ``CE(f(x), y) + β·KL(p(x) ‖ p(x'))``, ``d``
    one of :func:`neuron_distance`, and ``S_l`` the ``k = ceil(ratio · C_l)`` neurons of layer
    ``l`` with the largest σ (:func:`batch_sensitivity`, always the paper's per-element L1,
    whatever ``distance`` penalises). The layer terms are averaged, so λ does not grow with the
    number of layers. The clean and adversarial passes are separate train-mode forwards (as in
    TRADES: a joint ``[x; x']`` batch would mix their BatchNorm statistics); gradients flow
    through both feature branches, while x' itself is the attack's detached output.

    Choice of ``S_l`` (``topk``):

    - ``"online"`` (default [R]): from the same batch's features, under no-grad; no extra pass.
    - ``"epoch"``: fixed for a whole epoch. It is chosen at the epoch's first batch from σ
      averaged over every training pair of the previous epoch (the same train-mode features the
      loss computes, summed over ranks: no extra pass, unlike methods.md's 2,048-image probe
      set), or from that first batch's σ when there is no previous epoch. The running sums are
      in ``state_dict()``, so a resumed run picks the same sets.

    λ warm-up (``lam_warmup_epochs = k > 0``): ``λ_t = λ·min(1, t/k)`` at epoch t (from 0), so
    epoch 0 trains the base loss alone, epoch k - 1 uses ``(k-1)/k·λ`` and epoch k on the full λ
    (constant within an epoch; ``schedules.gamma_t`` with the ramp ``(0, k/T)``). The clean pass
    and ``loss/sns`` still run at ``λ_t = 0``; ``lam_t`` is logged. ``k = 0`` (default): λ always.

    With ``λ = 0`` and ``base="pgd_at"`` no clean pass runs and the objective is PGD-AT exactly
    (loss, gradients, BatchNorm statistics, RNG use); with ``base="trades"`` it is TRADES.

    Args:
        model: the trained module (may be a DDP wrapper; the attack and the feature hooks use
            the bare module).
        attack: perturbation generator; ``None`` builds the base's PGD: ``loss="ce"``, uniform
            start (PGD-AT) or ``loss="kl"``, start x + 0.001·N(0, I) (TRADES); last iterate.
        lam: weight λ of the stabilisation term (default 1.0 [R]; sweep 0.1, 0.3, 1, 3).
        layers: module names of the bare model (``"model.layer3"``); ``None``:
            :func:`default_layers`. Unknown names raise, listing the conv/linear layers.
        ratio: top-k ratio ρ, ``k = ceil(ρ·C_l)`` (default 0.1 [R]).
        distance: ``"l1"`` (default, methods.md [R]), ``"l2"`` (squared), ``"cos"`` (needs
            H·W > 1) or ``"relative_l1"`` (per sample ``‖ΔF‖₁ / sg(‖F(x)‖₁)`` over the layer's
            selected neurons, then the mean over samples; see :func:`neuron_distance`). L1 and
            L2 shrink with the features' scale, which a ReLU network can lower without changing
            its function: trained from scratch with λ = 1 on MNIST, L1 killed the features and
            accuracy stayed at chance; the shipped configs use ``"cos"``. ``"relative_l1"`` and
            ``"cos"`` are scale-free.
        lam_warmup_epochs: k, epochs over which λ ramps linearly from 0 (default 0: no ramp).
        topk: ``"online"`` (default) or ``"epoch"`` (see above).
        base: ``"pgd_at"`` (default) or ``"trades"``.
        beta: TRADES' KL weight (default 6.0; used only with ``base="trades"``).
        eps: L∞ budget in pixel units (default 8/255).
        alpha: step size; ``None``: the base's default (2/255 for PGD-AT, 0.007 for TRADES).
        steps: PGD steps (default 10).

    Metrics: the base's (``loss/ce_adv`` or ``loss/ce`` and ``loss/kl``, ``acc_adv``, attack
    metrics), ``acc_clean`` (PGD-AT base with a clean pass), ``loss/sns`` (the unweighted
    term), ``sigma/<layer>`` (the batch's mean σ over the layer's neurons) and, with a λ
    warm-up, ``lam_t``.

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the adversarial logits (PGD-AT base)
    or the clean logits (TRADES base), ``(N, K)``.

    Example:
        >>> objective = SNS(model, lam=1.0, layers=["model.layer3", "model.layer4"])
        >>> out = objective(x, y); out.loss.backward()
    """

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        lam: float = 1.0,
        layers: Sequence[str] | None = None,
        ratio: float = 0.1,
        distance: Distance = "l1",
        topk: Literal["online", "epoch"] = "online",
        base: Literal["pgd_at", "trades"] = "pgd_at",
        beta: float = 6.0,
        eps: float = 8 / 255,
        alpha: float | None = None,
        steps: int = 10,
        lam_warmup_epochs: float = 0,
    ) -> None:
        self.lam = check_hparam("lam", lam, 0.0)
        self.lam_warmup_epochs = check_hparam("lam_warmup_epochs", lam_warmup_epochs, 0.0)
        self.ratio = check_hparam("ratio", ratio, 0.0, 1.0, low_open=True)
        self.beta = check_hparam("beta", beta, 0.0)
        if distance not in _DISTANCES:
            raise ValueError(f"distance must be one of {_DISTANCES}, got {distance!r}")
        if topk not in ("online", "epoch"):
            raise ValueError(f"topk must be 'online' or 'epoch', got {topk!r}")
        if base not in _DEFAULT_ALPHA:
            raise ValueError(f"base must be 'pgd_at' or 'trades', got {base!r}")
        if isinstance(layers, str):
            raise ValueError(f"layers must be a list of module names or None, got {layers!r}")
        self.distance, self.topk, self.base = distance, topk, base
        if base == "trades":  # the TRADES inner maximisation (instance attributes: PGDObjective
            self.inner_loss, self.random_start = "kl", "normal"  # reads them when building PGD)
        alpha = _DEFAULT_ALPHA[base] if alpha is None else alpha
        self.layers = resolve_layers(model, default_layers(model) if layers is None
                                     else list(layers))
        super().__init__(model, attack, eps=eps, alpha=alpha, steps=steps)
        self._tap = FeatureTap(model, self.layers, detach=False)  # re-entered every batch
        self.selected: dict[str, Tensor] = {}  # S_l of the last batch (indices, most sensitive
        # first); in "epoch" mode also the fixed sets of the current epoch
        self._epoch: int | None = None  # "epoch" mode: the epoch whose σ is being summed
        self._sigma_sum: dict[str, Tensor] = {}  # float64 Σ over pairs of per-pair σ
        self._pairs = 0
        log.info("sns: layers %s, k = ceil(%g C_l), distance %s, top-k %s, base %s, lam %g, "
                 "lam warm-up %g epochs", self.layers, self.ratio, distance, topk, base, self.lam,
                 self.lam_warmup_epochs)

    def lam_at(self, epoch: int, epochs: int) -> float:
        """λ_t of epoch ``epoch`` (from 0) of ``epochs``: ``λ·min(1, epoch/k)``, or λ for k = 0."""
        if self.lam_warmup_epochs == 0:
            return self.lam
        return gamma_t(epoch, epochs, self.lam, (0.0, self.lam_warmup_epochs / epochs))

    # -- the loss ------------------------------------------------------------------------------
    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if adv is None:
            raise ValueError("SNS.loss needs the AttackResult of perturb()")
        x_adv = adv.x_adv
        metrics: dict[str, Tensor] = {}
        if self.lam == 0 and self.base == "pgd_at":  # PGD-AT exactly: no clean pass at all
            logits, logits_adv, reg = None, self.model(x_adv), None
        else:
            with self._tap as tap:  # two forwards: BN statistics of x and x' stay apart
                logits = self.model(x)
                clean = tap.take()
                logits_adv = self.model(x_adv)
                noisy = tap.take()
            reg = self._stabilisation(clean, noisy, ctx, metrics)
        if self.base == "pgd_at":
            ce = F.cross_entropy(logits_adv, y)
            loss, out_logits = ce, logits_adv
            metrics["loss/ce_adv"] = ce
            if logits is not None:
                metrics["acc_clean"] = accuracy(logits, y)
        else:
            ce = F.cross_entropy(logits, y)
            kl = per_sample_kl(logits, logits_adv).mean()
            loss, out_logits = ce + self.beta * kl, logits
            metrics.update({"loss/ce": ce, "loss/kl": kl})
        if reg is not None:
            metrics["loss/sns"] = reg
            lam = self.lam_at(ctx.epoch, ctx.epochs)
            if self.lam_warmup_epochs > 0:
                metrics["lam_t"] = torch.tensor(lam, device=loss.device)
            if lam > 0:  # λ = 0 adds nothing, not 0·reg (equal to the base bit for bit)
                loss = loss + lam * reg
        metrics.update({"acc_adv": accuracy(logits_adv, y), **attack_metrics(adv.info)})
        return ObjectiveOutput(loss, out_logits, detach_metrics(metrics))

    def _stabilisation(self, clean: dict[str, Tensor], noisy: dict[str, Tensor],
                       ctx: TrainContext, metrics: dict[str, Tensor]) -> Tensor:
        """``mean_l (1/|S_l|) Σ_{m∈S_l} mean_n d(F_l^m(x_n), F_l^m(x'_n))``; fills ``metrics``."""
        if self.topk == "epoch" and ctx.epoch != self._epoch:
            self._start_epoch(ctx.epoch, next(iter(clean.values())).device)
        terms = []
        finite_batch = True
        for name in self.layers:
            a, b = clean[name], noisy[name]
            if self.distance == "cos" and a[0, 0].numel() == 1:
                raise ValueError(f"distance='cos' needs feature maps with H·W > 1; layer {name} "
                                 f"gives {tuple(a.shape[1:])} (use 'l1' or 'l2' there)")
            sigma = batch_sensitivity(a, b)
            metrics[f"sigma/{name}"] = sigma.mean()
            finite = bool(torch.isfinite(sigma).all())
            finite_batch = finite_batch and finite
            if self.topk == "epoch":
                if finite:  # a broken batch's sigma would poison the whole next epoch's S_l
                    self._sigma_sum[name] = (self._sigma_sum.get(name, 0)
                                             + sigma.double() * a.shape[0])
                idx = self.selected.get(name)
                if idx is None:  # no previous epoch: this first batch decides (all ranks')
                    idx = self.selected[name] = top_k_neurons(
                        _rankable(dist.all_reduce_mean(sigma)), self.ratio)
            else:
                idx = self.selected[name] = top_k_neurons(_rankable(sigma), self.ratio)
            terms.append(neuron_distance(a[:, idx], b[:, idx], self.distance).mean())
        if self.topk == "epoch" and finite_batch:
            self._pairs += next(iter(clean.values())).shape[0]
        return torch.stack(terms).mean()

    def _start_epoch(self, epoch: int, device: torch.device) -> None:
        """``"epoch"`` mode: fix S_l from the previous epoch's σ (summed over ranks)."""
        self.selected = {}
        if self._pairs > 0 and self._sigma_sum:
            pairs = dist.all_reduce_sum(torch.tensor(float(self._pairs), device=device))
            for name in self.layers:  # on the device: NCCL reduces CUDA tensors only
                sigma = dist.all_reduce_sum(self._sigma_sum[name].to(device)) / pairs
                self.selected[name] = top_k_neurons(sigma, self.ratio)
        self._epoch, self._sigma_sum, self._pairs = epoch, {}, 0

    # -- resume --------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Tensor]:
        """``"epoch"`` mode: the epoch being summed, its pair count and σ sums (CPU tensors)."""
        if self.topk != "epoch" or self._epoch is None:
            return {}
        state = {"epoch": torch.tensor(self._epoch), "pairs": torch.tensor(self._pairs)}
        state.update({f"sigma_sum/{k}": v.detach().cpu().clone()
                      for k, v in self._sigma_sum.items()})
        return state

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if not state:
            return
        if self.topk != "epoch":
            raise ValueError(f"SNS(topk={self.topk!r}) has no state, got keys {sorted(state)}")
        want = {"epoch", "pairs", *(f"sigma_sum/{k}" for k in self.layers)}
        if set(state) != want:
            raise ValueError(f"SNS state: expected keys {sorted(want)}, got {sorted(state)}")
        sums = {k: state[f"sigma_sum/{k}"].double() for k in self.layers}
        bad = [k for k, v in sums.items() if v.dim() != 1 or v.numel() == 0]
        if bad:
            raise ValueError(f"SNS state: sigma_sum of {bad} must be (C,) tensors")
        self._epoch, self._pairs = int(state["epoch"]), int(state["pairs"])
        self._sigma_sum, self.selected = sums, {}

    def __repr__(self) -> str:
        return (f"SNS(lam={self.lam}, layers={self.layers}, ratio={self.ratio}, k=ceil(ratio*C), "
                f"distance={self.distance!r}, topk={self.topk!r}, base={self.base!r}, "
                f"lam_warmup_epochs={self.lam_warmup_epochs:g}, attack={self.attack!r})")

