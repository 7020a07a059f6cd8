"""``python -m ufw.analysis [RESULTS]``: print a sweep's comparison table; user errors exit 2."""

from __future__ import annotations

import sys
from collections.abc import Sequence

from ufw.analysis.formatting import format_table
from ufw.analysis.loading import RESULTS_ENV, AnalysisError, load_sweep
from ufw.analysis.tables import comparison_table, marginal_table
from ufw.arguments import ArgumentParser


def main(argv: Sequence[str] | None = None) -> int:
    """Print the table of one configuration per row, or a marginal with ``--by``."""
    parser = ArgumentParser(  # usage errors: one line, exit 2, like the rest
        prog="python -m ufw.analysis",
        description="Print a sweep's comparison table: one row per configuration, its seeds "
                    "as replicates (a 95%% CI with >= 2 seeds).")
    parser.add_argument("results", nargs="?",
                        help=f"a sweep's results directory, e.g. results/quickstart-20260101-"
                             f"120000 (default: ${RESULTS_ENV}, else the newest under results/)")
    parser.add_argument("--baseline",
                        help="configuration to compare against: its label (a preset's name) "
                             "or config_id (default: standard_llm when the sweep has it)")
    parser.add_argument("--by", help="a marginal over configurations grouped by these "
                                     "column(s), comma-separated, e.g. schedule")
    parser.add_argument("--format", default="markdown", choices=["markdown", "csv", "html"])
    parser.add_argument("--confidence", type=float, default=0.95)
    args = parser.parse_args(argv)
    try:
        sweep = load_sweep(args.results)
        if args.by:
            if args.baseline:
                raise AnalysisError("--baseline compares configurations; it does not apply "
                                    "to a --by marginal")
            table = marginal_table(sweep.trials, args.by.split(","), sweep.params)
        else:
            table = comparison_table(sweep.trials, baseline=args.baseline,
                                     confidence=args.confidence, params=sweep.params)
        if args.format == "csv":  # numbers only, for other programs
            sys.stdout.write(format_table(table, "csv"))
        else:
            print(f"{sweep.name}\n\n{format_table(table, args.format)}")
    except AnalysisError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0
