"""The benchmark's tables: one row per configuration (CSV), the Markdown table, and the RESULT line."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np
import pandas as pd

from ubc_ocean.benchmark.stats import METRICS, Estimate

# Differences against the baseline kept in the CSV (the Markdown table shows the first).
DELTAS = ("test_ba", "wsi_ba", "tma_ba", "other_recall")


@dataclass
class Outcome:
    """One configuration's run: its scores (empty when it failed), its OOF balanced accuracy and stage times."""

    name: str
    experiment: str
    overrides: list[str]
    oof_ba: float = float("nan")
    scores: dict[str, Estimate] = field(default_factory=dict)
    deltas: dict[str, Estimate] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)
    site: dict[str, float] = field(default_factory=dict)  # site predictability: all, wsi, tma (stats.py)
    error: str | None = None
    oof_ba_grouped: float | None = None  # OOF BA on benchmark.grouped_folds folds (None: not asked; NaN: failed)
    grouped_error: str | None = None

    @property
    def wall_s(self) -> float:
        return float(sum(self.seconds.values()))

    @property
    def test_ba(self) -> float:
        return self.scores["test_ba"].value if "test_ba" in self.scores else float("nan")


def results_frame(outcomes: Sequence[Outcome], baseline: str, best: str | None) -> pd.DataFrame:
    """One row per configuration: every metric with its interval, the differences against the baseline,
    the OOF balanced accuracy (and ``oof_ba_grouped``, on grouped folds, when any configuration was trained
    on them), ``oof_test_gap`` (OOF BA - test BA), the wall time and the status."""
    grouped = any(outcome.oof_ba_grouped is not None for outcome in outcomes)
    rows = []
    for outcome in outcomes:
        row: dict = {"configuration": outcome.name, "experiment": outcome.experiment,
                     "overrides": " ".join(outcome.overrides), "baseline": outcome.name == baseline,
                     "best_oof": outcome.name == best, "oof_ba": outcome.oof_ba}
        if grouped:
            row["oof_ba_grouped"] = np.nan if outcome.oof_ba_grouped is None else outcome.oof_ba_grouped
        for name in METRICS:
            estimate = outcome.scores.get(name, Estimate(np.nan, np.nan, np.nan))
            row |= {name: estimate.value, f"{name}_low": estimate.low, f"{name}_high": estimate.high}
        for name in DELTAS:
            estimate = outcome.deltas.get(name, Estimate(np.nan, np.nan, np.nan))
            row |= {f"delta_{name}": estimate.value, f"delta_{name}_low": estimate.low,
                    f"delta_{name}_high": estimate.high}
        row |= {f"site_auc{'' if part == 'all' else '_' + part}": float(outcome.site.get(part, np.nan))
                for part in ("all", "wsi", "tma")}
        row |= {"oof_test_gap": outcome.oof_ba - outcome.test_ba, "wall_s": round(outcome.wall_s, 1),
                "status": "ok" if outcome.error is None else f"failed: {outcome.error}"}
        rows.append(row)
    return pd.DataFrame(rows)


def _estimate(row: Mapping, name: str, digits: int = 3) -> str:
    return Estimate(row[name], row[f"{name}_low"], row[f"{name}_high"]).text(digits)


def _signed(row: Mapping, name: str) -> str:
    value, low, high = row[name], row[f"{name}_low"], row[f"{name}_high"]
    if not np.isfinite(value):
        return "n/a"
    return f"{value:+.3f} [{low:+.3f}, {high:+.3f}]"


def _number(value: float) -> str:
    return f"{value:.3f}" if np.isfinite(value) else "n/a"


def markdown_table(results: pd.DataFrame, level: float = 0.95) -> str:
    """The results as Markdown: the main table (the best configuration by OOF BA in bold; an "OOF BA (grouped)"
    column when the results have one), then Other by image type; intervals are ``level`` bootstrap percentile
    intervals."""
    percent = f"{level * 100:g}%"
    grouped = "oof_ba_grouped" in results.columns
    lines = [f"| configuration | OOF BA |{' OOF BA (grouped) |' if grouped else ''} test BA [{percent} CI] "
             "| WSI BA [CI] | TMA BA [CI] | Other recall [CI] | Δ test BA vs baseline [CI] | site AUC (WSI, TMA) "
             "| wall (s) |", "|---|---|" + "---|" * (7 + grouped)]
    for _, row in results.iterrows():
        name = f"**{row.configuration}**" if row.best_oof else row.configuration
        name += " (baseline)" if row.baseline else ""
        if row.status != "ok":
            lines.append(f"| {name} | {row.status} |{' |' if grouped else ''} | | | | | | {row.wall_s:.0f} |")
            continue
        oof = _number(row.oof_ba) + (f" | {_number(row.oof_ba_grouped)}" if grouped else "")
        lines.append(f"| {name} | {oof} | {_estimate(row, 'test_ba')} | {_estimate(row, 'wsi_ba')} "
                     f"| {_estimate(row, 'tma_ba')} | {_estimate(row, 'other_recall')} "
                     f"| {_signed(row, 'delta_test_ba')} | {_number(row.site_auc)} ({_number(row.site_auc_wsi)}, "
                     f"{_number(row.site_auc_tma)}) | {row.wall_s:.0f} |")
    lines += ["", "| configuration | Other recall WSI | Other recall TMA | in-distribution flagged as Other "
                  "| flagged WSI | flagged TMA |", "|---|---|---|---|---|---|"]
    for _, row in results[results.status == "ok"].iterrows():
        lines.append(f"| {row.configuration} | {_estimate(row, 'other_recall_wsi')} "
                     f"| {_estimate(row, 'other_recall_tma')} | {_estimate(row, 'flag_rate')} "
                     f"| {_estimate(row, 'flag_rate_wsi')} | {_estimate(row, 'flag_rate_tma')} |")
    return "\n".join(lines) + "\n"


def oof_test_rank_correlation(results: pd.DataFrame, oof: str = "oof_ba") -> float:
    """Spearman's rank correlation between OOF (column ``oof``: ``oof_ba_grouped`` for the grouped folds) and
    test balanced accuracy over the configurations that ran: 1 when OOF ranks the methods as the unseen test
    hospitals do, so choosing on OOF is safe; NaN with fewer than three configurations, constant figures, or
    no such column."""
    if oof not in results.columns:
        return float("nan")
    ok = results[(results.status == "ok") & np.isfinite(results[oof]) & np.isfinite(results.test_ba)]
    if len(ok) < 3 or ok[oof].nunique() < 2 or ok.test_ba.nunique() < 2:
        return float("nan")
    return float(ok[oof].rank().corr(ok.test_ba.rank()))


def result_line(results: pd.DataFrame) -> str:
    """``RESULT best_test_ba=... baseline_test_ba=... oof_test_gap=... best=... baseline_gap=...
    baseline_site_auc=... oof_test_rank=... oof_test_rank_grouped=...``: the configuration chosen on OOF balanced
    accuracy, its test BA and gap, the baseline's test BA, OOF-test gap and site predictability, and how OOF
    ranks the configurations against test (:func:`oof_test_rank_correlation`), with the plain folds and with
    the grouped ones (n/a when not run)."""
    best = results[results.best_oof]
    base = results[results.baseline]
    best_row = best.iloc[0] if len(best) else None
    return (f"RESULT best_test_ba={_number(best_row.test_ba if best_row is not None else np.nan)} "
            f"baseline_test_ba={_number(base.iloc[0].test_ba if len(base) else np.nan)} "
            f"oof_test_gap={_number(best_row.oof_test_gap if best_row is not None else np.nan)} "
            f"best={best_row.configuration if best_row is not None else 'none'} "
            f"baseline_gap={_number(base.iloc[0].oof_test_gap if len(base) else np.nan)} "
            f"baseline_site_auc={_number(base.iloc[0].site_auc if len(base) else np.nan)} "
            f"oof_test_rank={_number(oof_test_rank_correlation(results))} "
            f"oof_test_rank_grouped={_number(oof_test_rank_correlation(results, 'oof_ba_grouped'))}")
