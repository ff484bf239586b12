#!/usr/bin/env python
"""The synthetic benchmark: stage 00, then stages 01-06 for each configuration of benchmark.configurations on
the same data; prints the results table (also {runs}/{experiment}/results.csv and results.md), the wall
times and, last, RESULT best_test_ba=... baseline_test_ba=... oof_test_gap=... best=... baseline_gap=...
baseline_site_auc=... oof_test_rank=... oof_test_rank_grouped=... (the best configuration chosen on OOF balanced
accuracy, never on test; the baseline's OOF-test gap and site predictability; how OOF ranks the configurations
against test, with plain folds and with benchmark.grouped_folds). Exit status 1 when a configuration failed
(the others' results are written), 2 for a bad config (any configuration's, before any work)."""

from ubc_ocean.cli import main
from ubc_ocean.config import Config


def benchmark(cfg: Config) -> None:
    from ubc_ocean.benchmark.runner import run
    from ubc_ocean.parallel import RunFailed

    summary = run(cfg)
    print(summary.text, flush=True)
    if summary.failed:
        raise RunFailed(f"benchmark configurations failed: {', '.join(summary.failed)} "
                        f"(their logs: {summary.folder}/configurations/<name>/stages.log)")


if __name__ == "__main__":
    raise SystemExit(main(benchmark, __doc__, creates_data_root=True))
