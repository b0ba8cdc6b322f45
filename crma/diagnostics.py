"""Mixing diagnostics of an attached CRMA adapter: what the doubly stochastic matrices actually do.

Einsum letters: `l` layers, `i`/`j` streams.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .model import get_adapter
from .sinkhorn import sinkhorn


@dataclass
class LayerMixing:
    """Mixing diagnostics of one block: singular values, Sinkhorn error, distance from identity, gate."""

    index: int
    sigma1: float
    sigma2: float
    max_row_err: float
    max_col_err: float
    dist_from_identity: float
    alpha: float


@dataclass
class MixingReport:
    """Per-layer mixing diagnostics and the composite gain of the product of all layers' M."""

    layers: list[LayerMixing]
    composite_gain: float

    def summary(self) -> dict[str, float]:
        """Means over layers (worst case for the Sinkhorn error) and the composite gain."""
        n = len(self.layers)
        return {
            "sigma1_mean": sum(x.sigma1 for x in self.layers) / n,
            "sigma2_mean": sum(x.sigma2 for x in self.layers) / n,
            "max_rowcol_err": max(max(x.max_row_err, x.max_col_err) for x in self.layers),
            "dist_from_identity_mean": sum(x.dist_from_identity for x in self.layers) / n,
            "composite_gain": self.composite_gain,
            "alpha_mean": sum(x.alpha for x in self.layers) / n,
        }

    def to_dict(self) -> dict[str, Any]:
        """Plain-JSON dict."""
        return asdict(self)


@torch.no_grad()
def mixing_report(model: nn.Module, adapter_name: str | None = None) -> MixingReport:
    """Per layer: sigma1, sigma2, max row/column-sum error, ||M - I||_F, gate alpha; and the composite gain.

    sigma1 is 1 for every doubly stochastic M (it only says Sinkhorn converged); sigma2 says how much the streams
    mix (1: none or a permutation, 0: full averaging). The composite gain is max(max abs row sum, max abs column
    sum) of M_L ... M_1: at most 1 (+ Sinkhorn error) whatever the depth.
    """
    adapter = get_adapter(model, adapter_name)
    if adapter.config.mixing == "identity":
        mixes = adapter.mixing()[0].double().cpu()
    else:  # recomputed in float64: the report measures the mixing, not float32 round-off
        mixes = sinkhorn(adapter.crma_log_mix.double().cpu(), adapter.config.sinkhorn_iters)
    gates = adapter.gate().double().cpu()
    rows, product = [], None
    for index, m in enumerate(mixes.unbind(0)):
        sv = torch.linalg.svdvals(m)
        rows.append(
            LayerMixing(
                index=index,
                sigma1=sv[0].item(),
                sigma2=sv[1].item(),
                max_row_err=(m.sum(-1) - 1).abs().max().item(),
                max_col_err=(m.sum(-2) - 1).abs().max().item(),
                dist_from_identity=torch.linalg.matrix_norm(m - torch.eye(m.shape[0], dtype=m.dtype)).item(),
                alpha=gates[index].item(),
            )
        )
        product = m if product is None else m @ product
    gain = max(product.abs().sum(-1).max().item(), product.abs().sum(-2).max().item())
    return MixingReport(layers=rows, composite_gain=gain)
