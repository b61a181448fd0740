"""Comparing a kernel's output with its torch reference, and saying where they differ."""

from __future__ import annotations

import torch

#: tolerance per output dtype: float32 differs only by the order-of-operations rounding of
#: log/cos/fma (a few ulp); 16-bit outputs are rounded once from float32 in both, so a
#: float32 difference at a rounding boundary can flip the last bit (one ulp).
ABS_FLOOR = {torch.float32: 2e-6, torch.bfloat16: 1e-4, torch.float16: 1e-5}
REL = {torch.float32: 4e-6, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


def where_differ(got: torch.Tensor, want: torch.Tensor, rel: float, abs_floor: float, show: int = 8) -> str:
    """Empty if every element is within ``abs_floor + rel * |want|``; else the first mismatches, one a line."""
    g, w = got.detach().float().cpu().reshape(-1), want.detach().float().cpu().reshape(-1)
    if g.shape != w.shape:
        return f"shapes differ: {tuple(got.shape)} vs {tuple(want.shape)}"
    bad = ((g - w).abs() > abs_floor + rel * w.abs()) | (g.isnan() != w.isnan())
    idx = bad.nonzero().flatten()
    if idx.numel() == 0:
        return ""
    lines = [f"{idx.numel()} of {w.numel()} elements differ (tol {abs_floor:g} + {rel:g}*|want|):"]
    for i in idx[:show].tolist():
        lines.append(f"  [{i}] got {g[i].item():.9g} want {w[i].item():.9g} diff {(g[i] - w[i]).item():.3g}")
    return "\n".join(lines)


def assert_matches(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None, label: str = "") -> None:
    """Assert kernel output ``got`` equals reference ``want`` within ``dtype``'s tolerance."""
    dtype = dtype or want.dtype
    report = where_differ(got, want, REL[dtype], ABS_FLOOR[dtype])
    assert not report, f"{label}\n{report}"
