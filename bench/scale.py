"""Training speed at realistic sizes: the naive loop, the naive loop as a careful user writes
it, ufw K = 1 with its best settings, and ufw populations; optionally dense vs sparse MoE.

    python bench/scale.py --device cuda [--sizes 256 512] [--K 4 8 16] [--epochs 2] [--moe]
                          [--ufw-only] [--out NAME]
    python bench/scale.py --quick          # a tiny CPU run that checks the script works

Sizes are (dim, layers, heads, seq_len): (64, 3, 4, 64), (256, 6, 8, 128), (512, 8, 8, 256),
(768, 12, 12, 256), picked by dim with --sizes. Every size trains preset asymmetric_best's
method scaled to its depth: weights {1: .5, L/2: .2, L: .3}, exit L/2, batch 32. Data: a text
file (--text, default WikiText-2's test.txt, all of it) to train on and --val-text to
validate on (default valid.txt beside it, first 100k characters).

Variants:
- naive: bench/naive.py's eager loop (torch.optim.AdamW), fp32;
- careful: the same loop with bf16 autocast and torch.compile of its loss;
- ufw: K = 1 with --precision (default bf16 on a GPU, fp32 on a CPU), torch.compile and, on
  a GPU, CUDA graphs; then populations of K members (different seeds and learning rates).
A model-epoch is one member trained for one epoch plus its evaluation; each variant runs one
warm-up epoch (compilation, graph capture) before --epochs timed ones. Peak memory is per
member, on a GPU only. A population that does not fit is recorded as out of memory.
`--moe` adds ufw K = 1 at (512, 8, 8, 256) with 8 experts, top-1 and top-2, dense
(every expert on every token) against sparse (tokens to their experts only); `--moe-top-k`,
`--moe-variants`, `--moe-size`, `--moe-K` and `--moe-experts` pick others (one variant per
process keeps torch.compile's caches apart).
Writes bench/results/scale_<device>.json (scale_<device>_quick.json with --quick).
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from common import SHARED, device_label, save
from naive import NaiveTrainer
from throughput import timed

from ufw.cli import ArgumentParser, check_device, user_errors
from ufw.config import PRECISIONS, ConfigError, UniversalConfig, preset
from ufw.data import Corpus, make_corpus, python_docs_text
from ufw.train import Population

SIZES = {64: (64, 3, 4, 64), 256: (256, 6, 8, 128), 512: (512, 8, 8, 256),
         768: (768, 12, 12, 256)}
QUICK_SIZE = (32, 3, 2, 32)  # --quick: seconds on a CPU
QUICK_MOE_SIZE = (64, 2, 4, 64)


def config_for(size: tuple[int, int, int, int], **changes) -> UniversalConfig:
    """asymmetric_best's method at this size (patience high: no member stops while timed)."""
    dim, layers, heads, seq_len = size
    middle = max(1, layers // 2)
    weights = {1: 0.5, middle: 0.2, layers: 0.3} if middle > 1 else {1: 0.7, layers: 0.3}
    return preset("asymmetric_best").with_overrides(
        {"dim": dim, "num_layers": layers, "num_heads": heads, "seq_len": seq_len,
         "batch_size": 32, "layer_weights": weights, "exit_layer": middle, "patience": 100,
         **changes})


class CarefulNaiveTrainer(NaiveTrainer):
    """The naive loop as a careful user would write it: bf16 autocast, compiled loss."""

    def __init__(self, config: UniversalConfig, corpus: Corpus, device: str):
        super().__init__(config, corpus, device)
        self.loss = torch.compile(self._autocast_loss)

    def _autocast_loss(self, x, y, weights):
        with torch.autocast(self.device.type, torch.bfloat16):
            return NaiveTrainer.loss(self, x, y, weights)

    def evaluate(self):
        with torch.autocast(self.device.type, torch.bfloat16):
            return super().evaluate()


def train_flop_per_epoch(size, vocab_size: int, tokens: int) -> float:
    """Training FLOP of one model-epoch (forward + backward, every layer and its head):
    6 per parameter per token for the blocks and each exit's head, plus attention's scores
    and mixing, 12 * layers * seq_len * dim per token. A sanity bound for the timings: a
    figure that implies more than the card's peak rate means the timing misses work."""
    dim, layers, _, seq_len = size
    block = 12 * dim * dim  # attention 4 d^2 + GLU feed-forward ~8 d^2
    heads = 3 * dim * vocab_size  # three weighted exits
    return tokens * (6 * (layers * block + heads) + 12 * layers * seq_len * dim)


def last_val_ppl(out) -> float | None:
    """Member 0's validation PPL after the timed epochs: a run that trains shows it falling."""
    if isinstance(out, list) and out:  # Population.run_epoch: one row per member
        return out[0].get("val_ppl")
    if isinstance(out, dict):  # NaiveTrainer.run_epoch
        return out.get("ppl")
    return None


def measure(name: str, run_epoch, members: int, epochs: int, device: str, flop=None,
            **settings) -> dict:
    seconds, peak, out = timed(run_epoch, epochs, device)
    record = {"variant": name, "K": members, **settings,
              "model_epochs_per_s": members * epochs / seconds,
              "seconds_per_epoch": seconds / epochs,
              "peak_mem_per_member_gib": peak / members if peak is not None else None,
              "val_ppl_after": last_val_ppl(out)}
    if flop is not None:
        record["train_tflop_per_s"] = flop * members * epochs / seconds / 1e12
    print(record, flush=True)
    return record


def population_run(configs, corpus, device, precision, **options):
    return Population(configs, corpus, device, compile=True, precision=precision,
                      **options).run_epoch


def measure_size(size, corpus, args) -> list[dict]:
    epochs, device = args.epochs, args.device
    config = config_for(size, max_epochs=epochs + 1)
    tokens = corpus.train_x.numel()
    common = {"size": list(size), "flop": train_flop_per_epoch(size, corpus.vocab_size, tokens)}
    records = [] if args.ufw_only else [
        measure("naive", NaiveTrainer(config, corpus, device).run_epoch, 1, epochs,
                device, precision="fp32", compile=False, **common),
        measure("careful", CarefulNaiveTrainer(config, corpus, device).run_epoch, 1,
                epochs, device, precision="bf16", compile=True, **common)]
    if args.no_graphs_too and device.startswith("cuda"):  # is graph replay timed right?
        run_epoch = population_run([config], corpus, device, args.precision, cuda_graphs=False)
        records.append(measure("ufw_no_graphs", run_epoch, 1, epochs, device,
                               precision=args.precision, compile=True, **common))
        run_epoch = None
    for K in [1, *args.K]:
        configs = [config.with_overrides({"seed": k, "lr": 1e-3 * (1 + k % 4) / 2})
                   for k in range(K)]
        name = "ufw" if K == 1 else "ufw_population"
        try:
            run_epoch = population_run(configs, corpus, device, args.precision)
            records.append(measure(name, run_epoch, K, epochs, device,
                                   precision=args.precision, compile=True, **common))
        except torch.cuda.OutOfMemoryError:
            records.append({"variant": name, "K": K, "out_of_memory": True, **common})
            print(records[-1], flush=True)
            break  # larger populations will not fit either
        finally:
            run_epoch = None
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    return records


MOE_VARIANTS = {"dense": {"moe_dispatch": "dense"},
                "sparse": {"moe_dispatch": "sparse"},  # with CUDA graphs where capturable
                "sparse_eager": {"moe_dispatch": "sparse", "cuda_graphs": False},
                "auto": {}}  # Population's own choice


def measure_moe(size, corpus, args) -> list[dict]:
    records = []
    for top_k in args.moe_top_k:
        config = config_for(size, max_epochs=args.epochs + 1, num_experts=args.moe_experts,
                            experts_top_k=top_k)
        configs = [config.with_overrides({"seed": k}) for k in range(args.moe_K)]
        for variant in args.moe_variants:
            population = Population(configs, corpus, args.device, compile=True,
                                    precision=args.precision, **MOE_VARIANTS[variant])
            records.append(measure("ufw_moe", population.run_epoch, args.moe_K, args.epochs,
                                   args.device, precision=args.precision, compile=True,
                                   size=list(size), num_experts=args.moe_experts,
                                   experts_top_k=top_k, moe_variant=variant,
                                   moe_dispatch=population.model.moe_dispatch,
                                   cuda_graphs=population.cuda_graphs))
            population = None
    return records


def load_texts(args) -> tuple[str, str, str]:
    """(name, train text, validation text) from the flags; python-docs when no WikiText-2."""
    text = args.text or (SHARED / "test.txt")
    if args.text is None and not Path(text).exists():
        print(f"note: no {text}; using Python's documentation text instead", file=sys.stderr)
        docs = python_docs_text()
        return "python-docs", docs[:int(len(docs) * 0.9)], docs[int(len(docs) * 0.9):]
    val = args.val_text or Path(text).with_name("valid.txt")
    texts = []
    for path in (text, val):
        try:
            texts.append(Path(path).read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read {path} as UTF-8 text ({e})") from None
    return Path(text).name, texts[0], texts[1][:100_000]


def main(argv: list[str] | None = None) -> None:
    parser = ArgumentParser(prog="python bench/scale.py", description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--sizes", type=int, nargs="*", default=list(SIZES),
                        help=f"sizes by dim, of {list(SIZES)}")
    parser.add_argument("--K", type=int, nargs="*", default=[4, 8, 16],
                        help="population sizes besides K = 1")
    parser.add_argument("--epochs", type=int, default=2, help="timed epochs per variant")
    parser.add_argument("--text", help="text file to train on (default WikiText-2 test.txt)")
    parser.add_argument("--val-text", help="text file to validate on (default: valid.txt "
                                           "beside --text)")
    parser.add_argument("--train-chars", type=int, help="train on the first N characters only")
    parser.add_argument("--moe", action="store_true",
                        help="also dense vs sparse MoE at (512, 8, 8, 256), 8 experts")
    parser.add_argument("--moe-top-k", type=int, nargs="+", default=[1, 2], choices=[1, 2])
    parser.add_argument("--moe-variants", nargs="+", default=["dense", "sparse"],
                        choices=list(MOE_VARIANTS))
    parser.add_argument("--moe-size", type=int, default=512, choices=list(SIZES),
                        help="the MoE size by dim (default 512: (512, 8, 8, 256))")
    parser.add_argument("--moe-K", type=int, default=1, help="MoE members (default 1)")
    parser.add_argument("--moe-experts", type=int, default=8)
    parser.add_argument("--ufw-only", action="store_true",
                        help="skip the naive and careful loops (e.g. measured already)")
    parser.add_argument("--no-graphs-too", action="store_true",
                        help="also ufw K = 1 without CUDA graphs (a check of the timing)")
    parser.add_argument("--out", help="record name in bench/results (default scale_<device>)")
    parser.add_argument("--quick", action="store_true",
                        help="a tiny configuration that runs in a minute or two on a CPU")
    parser.add_argument("--precision", choices=PRECISIONS,
                        help="ufw's precision (default: bf16 on a GPU, fp32 on a CPU)")
    args = parser.parse_args(argv)
    with user_errors():
        check_device(args.device)
        if args.precision is None:
            args.precision = "bf16" if args.device.startswith("cuda") else "fp32"
        if any(s not in SIZES for s in args.sizes):
            raise ConfigError(f"--sizes: dims of {list(SIZES)}, got {args.sizes}")
        if args.epochs < 1 or any(k < 2 for k in args.K):
            raise ConfigError("--epochs must be >= 1 and every --K >= 2")
        name, train_text, val_text = load_texts(args)
    sizes = [QUICK_SIZE] if args.quick else [SIZES[s] for s in args.sizes]
    moe_size = QUICK_MOE_SIZE if args.quick else SIZES[args.moe_size]
    if args.quick:
        args.K, args.epochs = [2], 1
        train_text, val_text = train_text[:6_000], val_text[:3_000]
    elif args.train_chars:
        train_text = train_text[:args.train_chars]
    records = []
    for size in sizes:
        corpus = make_corpus(name, train_text, val_text, batch_size=32, seq_len=size[3])
        records += measure_size(size, corpus, args)
    if args.moe:
        corpus = make_corpus(name, train_text, val_text, batch_size=32, seq_len=moe_size[3])
        records += measure_moe(moe_size, corpus, args)
    device = device_label(args.device)
    kind = args.device.split(":")[0]
    path = save(args.out or f"scale_{kind}{'_quick' if args.quick else ''}.json",
                {"device": device, "data": name, "train_chars": len(train_text),
                 "val_chars": len(val_text), "epochs": args.epochs, "records": records})
    print(f"wrote {path}", file=sys.stderr)


if __name__ == "__main__":
    main()
