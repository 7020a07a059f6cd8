"""Each extension of issue 6 against the seed-default configuration, several seeds each.

    python bench/extensions.py --device cuda [--seeds 3] [--variants entropy moe4_top2 ...]
    python bench/extensions.py --quick          # a tiny check that everything runs (CPU)

Base: the asymmetric_best preset (layer weights 0.7 / 0 / 0.3, threshold 0.95) at seed scale
(dim 64, 3 layers, max_epochs 50, patience 0) on the reference benchmark
(first 100,000 / 10,000 characters of WikiText-2 test / valid; docs/design.md, section Data).
Every variant changes the base by a few config values; `--set key=value` changes the base.
Configurations that share a shape train as one population (e.g. the base, entropy, margin
and self-distillation variants x seeds: one model), which gives the same result per member
as single runs (tests/test_extensions.py).

The saved-teacher variant first trains a teacher (standard_llm preset, seed 0) and keeps its
best epoch's weights. Writes bench/results/extensions.json (extensions_quick.json with
--quick) and prints two markdown tables: metrics at each variant's own threshold, and the
best PPL each variant reaches within a compute budget (from its threshold curve).
"""

from __future__ import annotations

import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from common import SHARED, device_label, save

from ufw import cli
from ufw.config import UniversalConfig, preset
from ufw.data import Corpus
from ufw.train import Population, train

TEACHER = "<teacher>"  # replaced by the path of the trained teacher
VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    "baseline": ("base: asymmetric_best, max_softmax", {}),
    "entropy": ("confidence entropy", {"confidence_method": "entropy"}),
    "margin": ("confidence margin", {"confidence_method": "margin"}),
    "learned": ("confidence learned head", {"confidence_method": "learned"}),
    "multi_exit": ("exits 1, 2 (0.95, 0.95)",
                   {"exit_layers": [1, 2], "exit_thresholds": {1: 0.95, 2: 0.95}}),
    "multi_exit_l2": ("exits 1, 2 (0.95, 0.95), L2 weight 0.3",
                      {"exit_layers": [1, 2], "exit_thresholds": {1: 0.95, 2: 0.95},
                       "layer_weights": {1: 0.7, 2: 0.3, 3: 0.3}}),
    "self_distill_t1": ("self-distillation a=0.5 T=1", {"distillation_alpha": 0.5}),
    "self_distill_t2": ("self-distillation a=0.5 T=2",
                        {"distillation_alpha": 0.5, "distillation_temperature": 2.0}),
    "teacher_distill": ("distillation from a saved teacher a=0.5 T=2",
                        {"distillation_alpha": 0.5, "distillation_temperature": 2.0,
                         "teacher": TEACHER}),
    "moe4_top1": ("MoE 4 experts, top-1", {"num_experts": 4, "experts_top_k": 1}),
    "moe4_top2": ("MoE 4 experts, top-2", {"num_experts": 4, "experts_top_k": 2}),
}
QUICK = {"dim": 16, "num_heads": 2, "max_epochs": 2, "batch_size": 8, "seq_len": 32}
BUDGETS = (0.9, 0.8, 0.7)  # compute cost budgets of the iso-compute table


def train_teacher(base: UniversalConfig, corpus: Corpus, device: str, path: Path) -> dict:
    """A standard LM of the base's shape, saved at its best epoch (for `teacher: PATH`)."""
    config = preset("standard_llm").with_overrides(
        {k: v for k, v in base.to_dict().items()
         if k in ("dim", "num_layers", "num_heads", "max_epochs", "patience", "batch_size",
                  "seq_len", "lr")} | {"seed": 0})

    def keep_best(population: Population, rows: list[dict]) -> None:
        if population.members[0].best_epoch == population.epoch:  # the epoch just run
            population.save_member(0, str(path))

    row = train([config], corpus, device, on_epoch=keep_best)[0]
    return {"best_ppl": row["best_ppl"], "best_epoch": row["best_epoch"]}


def run(base: UniversalConfig, variants: list[str], seeds: list[int], corpus: Corpus,
        device: str, teacher_path: Path | None) -> list[dict[str, Any]]:
    """Train every variant x seed, one population per shape; one row per member."""
    groups: dict[tuple, list[tuple[str, UniversalConfig]]] = {}
    for name in variants:
        overrides = dict(VARIANTS[name][1])
        if overrides.get("teacher") == TEACHER:
            overrides["teacher"] = str(teacher_path)
        for seed in seeds:
            config = base.with_overrides({**overrides, "seed": seed})
            groups.setdefault(config.shape_key, []).append((name, config))
    rows = []
    for members in groups.values():
        names = [n for n, _ in members]
        print(f"population of {len(members)}: {', '.join(dict.fromkeys(names))}", flush=True)
        start = time.perf_counter()
        results = train([c for _, c in members], corpus, device)
        epochs = max(r["epochs_run"] for r in results)  # the population's epochs
        seconds_per_epoch = (time.perf_counter() - start) / max(1, epochs)
        for name, r in zip(names, results):
            rows.append({
                "variant": name, "seed": r["seed"], "population_size": len(members),
                "population_seconds_per_epoch": seconds_per_epoch, "best_ppl": r["best_ppl"],
                "best_epoch": r["best_epoch"], "epochs_run": r["epochs_run"], "acc": r["acc"],
                "shallow_ratio": r["shallow_ratio"], "compute_cost": r["compute_cost"],
                "expert_ffns_per_token": r["expert_ffns_per_token"],
                "exit_shares": json.loads(r["exit_shares"]),
                "threshold_curve": json.loads(r["threshold_curve"]),
                "status": r["status"], "error": r["error"]})
    return rows


def _mean_std(values: list[float]) -> str:
    """Mean ± sample std over seeds; NaN (failed, or no point within budget) left out, counted."""
    found = [v for v in values if not math.isnan(v)]
    if not found:
        return "-"
    std = statistics.stdev(found) if len(found) > 1 else 0.0
    missing = f" ({len(found)}/{len(values)} seeds)" if len(found) < len(values) else ""
    return f"{statistics.mean(found):.3f} ± {std:.3f}{missing}"


def _mean(values: list[float], digits: int = 3) -> str:
    values = [v for v in values if not math.isnan(v)]
    return f"{statistics.mean(values):.{digits}f}" if values else "-"


def ppl_within(curve: list[dict], budget: float) -> float:
    """Best PPL of a threshold curve among thresholds whose compute cost fits the budget."""
    fits = [p["ppl"] for p in curve if p["compute_cost"] <= budget + 1e-9]
    return min(fits) if fits else float("nan")


def summarise(rows: list[dict], variants: list[str]) -> list[dict[str, Any]]:
    summary = []
    for name in variants:
        mine = [r for r in rows if r["variant"] == name]
        shares = [statistics.mean(s) for s in zip(*(r["exit_shares"] for r in mine))]
        summary.append({
            "variant": name, "description": VARIANTS[name][0], "seeds": len(mine),
            "best_ppl": _mean_std([r["best_ppl"] for r in mine]),
            "best_epoch": _mean([r["best_epoch"] for r in mine], 1),
            "shallow_ratio": _mean([r["shallow_ratio"] for r in mine]),
            "compute_cost": _mean([r["compute_cost"] for r in mine]),
            "expert_ffns_per_token": _mean([r["expert_ffns_per_token"] for r in mine], 2),
            "exit_shares": " / ".join(f"{s:.3f}" for s in shares),
            "seconds_per_epoch": _mean([r["population_seconds_per_epoch"] for r in mine], 2),
            **{f"ppl_cost_le_{b}": _mean_std([ppl_within(r["threshold_curve"], b)
                                              for r in mine]) for b in BUDGETS},
            "failed": sum(r["status"] != "completed" for r in mine),
        })
    return summary


def markdown(summary: list[dict[str, Any]]) -> str:
    header = ("| variant | seeds | best PPL (mean ± std) | best epoch | shallow ratio | "
              "compute cost | expert FFNs/token | exit shares (final last) | s/epoch "
              "(population) |")
    lines = [header, "|---|---|---|---|---|---|---|---|---|"]
    for s in summary:
        failed = f" ({s['failed']} failed)" if s["failed"] else ""
        lines.append(f"| {s['description']} | {s['seeds']}{failed} | {s['best_ppl']} | "
                     f"{s['best_epoch']} | {s['shallow_ratio']} | {s['compute_cost']} | "
                     f"{s['expert_ffns_per_token']} | {s['exit_shares']} | "
                     f"{s['seconds_per_epoch']} |")
    note = ("Best PPL within a compute budget (threshold curve at the best epoch; the same "
            "threshold at every exit):")
    lines += ["", note, "",
              "| variant | " + " | ".join(f"PPL @ cost <= {b}" for b in BUDGETS) + " |",
              "|---|" + "---|" * len(BUDGETS)]
    for s in summary:
        lines.append(f"| {s['description']} | "
                     + " | ".join(s[f"ppl_cost_le_{b}"] for b in BUDGETS) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = cli.parser("python bench/extensions.py", __doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--seeds", type=int, default=3, help="seeds per variant: 42, 43, ...")
    parser.add_argument("--variants", nargs="*", choices=list(VARIANTS), default=list(VARIANTS),
                        help="which variants (the baseline is always included)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny sizes (dim 16, 2 epochs, 8000 characters): a smoke test")
    parser.add_argument("--out", help="result file name in bench/results (default "
                                      "extensions.json, extensions_quick.json with --quick)")
    args = parser.parse_args(argv)
    if not (args.train_file or args.val_file) and args.data in (None, "python-docs"):
        # the reference benchmark (docs/design.md, section Data)
        args.train_file, args.val_file = str(SHARED / "test.txt"), str(SHARED / "valid.txt")
        args.train_chars, args.val_chars = args.train_chars or 100_000, args.val_chars or 10_000
    if args.quick:
        args.train_chars, args.val_chars = min(args.train_chars or 8000, 8000), min(
            args.val_chars or 2000, 2000)
    with cli.user_errors():
        overrides = {**(QUICK if args.quick else {}), **cli.parse_sets(args.set)}
        base = preset("asymmetric_best").with_overrides(overrides)
        corpus = cli.corpus_from_args(args, base)
        device = cli.check_device(args.device)
    variants = ["baseline", *[v for v in args.variants if v != "baseline"]]
    seeds = [42 + s for s in range(args.seeds)]
    record: dict[str, Any] = {"device": device_label(device), "dataset": corpus.name,
                              "quick": args.quick, "seeds": seeds,
                              "base": base.to_dict(),
                              "variants": {v: VARIANTS[v][1] for v in variants}}
    with tempfile.TemporaryDirectory() as tmp:
        teacher_path = Path(tmp) / "teacher.safetensors"
        if "teacher_distill" in variants:
            record["teacher"] = train_teacher(base, corpus, device, teacher_path)
            print(f"teacher (standard_llm, seed 0): {record['teacher']}", flush=True)
        start = time.perf_counter()
        rows = run(base, variants, seeds, corpus, device, teacher_path)
        record["seconds"] = time.perf_counter() - start
    record["summary"] = summarise(rows, variants)
    record["rows"] = rows
    path = save(args.out or ("extensions_quick.json" if args.quick else "extensions.json"),
                record)
    print(markdown(record["summary"]))
    print(f"\nwritten: {path}")


if __name__ == "__main__":
    main()
