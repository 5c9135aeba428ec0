"""What "same result" means: error statistics of a backend's images against the torch fp32 reference.

Tolerances (docs/backends.md): fp32 max abs <= 1e-5; fp16 max abs <= 5e-3 and mean abs <= 5e-4.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch

TOLERANCES: dict[str, tuple[float, float | None]] = {  # precision -> (max abs, mean abs or None)
    "fp32": (1e-5, None),
    "fp16": (5e-3, 5e-4),
    "bf16": (4e-2, 4e-3),  # fp16's bounds x 8, for bf16's 3 fewer mantissa bits
    "int8": (1.0, 2e-2),  # any value in [0, 1] per pixel, a few % on average: int8 is judged by its quality gate
}
TAIL_VALUES = (8.0, 6.0, 4.0, 3.0)  # norms far out in the prior's tails, where fp16 error and overflow grow


@dataclass(frozen=True)
class ParityReport:
    """Truthy when the candidate is within tolerance and finite."""

    precision: str
    samples: int
    max_abs: float
    mean_abs: float
    median_abs: float
    worst_sample: int
    nan_count: int
    inf_count: int

    @property
    def passed(self) -> bool:
        max_tol, mean_tol = TOLERANCES[self.precision]
        return (
            self.nan_count == 0
            and self.inf_count == 0
            and self.max_abs <= max_tol
            and (mean_tol is None or self.mean_abs <= mean_tol)
        )

    def __bool__(self) -> bool:
        return self.passed

    def as_dict(self) -> dict[str, float | int | str | bool]:
        return {**asdict(self), "passed": self.passed, "tolerance": list(TOLERANCES[self.precision])}

    def summary(self) -> str:
        max_tol, mean_tol = TOLERANCES[self.precision]
        limits = f"max<={max_tol:g}" + (f", mean<={mean_tol:g}" if mean_tol is not None else "")
        return (
            f"{'PASS' if self.passed else 'FAIL'} {self.precision}: max abs {self.max_abs:.3g}, mean abs "
            f"{self.mean_abs:.3g}, median {self.median_abs:.3g}, worst sample {self.worst_sample}, "
            f"NaN {self.nan_count}, Inf {self.inf_count} over {self.samples} samples ({limits})"
        )


def compare(reference: torch.Tensor, candidate: torch.Tensor, precision: str) -> ParityReport:
    """Error statistics of `candidate` against `reference`: images of the same latents, compared per sample."""
    if precision not in TOLERANCES:
        raise ValueError(f"unknown precision {precision!r}; known: {', '.join(TOLERANCES)}")
    ref = reference.detach().double().cpu().reshape(len(reference), -1)
    cand = candidate.detach().double().cpu().reshape(len(candidate), -1)
    if ref.shape != cand.shape:
        raise ValueError(f"shape mismatch: reference {tuple(reference.shape)}, candidate {tuple(candidate.shape)}")
    finite = torch.isfinite(cand)
    err = (cand - ref).abs().where(finite, torch.zeros((), dtype=torch.float64))
    per_sample = err.amax(dim=1)
    return ParityReport(
        precision=precision,
        samples=len(ref),
        max_abs=float(per_sample.max()) if len(ref) else 0.0,
        mean_abs=float(err.mean()) if len(ref) else 0.0,
        median_abs=float(err.median()) if len(ref) else 0.0,
        worst_sample=int(per_sample.argmax()) if len(ref) else -1,
        nan_count=int(torch.isnan(cand).sum()),
        inf_count=int(torch.isinf(cand).sum()),
    )


def tail_latents(z_dim: int) -> torch.Tensor:
    """float32 [8 * (z_dim + 1), z_dim]: points at norm |z| = each of TAIL_VALUES, both signs, on every
    axis and on the diagonal (a prior draw lands beyond |z| = 8 with probability ~1e-14 for z_dim=2)."""
    rows = []
    for value in TAIL_VALUES:
        for sign in (1.0, -1.0):
            rows.append(torch.full((1, z_dim), sign * value / z_dim**0.5))
            rows.append(torch.eye(z_dim) * sign * value)
    return torch.cat(rows)


def parity_latents(z_dim: int, n: int = 1000, seed: int = 0) -> torch.Tensor:
    """float32 [n + tails, z_dim]: seeded N(0, I) draws, then the tail points."""
    normal = torch.randn(n, z_dim, generator=torch.Generator().manual_seed(seed))
    return torch.cat([normal, tail_latents(z_dim)])
