"""SAGR's fast double backward (issue #21) against the plain implementation it replaced.

``reference_sagr`` below is the pre-#21 ``sagr_terms``, written out plainly here (no import of the
library's helpers): one forward, one ``create_graph`` input-gradient product per row, PyTorch's own
double backward. The library's default path (``fast_conv=True``) reroutes ``conv2d`` and ``relu``
through hand-written exact backward formulas; the loss must be the same and the parameter
gradients equal to float rounding, on the default settings and on non-degenerate ones (a± != b±,
λ != 1, both signs in the gradients, stride/padding/dilation/groups, BatchNorm and dropout in
train mode, the CE and regulariser gradients compared separately).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from robustkit.models import create_model
from robustkit.objectives import TrainContext
from robustkit.objectives.sagr import SAGR, TERMS, sagr_terms

torch.set_num_threads(1)


# ------------------------------------------------------------------ the plain reference
def reference_sagr(model, x, y, a_pos=0.1, a_neg=1.0, b_pos=2.0, b_neg=1.0,
                   false_classes="aggregate", top_m=2, grad_of="logit"):
    """Per-sample R (methods.md §5.3) and the logits, with PyTorch's own double backward."""
    x = x.detach().clone().requires_grad_(True)
    z = model(x)
    s = z if grad_of == "logit" else F.log_softmax(z, dim=1)
    n, k = z.shape

    def grad_row(w):
        (g,) = torch.autograd.grad(s, x, grad_outputs=w, create_graph=True)
        return g.reshape(n, -1)

    def pos_neg(g):
        return (torch.where(g > 0, g, 0.0) ** 2).sum(1), (torch.where(g < 0, g, 0.0) ** 2).sum(1)

    onehot = torch.zeros(n, k)
    onehot[torch.arange(n), y] = 1.0
    p, m = pos_neg(grad_row(onehot))
    r = a_pos * p + a_neg * m
    zd = z.detach()
    q = torch.zeros(n, k)  # q_k = p_k / (1 - p_y) over k != y, as a loop
    for i in range(n):
        e = torch.exp(zd[i] - zd[i].max())
        e[y[i]] = 0.0
        q[i] = e / e.sum()
    if false_classes == "aggregate":
        fp, fm = pos_neg(grad_row(q))
        return r + b_pos * fp + b_neg * fm, z
    for i_row in range(top_m if false_classes == "topM" else k - 1):
        w = torch.zeros(n, k)
        weight = torch.ones(n)
        for i in range(n):
            others = [c for c in range(k) if c != int(y[i])]
            if false_classes == "topM":
                order = sorted(others, key=lambda c: -float(zd[i, c]))
                c = order[i_row]
                weight[i] = q[i, c]
            else:
                c = (int(y[i]) + 1 + i_row) % k
            w[i, c] = 1.0
        fp, fm = pos_neg(grad_row(w))
        r = r + weight * (b_pos * fp + b_neg * fm)
    return r, z


# ------------------------------------------------------------------ models
class OddConvNet(nn.Module):
    """stride 2, padding, dilation, groups, no bias, BatchNorm, F.relu, F.conv2d with keywords,
    a string padding (PyTorch's own path) and an in-place ReLU (not rerouted)."""

    def __init__(self, k=5):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=2, dilation=2, groups=2, bias=False)
        self.w3 = nn.Parameter(torch.randn(6, 8, 3, 3) * 0.2)
        self.c4 = nn.Conv2d(6, 6, 3, padding="same")
        self.fc = nn.Linear(6 * 4 * 4, k)

    def forward(self, x):
        h = F.relu(self.bn(self.c1(x)))
        h = torch.relu(self.c2(h))
        h = F.conv2d(h, self.w3, stride=(1, 1), padding=1)
        h = F.relu(self.c4(h), inplace=True)
        return self.fc(F.adaptive_avg_pool2d(h, 4).flatten(1))


def small_cnn(seed=0):
    torch.manual_seed(seed)
    model = create_model("small_cnn", 10, (0.1307,), (0.3081,), in_channels=1, input_size=28)
    # the reference's zero last layer makes R's gradient 0 at init: give every layer weights
    for p in model.parameters():
        nn.init.normal_(p, std=0.1 if p.dim() > 1 else 0.02)
    return model


def grads(model, fn, seed):
    """``fn()`` -> loss; the parameter gradients with the RNG (dropout) at ``seed``."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(seed)
    loss = fn()
    loss.backward()
    return loss.detach(), [p.grad.clone() if p.grad is not None else torch.zeros_like(p)
                           for p in model.parameters()]


def assert_close_grads(a, b, rtol=2e-5):
    """Each tensor within ``rtol`` of its own largest entry (or of 1e-3 x the largest of all:
    a bias in front of BatchNorm has a gradient that is 0 up to rounding)."""
    top = max(float(g.abs().max()) for g in a)
    assert top > 0
    for ga, gb in zip(a, b, strict=True):
        scale = max(float(ga.abs().max()), 1e-3 * top)
        assert float((ga - gb).abs().max()) <= rtol * scale, (ga - gb).abs().max() / scale


NONDEG = {"a_pos": 0.3, "a_neg": 1.7, "b_pos": 2.5, "b_neg": 0.6}


def mnist_batch(n=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)


# ------------------------------------------------------------------ tests
@pytest.mark.parametrize("train", [True, False])
@pytest.mark.parametrize("weights", [{}, NONDEG], ids=["default", "nondegenerate"])
def test_fast_sagr_equals_the_plain_reference_on_smallcnn(train, weights):
    model = small_cnn().train(train)
    x, y = mnist_batch()
    lam = 1.0 if not weights else 3.7

    def ref():
        r, z = reference_sagr(model, x, y, **weights)
        return F.cross_entropy(z, y) + lam * r.mean()

    def new():
        terms, z = sagr_terms(model, x, y, **weights)
        return F.cross_entropy(z, y) + lam * sum(terms[t] for t in TERMS).mean()

    def reg_only(fn):  # the regulariser's own gradient, not drowned by the CE's
        def f():
            if fn is ref:
                return reference_sagr(model, x, y, **weights)[0].mean()
            terms = sagr_terms(model, x, y, **weights)[0]
            return sum(terms[t] for t in TERMS).mean()
        return f

    l_ref, g_ref = grads(model, ref, seed=5)
    l_new, g_new = grads(model, new, seed=5)
    torch.testing.assert_close(l_new, l_ref, rtol=1e-6, atol=0)
    assert_close_grads(g_ref, g_new)
    r_ref, gr_ref = grads(model, reg_only(ref), seed=5)
    r_new, gr_new = grads(model, reg_only(new), seed=5)
    assert float(r_ref) > 0 and max(float(g.abs().max()) for g in gr_ref) > 0  # not vacuous
    torch.testing.assert_close(r_new, r_ref, rtol=1e-6, atol=0)
    assert_close_grads(gr_ref, gr_new)


def test_both_signs_and_all_four_terms_are_exercised():
    model = small_cnn()
    x, y = mnist_batch()
    terms, _ = sagr_terms(model, x, y, **NONDEG)
    for t in TERMS:
        assert float(terms[t].detach().min()) > 0, t


@pytest.mark.parametrize("false_classes,grad_of", [("aggregate", "log_prob"), ("topM", "logit"),
                                                   ("all", "logit")])
@pytest.mark.parametrize("train", [True, False])
def test_fast_sagr_equals_the_reference_on_odd_convolutions(false_classes, grad_of, train):
    torch.manual_seed(3)
    model = OddConvNet().train(train)
    g = torch.Generator().manual_seed(4)
    x, y = torch.rand(10, 3, 16, 16, generator=g), torch.randint(0, 5, (10,), generator=g)
    kw = dict(NONDEG, false_classes=false_classes, grad_of=grad_of, top_m=2)

    def ref():
        r, z = reference_sagr(model, x, y, **kw)
        return F.cross_entropy(z, y) + 2.5 * r.mean()

    def new():
        terms, z = sagr_terms(model, x, y, **kw)
        return F.cross_entropy(z, y) + 2.5 * sum(terms[t] for t in TERMS).mean()

    l_ref, g_ref = grads(model, ref, seed=0)
    l_new, g_new = grads(model, new, seed=0)
    torch.testing.assert_close(l_new, l_ref, rtol=1e-6, atol=0)
    assert_close_grads(g_ref, g_new, rtol=1e-4)


def test_the_fast_path_is_taken_and_can_be_switched_off():
    model = small_cnn()
    x, y = mnist_batch(8)

    def node_names(fast):
        terms, _ = sagr_terms(model, x, y, fast_conv=fast)
        seen, todo, names = set(), [terms["false_pos"].grad_fn], set()
        while todo:
            n = todo.pop()
            if n is None or n in seen:
                continue
            seen.add(n)
            names.add(type(n).__name__)
            todo.extend(nx for nx, _ in n.next_functions)
        return names

    fast, plain = node_names(True), node_names(False)
    assert "_ConvInputGradBackward" in fast and "_MaskGradBackward" in fast
    assert "_ConvInputGradBackward" not in plain and "ConvolutionBackwardBackward0" in plain


def test_objective_loss_and_gradients_match_the_reference_formula():
    model = small_cnn().train()
    x, y = mnist_batch(16)
    obj = SAGR(model, lam=2.0, **NONDEG)
    ctx = TrainContext(epoch=0, epochs=1, step=0)

    def ref():
        r, z = reference_sagr(model, x, y, **NONDEG)
        return F.cross_entropy(z, y) + 2.0 * r.mean()

    l_ref, g_ref = grads(model, ref, seed=9)
    l_new, g_new = grads(model, lambda: obj(x, y, ctx).loss, seed=9)
    torch.testing.assert_close(l_new, l_ref, rtol=1e-6, atol=0)
    assert_close_grads(g_ref, g_new)


def test_caller_tensors_untouched_and_autocast_falls_back():
    model = small_cnn().eval()
    x, y = mnist_batch(6)
    x0 = x.clone()
    terms, _ = sagr_terms(model, x, y)
    sum(terms.values()).sum().backward()
    assert not x.requires_grad and x.grad is None and torch.equal(x, x0)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        fast, _ = sagr_terms(model, x, y)
        plain, _ = sagr_terms(model, x, y, fast_conv=False)
    for t in TERMS:
        torch.testing.assert_close(fast[t], plain[t])


def test_a_conv_input_that_needs_its_gradient_later_gets_it():
    """The parameter backward skips only the gradient that would reach sagr_terms' private leaf:
    a parameter before the first convolution still gets its gradient."""

    class Pre(nn.Module):
        def __init__(self):
            super().__init__()
            self.scale = nn.Parameter(torch.tensor(1.3))
            self.net = small_cnn()

        def forward(self, x):
            return self.net(x * self.scale)

    torch.manual_seed(0)
    model = Pre().eval()
    x, y = mnist_batch(8)

    def ref():
        return reference_sagr(model, x, y, **NONDEG)[0].mean()

    def new():
        return sum(sagr_terms(model, x, y, **NONDEG)[0].values()).mean()

    _, g_ref = grads(model, ref, seed=0)
    _, g_new = grads(model, new, seed=0)
    assert float(g_ref[0].abs()) > 0
    assert_close_grads(g_ref, g_new)


def test_a_convolution_of_a_parameter_alone_keeps_its_input_gradient():
    """A conv whose input depends on parameters but not on x (a learned template): the walk
    that decides which input gradients the parameter backward may skip must not skip this one."""

    class Template(nn.Module):
        def __init__(self):
            super().__init__()
            self.template = nn.Parameter(torch.randn(1, 1, 28, 28) * 0.1)
            self.mix = nn.Conv2d(1, 1, 3, padding=1)
            self.net = small_cnn()

        def forward(self, x):
            # the template itself (a leaf) and a tensor computed from it (not a leaf)
            return self.net(x + self.mix(self.template) + self.mix(0.5 * self.template.flip(3)))

    torch.manual_seed(0)
    model = Template().eval()
    x, y = mnist_batch(8)

    def ref():
        r, z = reference_sagr(model, x, y, **NONDEG)
        return F.cross_entropy(z, y) + r.mean()

    def new():
        terms, z = sagr_terms(model, x, y, **NONDEG)
        return F.cross_entropy(z, y) + sum(terms.values()).mean()

    _, g_ref = grads(model, ref, seed=0)
    _, g_new = grads(model, new, seed=0)
    assert float(g_ref[0].abs().max()) > 0  # the template's gradient exists
    assert_close_grads(g_ref, g_new)
