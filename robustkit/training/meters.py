"""Per-epoch meters of the trainer, reduced across ranks."""

from __future__ import annotations

import torch
from torch import Tensor

from robustkit import distributed as dist

__all__ = ["Meters"]


class Meters:
    """Per-epoch sums of 0-dim values (kept on the device: no sync per batch) and (N,) values."""

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.counts: dict[str, int] = {}
        self.hists: dict[str, list[Tensor]] = {}
        self.images = 0

    def add(self, scalars: dict[str, Tensor], metrics: dict[str, Tensor], n: int) -> None:
        self.images += n
        for k, v in scalars.items():  # weighted by the batch size: a mean over samples
            self.sums[k] = self.sums.get(k, 0) + v * n
            self.counts[k] = self.counts.get(k, 0) + n
        for k, v in metrics.items():
            if v.dim() == 1:
                self.hists.setdefault(k, []).append(v.detach().float())

    def reduce(self, device: torch.device) -> tuple[dict[str, float], float, dict[str, Tensor]]:
        """Means over every rank's samples, the total image count and the gathered histograms."""
        # Ranks may (rarely) report different keys; a collective needs the same ones everywhere.
        keys = sorted(set().union(*dist.all_gather_object(sorted(self.sums))))
        zero = torch.zeros((), device=device)
        sums = [torch.as_tensor(self.sums.get(k, zero), device=device).double() for k in keys]
        counts = [float(self.counts.get(k, 0)) for k in keys] + [float(self.images)]
        counts_t = torch.tensor(counts, device=device, dtype=torch.float64)
        total = dist.all_reduce_sum(torch.cat([torch.stack(sums + [zero.double()]), counts_t]))
        m = len(keys) + 1
        s, c = total[:m].tolist(), total[m:].tolist()
        means = {k: s[i] / c[i] if c[i] > 0 else float("nan") for i, k in enumerate(keys)}
        hkeys = sorted(set().union(*dist.all_gather_object(sorted(self.hists))))
        hists = {
            k: dist.all_gather_cat(
                torch.cat(self.hists[k]) if k in self.hists else zero.new_zeros(0)
            ).cpu()
            for k in hkeys
        }
        return means, c[-1], hists
