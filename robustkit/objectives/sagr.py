"""SAGR: saliency-aware gradient regularisation, a reconstruction [R] (methods.md §5.3).

Li, Hu, Lin, Wu & Shen, "Revisiting Gradient Regularization: Inject Robust Saliency-Aware Weight
Bias for Adversarial Defense", IEEE TIFS 2023 (https://doi.org/10.1109/TIFS.2023.3289000). Only
the abstract is known; the regulariser below is methods.md's reconstruction of it:

    R(x, y) = a₊‖[g_y]₊‖² + a₋‖[g_y]₋‖² + b₊‖[g_F]₊‖² + b₋‖[g_F]₋‖²,
    g_y = ∇ₓ z_y,   g_F = ∇ₓ Σ_{k≠y} q_k z_k,   q_k = p_k / (1 - p_y)  (detached),

``[u]₊ = max(u, 0)``, ``[u]₋ = max(-u, 0)`` element-wise, and ``L = CE + λ·mean_i R(x_i, y_i)``.
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from robustkit.attacks.base import Attack, AttackResult
from robustkit.objectives.base import Objective, ObjectiveOutput, TrainContext, detach_metrics
from robustkit.objectives.functional import accuracy, attack_metrics, build_pgd, check_hparam

__all__ = ["SAGR", "sagr_terms", "TERMS"]

FalseClasses = Literal["aggregate", "topM", "all"]
GradOf = Literal["logit", "log_prob"]
_FALSE_CLASSES = ("aggregate", "topM", "all")
_GRAD_OF = ("logit", "log_prob")
#: the four weighted terms of R, in the order of the formula; their sum is R
TERMS = ("true_pos", "true_neg", "false_pos", "false_neg")


# ------------------------------------------------------------------ fast double backward
# SAGR's parameter gradient runs autograd *through* the input-gradient products (a double
# backward). For a convolution, PyTorch's generic double backward (``_convolution_double_backward``)
# computes the weight part as a convolution of the batch-transposed tensors, a 24 x 24 "kernel" on
# the SmallCNN's conv2 that oneDNN runs about 4x slower than the ordinary weight gradient; that
# one kernel was a quarter of a SAGR step (issue #21's profile). Inside ``sagr_terms`` every
# ``torch.conv2d`` call (``nn.Conv2d`` included) is therefore routed through ``_Conv2d``, whose
# input-gradient product ``_ConvInputGrad`` has a hand-written, exact backward: the adjoint of
# "input gradient" is the forward convolution, and its weight part is the ordinary weight
# gradient ``convolution_backward(gO, ggI, W)`` (since <ggI, conv^T(gO, W)> = <conv(ggI, W), gO>).
# ReLUs likewise skip the zero tensors PyTorch sends back for the mask's derivative (``_Relu``).
# Same maths, other kernels: the loss is bit-identical and the parameter gradients agree to float
# rounding (tests/test_sagr_fast.py pins both against the plain implementation). Anything else
# (autocast, string padding, other ranks, dtypes that differ) takes PyTorch's own path.


class _Phase:
    """Shared by one ``sagr_terms`` call and the graph nodes it creates: ``vjp`` is True while
    its own input-gradient products run (then only input gradients are wanted); ``leaf`` is its
    private input leaf, whose gradient nobody reads afterwards."""

    __slots__ = ("vjp", "leaf")

    def __init__(self, leaf: Tensor) -> None:
        self.vjp = False
        self.leaf = leaf


def _conv_backward(g_out: Tensor, inp: Tensor, weight: Tensor, conf: tuple,
                   mask: list[bool]) -> tuple[Tensor | None, ...]:
    stride, padding, dilation, groups = conf
    return torch.ops.aten.convolution_backward(g_out, inp, weight, None, stride, padding,
                                               dilation, False, [0] * len(stride), groups, mask)


class _ConvInputGrad(torch.autograd.Function):
    """``∂⟨g_out, conv(x, W)⟩/∂x`` as a function of ``(g_out, W)`` (it does not depend on x's
    values), with the exact, fast backward described above."""

    @staticmethod
    def forward(ctx, g_out: Tensor, weight: Tensor, inp: Tensor, conf: tuple) -> Tensor:
        ctx.save_for_backward(g_out, weight)
        ctx.conf = conf
        return _conv_backward(g_out, inp, weight, conf, [True, False, False])[0]

    @staticmethod
    def backward(ctx, gg: Tensor):
        g_out, weight = ctx.saved_tensors
        conf = ctx.conf
        d_out = d_w = None
        if ctx.needs_input_grad[0]:
            stride, padding, dilation, groups = conf
            d_out = F.conv2d(gg, weight, None, stride, padding, dilation, groups)
        if ctx.needs_input_grad[1]:
            d_w = _conv_backward(g_out, gg, weight, conf, [False, True, False])[1]
        return d_out, d_w, None, None


def _needs_input_grad_later(t: Tensor, leaf: Tensor, limit: int = 64) -> bool:
    """Whether the parameter backward needs the gradient of ``t``: True when its graph reaches a
    leaf other than ``leaf`` (a parameter) or is too big to walk (``limit`` nodes)."""
    if t.grad_fn is None:  # a leaf itself: a parameter (or the caller's tensor) unless ours
        return t is not leaf
    todo, seen = [t.grad_fn], set()
    while todo:
        node = todo.pop()
        if node is None or node in seen:
            continue
        seen.add(node)
        if len(seen) > limit:
            return True
        var = getattr(node, "variable", None)  # AccumulateGrad
        if var is not None and var is not leaf:
            return True
        todo.extend(nxt for nxt, _ in node.next_functions)
    return False


class _Conv2d(torch.autograd.Function):
    """``F.conv2d`` whose backward, during ``sagr_terms``' products, builds ``_ConvInputGrad``
    nodes; in the later parameter backward it is the ordinary ``convolution_backward`` (the
    input gradient skipped where only ``sagr_terms``' private leaf would receive it)."""

    @staticmethod
    def forward(ctx, inp: Tensor, weight: Tensor, bias: Tensor | None, conf: tuple,
                phase: _Phase) -> Tensor:
        ctx.save_for_backward(inp, weight)
        ctx.conf, ctx.phase, ctx.has_bias = conf, phase, bias is not None
        ctx.input_later = inp.requires_grad and _needs_input_grad_later(inp, phase.leaf)
        stride, padding, dilation, groups = conf
        return F.conv2d(inp, weight, bias, stride, padding, dilation, groups)

    @staticmethod
    def backward(ctx, g_out: Tensor):
        inp, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        if ctx.phase.vjp:  # one of sagr_terms' products: only the input gradient, with a graph
            g_in = _ConvInputGrad.apply(g_out, weight, inp, ctx.conf) if need[0] else None
            return g_in, None, None, None, None
        mask = [need[0] and ctx.input_later, need[1], need[2] and ctx.has_bias]
        g_in, g_w, g_b = _conv_backward(g_out, inp, weight, ctx.conf, mask)
        return g_in, g_w, g_b, None, None


class _MaskGrad(torch.autograd.Function):
    """``g·[out > 0]`` with ``out`` a constant: ReLU's input gradient. PyTorch's double backward
    of ``threshold_backward`` also sends a zero tensor of the activation's size back into the
    forward graph (the mask's own derivative); this one sends nothing, which is the same sum."""

    @staticmethod
    def forward(ctx, g: Tensor, out: Tensor) -> Tensor:
        ctx.save_for_backward(out)
        return torch.ops.aten.threshold_backward(g, out, 0)

    @staticmethod
    def backward(ctx, gg: Tensor):
        (out,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(gg, out, 0), None


class _Relu(torch.autograd.Function):
    """``torch.relu`` whose input-gradient product, during ``sagr_terms``, is a ``_MaskGrad``."""

    @staticmethod
    def forward(ctx, inp: Tensor, phase: _Phase) -> Tensor:
        out = torch.relu(inp)
        ctx.save_for_backward(out)
        ctx.phase = phase
        return out

    @staticmethod
    def backward(ctx, g_out: Tensor):
        (out,) = ctx.saved_tensors
        if ctx.phase.vjp:
            return _MaskGrad.apply(g_out, out.detach()), None
        return torch.ops.aten.threshold_backward(g_out, out, 0), None


def _pair(v) -> list[int] | None:
    if isinstance(v, int) and not isinstance(v, bool):
        return [v, v]
    if isinstance(v, (tuple, list)) and len(v) == 2 and all(isinstance(i, int) for i in v):
        return list(v)
    return None


class _FastConv(TorchFunctionMode):
    """Routes ``torch.conv2d`` through ``_Conv2d`` and ``torch.relu`` (``nn.ReLU``, ``F.relu``)
    through ``_Relu`` where it can; everything else unchanged."""

    _ARGS = ("bias", "stride", "padding", "dilation", "groups")
    _DEFAULTS = (None, 1, 0, 1, 1)

    def __init__(self, phase: _Phase) -> None:
        super().__init__()
        self.phase = phase

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.relu or func is F.relu:  # nn.ReLU calls F.relu(x, inplace=...)
            inplace = (args[1] if len(args) > 1 else kwargs.get("inplace", False)) \
                if func is F.relu else False
            if (len(args) >= 1 and set(kwargs) <= {"inplace"} and not inplace
                    and torch.is_grad_enabled() and isinstance(args[0], Tensor)
                    and args[0].is_floating_point()):
                return _Relu.apply(args[0], self.phase)
        if func is torch.conv2d and len(args) >= 2 and torch.is_grad_enabled():
            inp, weight = args[0], args[1]
            vals = list(args[2:]) + [kwargs.get(k, d) for k, d in
                                     zip(self._ARGS[len(args) - 2:],
                                         self._DEFAULTS[len(args) - 2:], strict=True)]
            bias, stride, padding, dilation, groups = vals
            conf = (_pair(stride), _pair(padding), _pair(dilation), groups)
            if (len(kwargs.keys() - set(self._ARGS)) == 0 and None not in conf[:3]
                    and isinstance(groups, int) and isinstance(inp, Tensor) and inp.dim() == 4
                    and inp.dtype == weight.dtype and inp.is_floating_point()
                    and (bias is None or bias.dtype == inp.dtype)
                    and not torch.is_autocast_enabled(inp.device.type)):
                return _Conv2d.apply(inp, weight, bias, conf, self.phase)
        return func(*args, **kwargs)


def _sq_parts(g: Tensor) -> tuple[Tensor, Tensor]:
    """``(‖[g]₊‖², ‖[g]₋‖²)`` per sample of a flattened ``(N, D)`` gradient."""
    return g.clamp_min(0).pow(2).sum(1), g.clamp_max(0).pow(2).sum(1)


def sagr_terms(
    model: nn.Module,
    x: Tensor,
    y: Tensor,
    *,
    a_pos: float = 0.1,
    a_neg: float = 1.0,
    b_pos: float = 2.0,
    b_neg: float = 1.0,
    false_classes: FalseClasses = "aggregate",
    top_m: int = 2,
    grad_of: GradOf = "logit",
    fast_conv: bool = True,
) -> tuple[dict[str, Tensor], Tensor]:
    """The four weighted per-sample terms of ``R_SAGR`` (methods.md §5.3), with their graphs.

    Every gradient is an input gradient of a *sum over the batch* (so per sample) taken with
    ``create_graph=True``, so ``R`` trains the parameters (per sample exactly in eval mode;
    BatchNorm in train mode couples the batch). ``q`` and the top-M choice are detached.
    ``false_classes`` picks the false-class part:

    - ``"aggregate"``: ``g_F = ∇ₓ Σ_{k≠y} q_k s_k`` (2 vector–Jacobian products in all);
    - ``"topM"``: the ``top_m`` false classes with the largest logits, each row ``g_k`` penalised
      separately and weighted by its ``q_k``: ``Σ_k q_k (b₊‖[g_k]₊‖² + b₋‖[g_k]₋‖²)``
      (M + 1 products; M is capped at K - 1);
    - ``"all"``: every false row with weight 1 (K products). With ``a± = b± = 1``,
      ``R = Σ_k ‖g_k‖² = ‖J‖²_F`` exactly (``[u]₊² + [u]₋² = u²``): the reduction to JR.

    Args:
        model: maps ``(N, ...)`` to logits ``(N, K)``; used in its current mode.
        x: inputs (pixel units), never marked as requiring grad; y: ``(N,)`` labels.
        a_pos, a_neg: weights of the positive / negative parts of the true-class gradient.
        b_pos, b_neg: weights of the positive / negative parts of the false-class gradient.
        false_classes: ``"aggregate"`` (default), ``"topM"`` or ``"all"``.
        top_m: M of ``"topM"`` (default 2).
        grad_of: ``"logit"`` (``s = z``, default) or ``"log_prob"`` (``s = log p``).
        fast_conv: route the model's ``conv2d`` calls through an exact, faster double backward
            (default True; the same loss, parameter gradients equal to float rounding; see
            ``_ConvInputGrad``). False: PyTorch's own double backward throughout.

    Shape: returns ``({term: (N,)} for term in TERMS, logits (N, K))``.
    """
    if false_classes not in _FALSE_CLASSES:
        raise ValueError(f"false_classes must be one of {list(_FALSE_CLASSES)}, "
                         f"got {false_classes!r}")
    if grad_of not in _GRAD_OF:
        raise ValueError(f"grad_of must be one of {list(_GRAD_OF)}, got {grad_of!r}")
    x = x.detach().requires_grad_(True)  # a new leaf: the caller's x and x.grad stay untouched
    phase = _Phase(x)
    with torch.enable_grad():
        if fast_conv:
            with _FastConv(phase):
                z = model(x)
        else:
            z = model(x)
        s = z if grad_of == "logit" else F.log_softmax(z, dim=1)
        n, k = z.shape
        true = F.one_hot(y, k).to(dtype=z.dtype)

        def row(w: Tensor) -> Tensor:
            """``∇ₓ Σ_i Σ_k w_ik s_ik`` flattened to ``(N, D)``, keeping the graph."""
            phase.vjp = True
            try:
                (g,) = torch.autograd.grad(s, x, grad_outputs=w, create_graph=True)
            finally:
                phase.vjp = False
            return g.flatten(1)

        pos, neg = _sq_parts(row(true))
        terms = {"true_pos": a_pos * pos, "true_neg": a_neg * neg}
        zd = z.detach()
        # q_k = p_k / (1 - p_y) = softmax over the false logits: no 1 - p_y cancellation
        q = torch.softmax(zd.masked_fill(true.bool(), float("-inf")), dim=1)
        if false_classes == "aggregate":
            fpos, fneg = _sq_parts(row(q))
        else:
            fpos = fneg = z.new_zeros(n)
            if false_classes == "topM":
                picks = zd.masked_fill(true.bool(), float("-inf")).topk(min(top_m, k - 1), 1)
                classes = picks.indices.T
            else:  # every false class, y + 1, ..., y + K - 1 (mod K)
                classes = [(y + j) % k for j in range(1, k)]
            for c in classes:
                onehot = F.one_hot(c, k).to(dtype=z.dtype)
                w = (q * onehot).sum(1) if false_classes == "topM" else 1.0
                p_, n_ = _sq_parts(row(onehot))
                fpos, fneg = fpos + w * p_, fneg + w * n_
        terms["false_pos"], terms["false_neg"] = b_pos * fpos, b_neg * fneg
    return terms, z


class SAGR(Objective):
    """SAGR [R]: ``CE + λ·mean_i R_SAGR(x_i, y_i)`` (methods.md §5.3; see ``sagr_terms``).

    Li et al., IEEE TIFS 2023 (https://doi.org/10.1109/TIFS.2023.3289000), as reconstructed
    in methods.md: the positive true-class evidence is penalised lightly (``a₊ = 0.1``), the
    positive false-class evidence most (``b₊ = 2``). With ``adversarial=True`` (or an attack
    passed) it is SAGR+AT: ``CE(f(x'), y) + λ·mean_i R(x'_i, y_i)`` on the attack's x', and the
    adversarial logits are returned.

    Metrics: ``loss/ce`` (``loss/ce_adv`` with an attack), ``loss/sagr`` (mean R, before λ) and
    its four weighted terms ``loss/sagr_true_pos``, ``_true_neg``, ``_false_pos``,
    ``_false_neg`` (they sum to ``loss/sagr``); with an attack also ``acc_adv`` and the attack's
    ``steps_per_sample``, ``eps_mean``, ``frac_perturbed``.

    Args:
        model: the trained module (may be a DDP wrapper; the attack gets the bare module).
        attack: perturbation generator for SAGR+AT, or ``None``.
        lam: λ (default 1.0; methods.md suggests sweeping {0.1, 1, 10, 100}).
        a_pos, a_neg: true-class weights (defaults 0.1, 1.0).
        b_pos, b_neg: false-class weights (defaults 2.0, 1.0).
        false_classes: ``"aggregate"`` (default, 2 products), ``"topM"`` (the exact variant,
            M + 1 products) or ``"all"`` (K products; the JR reduction).
        top_m: M of ``"topM"`` (default 2).
        grad_of: ``"logit"`` (default, ``g_k = ∇ₓ z_k``) or ``"log_prob"`` (``∇ₓ log p_k``).
        adversarial: SAGR+AT. ``None`` (default): True exactly when ``attack`` is given; True
            without an attack builds ``PGD(eps, alpha, steps, loss="ce", random_start=True,
            select="last")`` on the bare module (Madry).
        eps: L∞ budget of that PGD in pixel units (default 8/255).
        alpha: its step size (default 2/255).
        steps: its iterations (default 10).

    Shape: ``x (N, C, H, W) in [0, 1]``, ``y (N,)``; returns the logits ``(N, K)`` of the
    regularised input (x, or x' for SAGR+AT).

    Attributes:
        fast_conv: ``sagr_terms``' exact, faster double backward (class default True; set
            False on an instance to run PyTorch's own, as ``benchmarks/`` does to compare).

    Example:
        >>> objective = SAGR(model, lam=1.0)
        >>> out = objective(x, y); out.loss.backward()
    """

    fast_conv: bool = True

    def __init__(
        self,
        model: nn.Module,
        attack: Attack | None = None,
        *,
        lam: float = 1.0,
        a_pos: float = 0.1,
        a_neg: float = 1.0,
        b_pos: float = 2.0,
        b_neg: float = 1.0,
        false_classes: FalseClasses = "aggregate",
        top_m: int = 2,
        grad_of: GradOf = "logit",
        adversarial: bool | None = None,
        eps: float = 8 / 255,
        alpha: float = 2 / 255,
        steps: int = 10,
    ) -> None:
        self.lam = check_hparam("lam", lam, 0.0)
        self.a_pos = check_hparam("a_pos", a_pos, 0.0)
        self.a_neg = check_hparam("a_neg", a_neg, 0.0)
        self.b_pos = check_hparam("b_pos", b_pos, 0.0)
        self.b_neg = check_hparam("b_neg", b_neg, 0.0)
        if false_classes not in _FALSE_CLASSES:
            raise ValueError(f"false_classes must be one of {list(_FALSE_CLASSES)}, "
                             f"got {false_classes!r}")
        self.false_classes = false_classes
        if isinstance(top_m, bool) or not isinstance(top_m, int) or top_m < 1:
            raise ValueError(f"top_m must be a positive int, got {top_m!r}")
        self.top_m = top_m
        if grad_of not in _GRAD_OF:
            raise ValueError(f"grad_of must be one of {list(_GRAD_OF)}, got {grad_of!r}")
        self.grad_of = grad_of
        if adversarial is None:
            adversarial = attack is not None
        if attack is not None and not adversarial:
            raise ValueError("adversarial=False but an attack was given: drop the attack, or set "
                             "adversarial=True for SAGR+AT")
        self.adversarial = bool(adversarial)
        self.eps = check_hparam("eps", eps, 0.0, 1.0)
        self.alpha = check_hparam("alpha", alpha, 0.0, low_open=True)
        self.steps = int(check_hparam("steps", steps, 1))
        if self.adversarial and attack is None:
            attack = build_pgd(model, eps=self.eps, alpha=self.alpha, steps=self.steps,
                               loss="ce", random_start=True)
        super().__init__(model, attack)

    def loss(
        self, x: Tensor, y: Tensor, adv: AttackResult | None, ctx: TrainContext
    ) -> ObjectiveOutput:
        if self.adversarial and adv is None:
            raise ValueError("SAGR+AT's loss needs the AttackResult of perturb()")
        x_in = x if adv is None else adv.x_adv
        terms, logits = sagr_terms(
            self.model, x_in, y, a_pos=self.a_pos, a_neg=self.a_neg, b_pos=self.b_pos,
            b_neg=self.b_neg, false_classes=self.false_classes, top_m=self.top_m,
            grad_of=self.grad_of, fast_conv=self.fast_conv)
        ce = F.cross_entropy(logits, y)
        reg = sum(terms[t] for t in TERMS).mean()
        loss = ce + self.lam * reg
        metrics = {"loss/ce" if adv is None else "loss/ce_adv": ce, "loss/sagr": reg,
                   **{f"loss/sagr_{t}": terms[t].mean() for t in TERMS}}
        if adv is not None:
            metrics.update(acc_adv=accuracy(logits, y), **attack_metrics(adv.info))
        return ObjectiveOutput(loss, logits, detach_metrics(metrics))

    def __repr__(self) -> str:
        return (f"SAGR(lam={self.lam:g}, a_pos={self.a_pos:g}, a_neg={self.a_neg:g}, "
                f"b_pos={self.b_pos:g}, b_neg={self.b_neg:g}, "
                f"false_classes={self.false_classes!r}, top_m={self.top_m}, "
                f"grad_of={self.grad_of!r}, attack={self.attack!r})")
