"""The interface every query kind implements, and the registry."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl

from civicdp.privacy.loss import PrivacyLoss, compose
from civicdp.privacy.mechanisms import GaussianVector, LaplaceVector, NoisyMin
from civicdp.queries.backend import Measure
from civicdp.queries.context import CELL, QueryContext
from civicdp.queries.errors import QueryError

Mechanism = LaplaceVector | GaussianVector | NoisyMin


@dataclass(frozen=True)
class Calibration:
    """A query's mechanisms, keyed by role, and their composed privacy loss."""

    contributions: int
    mechanisms: dict[str, Mechanism]

    @property
    def loss(self) -> PrivacyLoss:
        return compose(m.loss for m in self.mechanisms.values())

    def describe(self) -> list[dict[str, Any]]:
        return [describe_mechanism(role, m) for role, m in self.mechanisms.items()]


def describe_mechanism(role: str, mechanism: Any) -> dict[str, Any]:
    """A mechanism's public description: its noise, scale, sensitivity and loss (rho too on zCDP)."""
    loss = mechanism.loss
    row = {"role": role, "mechanism": mechanism.name, "scale": mechanism.scale,
           "sensitivity": mechanism.sensitivity, "epsilon": float(loss.epsilon)}
    if loss.rho is not None:
        row["rho"] = float(loss.rho)
    return row


class Kind(ABC):
    """One aggregate: count, sum, mean, quantiles, histogram, or a plug-in."""

    name: str
    #: Spec fields this kind uses beyond the common ones; others are refused.
    uses: frozenset[str] = frozenset()

    def check(self, ctx: QueryContext) -> None:
        """Kind-specific validation (beyond :func:`civicdp.queries.context.resolve`)."""
        spec = ctx.spec
        for field in ("bounds", "quantiles", "candidates", "bins"):
            if getattr(spec, field) is not None and field not in self.uses:
                raise QueryError(field, f"'{field}' does not apply to a {self.name}",
                                 f"Remove '{field}' from the query")

    @abstractmethod
    def calibrate(self, ctx: QueryContext, contributions: int, epsilon: float | None) -> Calibration:
        """Mechanisms for a budget ``epsilon`` in the dataset's unit (epsilon, or rho on zCDP
        datasets; ``ctx.accounting`` makes the mechanisms), or for the spec's target accuracy when None."""

    @abstractmethod
    def measure(self, ctx: QueryContext) -> Measure:
        """The exact aggregate the backend computes."""

    @abstractmethod
    def release(self, ctx: QueryContext, calibration: Calibration, exact: pl.DataFrame) -> pl.DataFrame:
        """Noisy values with intervals, one row per cell (and per quantile or bin)."""

    @abstractmethod
    def predicted(self, ctx: QueryContext, calibration: Calibration) -> dict[str, Any]:
        """The accuracy a release will have, computed without data."""


KINDS: dict[str, Kind] = {}


def register(kind: Kind) -> Kind:
    KINDS[kind.name] = kind
    return kind


def aligned(ctx: QueryContext, exact: pl.DataFrame, columns: list[str]) -> pl.DataFrame:
    """Exact aggregates on every public cell: missing keys get 0, unknown keys vanish.

    Casts are not strict: a group value that is not of the keys' type is unknown (null),
    never an error that depends on the data.
    """
    names = [g.name for g in ctx.group_by]
    if not names:
        if exact.height == 0:
            return ctx.cells.with_columns([pl.lit(0, pl.Int64).alias(c) for c in columns])
        return ctx.cells.join(exact.select(columns).with_columns(pl.lit(0, pl.Int64).alias(CELL)),
                              on=CELL, how="left").with_columns(pl.col(columns).fill_null(0))
    exact = exact.with_columns([pl.col(n).cast(ctx.cells.schema[n], strict=False) for n in names])
    return (ctx.cells.join(exact, on=names, how="left")
            .with_columns(pl.col(columns).fill_null(0).cast(pl.Int64)).sort(CELL))


def cell_positions(ctx: QueryContext, exact: pl.DataFrame, n_positions: int) -> np.ndarray:
    """Grid-measure rows as a [cells x positions] matrix."""
    names = [g.name for g in ctx.group_by]
    matrix = np.zeros((ctx.n_cells, n_positions), dtype=np.int64)
    if exact.height == 0:
        return matrix
    if names:
        exact = exact.with_columns([pl.col(n).cast(ctx.cells.schema[n], strict=False) for n in names])
        exact = exact.join(ctx.cells, on=names, how="inner")
    else:
        exact = exact.with_columns(pl.lit(0, pl.Int64).alias(CELL))
    np.add.at(matrix, (exact[CELL].to_numpy(), exact["position"].to_numpy()), exact["rows"].to_numpy())
    return matrix


def output(ctx: QueryContext, extra: dict[str, list], repeat: int = 1) -> pl.DataFrame:
    """The group columns of every cell (each repeated ``repeat`` times) with extra columns."""
    cells = ctx.cells.drop(CELL)
    if repeat > 1:
        cells = cells.select(pl.all().repeat_by(repeat).explode()) if cells.width else cells
    frame = pl.DataFrame(extra, strict=False)
    return pl.concat([cells, frame], how="horizontal") if cells.width else frame
