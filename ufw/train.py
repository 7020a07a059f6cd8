"""Training: K configurations of one shape trained at once as a population.

`train(configs, corpus)` is the whole method of docs/design.md as one function of its
configurations (PureJaxRL's `make_train` idea): weighted multi-exit loss with per-member
weights per epoch, AdamW with per-member, per-layer learning rates, per-member gradient
clipping, routed evaluation, and early stopping per member. A member that stops is frozen
(its learning rate becomes 0) and keeps its best metrics.

The loss and evaluation live in ufw.objective, the optimizer in ufw.optimizer, the teacher
in ufw.teacher; `UniversalTrainer` (the seed framework's single-model API) in ufw.trainer.
They are importable from here too, as before.

Run `python -m ufw.train --preset asymmetric_best` for one run printed as a JSON row.
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

import ufw
from ufw import moe, tensorfile
from ufw.config import ConfigError, UniversalConfig
from ufw.data import Corpus
from ufw.memory import check_fits
from ufw.model import EarlyExitLM, ModelShape, attention_kernel
from ufw.objective import Objective, active_layers, distillation_kl
from ufw.optimizer import PopulationAdamW, clip_groups
from ufw.results import EMPTY_METRICS, json_row
from ufw.routing import THRESHOLD_GRID
from ufw.teacher import load_teacher
from ufw.trainer import UniversalTrainer

# Importable from here as before the split (tests, benchmarks, notebooks use these names).
__all__ = ["MemberRecord", "Objective", "Population", "PopulationAdamW", "UniversalTrainer",
           "active_layers", "clip_groups", "device_name", "distillation_kl", "load_teacher",
           "main", "members_that_fit", "print_progress", "train"]


@dataclass
class MemberRecord:
    """Early-stopping bookkeeping and best-epoch metrics of one member.

    Epochs here are numbered as users see them, from 1 (as the framework reports its best
    epoch); best_epoch 0 means no finite epoch yet.
    """

    # running; completed (early stop or max_epochs); pruned (stopped from outside by
    # Population.prune, e.g. by a sweep's pruner); failed (diverged)
    status: str = "running"
    error: str = ""
    best_ppl: float = math.inf
    best_epoch: int = 0
    bad_epochs: int = 0
    epochs_run: int = 0
    train_seconds: float = 0.0
    best: dict[str, Any] = field(default_factory=dict)

    def observe(self, epoch: int, ppl: float, patience: int) -> bool:
        """Early stopping: True if this epoch (numbered from 1) is the new best.

        The member stops when PPL has failed to improve for more than `patience` epochs
        (patience 0: at the first epoch that is not better), or fails on a non-finite PPL.
        """
        if not math.isfinite(ppl):
            self.status, self.error = "failed", f"diverged: non-finite loss or PPL at epoch {epoch}"
            return False
        if ppl < self.best_ppl:
            self.best_ppl, self.best_epoch, self.bad_epochs = ppl, epoch, 0
            return True
        self.bad_epochs += 1
        if self.bad_epochs > patience:
            self.status = "completed"
        return False


class Population:
    """K configurations of one shape, trained epoch by epoch as one model."""

    def __init__(self, configs: list[UniversalConfig], corpus: Corpus,
                 device: str | torch.device = "cpu", cuda_graphs: bool | None = None,
                 compile: bool = False, precision: str = "fp32", moe_dispatch: str = "auto",
                 attention: str = "auto"):
        if not configs:
            raise ConfigError("population: needs at least one configuration")
        shapes = {c.shape_key for c in configs}
        if len(shapes) > 1:
            raise ConfigError("population: members must share dim, num_layers, num_heads, "
                              "exits, experts, batch_size, seq_len, max_epochs and teacher")
        self.configs = [c.validate() for c in configs]
        # Each member's configuration as result columns, built once per configuration (its
        # config_id hashes the whole configuration: slow enough to matter at every epoch).
        self._config_columns = [c.flat() for c in self.configs]
        self.device = torch.device(device)
        check_fits(configs[0], corpus.vocab_size, len(configs), self.device)  # before allocating
        self.corpus = corpus.to(self.device)
        self.shape = ModelShape.of(configs[0], corpus.vocab_size)
        # MoE: each token to its top-k experts only where that step runs as grouped kernels
        # a CUDA graph can capture (bf16 on a GPU), which measured faster than the dense
        # reference there (ufw/moe.py); elsewhere every expert on every token.
        capturable = (self.device.type == "cuda" and precision == "bf16"
                      and moe.runs_grouped_kernel(torch.bfloat16, self.shape.dim,
                                                  self.shape.ffn_dim))
        if moe_dispatch == "auto":
            moe_dispatch = "sparse" if capturable else "dense"
        if attention == "auto":
            attention = attention_kernel(self.shape.head_dim, self.device, compile)
        self.model = EarlyExitLM(self.shape, [c.seed for c in configs], moe_dispatch,
                                 attention).to(self.device)
        teacher = load_teacher(configs[0].teacher, self.device, corpus.vocab_size, corpus.vocab,
                               corpus.tokenizer)
        for model in (self.model, teacher):  # the teacher's forward is in the compiled loss too
            if model is not None:
                model.cache_rotary(configs[0].seq_len)
        self.objective = Objective(self.configs, self.device, teacher, precision)
        self.optimizer = PopulationAdamW(self.model, self.configs, compile=compile)
        # On a GPU a seed-scale epoch is thousands of tiny kernel launches: capture the whole
        # epoch once as a CUDA graph and replay it (one launch per epoch). The graph reads
        # its per-epoch inputs from these fixed buffers.
        # The sparse MoE's fp32 reference reads its groups' sizes on the host: it runs eager.
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and (not self.model.uses_sparse_moe()
                                                          or capturable)
        self.cuda_graphs = cuda_graphs
        self._graphs: dict[tuple[int, ...], torch.cuda.CUDAGraph] = {}
        # Compiling fuses the loss's element-wise work (norms, rotary, GLU, cross-entropy).
        # Static shapes: a process (a Ray worker) that trains another shape compiles anew.
        # With torch.compile's automatic dynamic shapes, the graph retraced for a second shape
        # dropped loss terms (a 2-layer loss after a 3-layer one came out halved, torch 2.13).
        self._loss = (torch.compile(self.objective.loss, dynamic=False) if compile
                      else self.objective.loss)
        self._weights = self.objective.layer_weights(0)
        self._active = torch.ones(len(configs), device=self.device)
        self._total = torch.zeros(len(configs), device=self.device)
        self.members = [MemberRecord() for _ in configs]
        # Per slot: epochs its current member has trained, which is also that member's next
        # epoch counted from 0 (the alpha schedule's argument, as in the framework). Rows and
        # results number epochs from 1. A refilled slot starts again from 0.
        self.epochs = [0] * len(configs)
        self.max_epochs = configs[0].max_epochs

    @property
    def epoch(self) -> int:
        """Epochs trained by the population's longest-trained member."""
        return max(self.epochs)

    @property
    def finished(self) -> bool:
        """No member is running (each completed, was pruned or failed)."""
        return all(m.status != "running" for m in self.members)

    def can_host(self, config: UniversalConfig) -> bool:
        """Whether `config` can take a slot of this population: it has the population's shape
        and needs nothing the traced loss and evaluation leave out (see Objective.hosts)."""
        return config.shape_key == self.configs[0].shape_key and self.objective.hosts(config)

    def replace(self, slots: list[int], configs: list[UniversalConfig]) -> list[dict[str, Any]]:
        """The result rows of `slots`, then those slots refilled with `configs`.

        Each new member trains from here exactly as it would in a fresh population: its
        parameters drawn from its seed, its optimizer state and step count zeroed, its own
        epoch count from 0. The other members go on undisturbed. Every per-member tensor is
        written in place, so a captured CUDA graph and a compiled loss stay valid; each once
        for all the slots. ConfigError if this population cannot host a configuration
        (`can_host`).
        """
        configs = [c.validate() for c in configs]
        for k, config in zip(slots, configs, strict=True):
            if not self.can_host(config):
                raise ConfigError(f"population: cannot refill slot {k} with this configuration: "
                                  f"it needs another shape, confidence method or distillation "
                                  f"loss than the population was built with")
        rows = [self.result(k) for k in slots]
        self.model.reset_members(slots, [c.seed for c in configs])
        self.optimizer.zero_member_state(slots)
        self._set_member_configs(slots, configs)
        for k in slots:
            self.members[k] = MemberRecord()
            self.epochs[k] = 0
        return rows

    def prune(self, k: int) -> None:
        """Member k stops training now: frozen like a completed member, with its best metrics
        so far and status "pruned". A member that has already stopped keeps its status."""
        if self.members[k].status == "running":
            self.members[k].status = "pruned"

    def _set_member_configs(self, slots: list[int], configs: list[UniversalConfig]) -> None:
        """The slots' configurations in every place that holds one per member (parameters
        and optimizer state aside)."""
        for k, config in zip(slots, configs, strict=True):
            self.configs[k] = config
            self._config_columns[k] = config.flat()
        self.objective.set_members(slots, configs)
        self.optimizer.set_members(slots, configs)

    def train_epoch(self) -> torch.Tensor:
        """One pass over the training batches; returns the mean loss per member [K]."""
        weights = self.objective.layer_weights(self.epochs)
        running = torch.tensor([m.status == "running" for m in self.members])
        # Layers the training members weigh: a frozen member's weights cost no compute, and
        # do not give a training member a head it would not have in a population of its own.
        layers = tuple(active_layers(weights[running.to(weights.device)] if running.any()
                                     else weights))
        self._weights.copy_(weights)
        self._active.copy_(running)
        if not self.cuda_graphs:
            self._epoch_body(layers)
        else:
            if layers not in self._graphs:
                self._graphs[layers] = self._capture(layers)
            self._graphs[layers].replay()
        return self._total / len(self.corpus.train_x)

    def train_step(self, x: torch.Tensor, y: torch.Tensor,
                   layers: tuple[int, ...]) -> torch.Tensor:
        """One optimiser step on batch (x, y) with this epoch's weights; loss per member [K]."""
        loss = self._loss(self.model, x, y, self._weights, list(layers))
        loss.sum().backward()  # members share no parameters: one backward serves all
        self.optimizer.step(self._active, clip=True)
        return loss.detach()

    def _epoch_body(self, layers: tuple[int, ...]) -> None:
        self._total.zero_()
        for x, y in zip(self.corpus.train_x, self.corpus.train_y):
            self._total += self.train_step(x, y, layers)

    def _capture(self, layers: tuple[int, ...]) -> torch.cuda.CUDAGraph:
        """Record one epoch as a CUDA graph (PyTorch's whole-network capture recipe).

        The warm-up step that capture needs would train the model, so the state is saved
        before it and restored after: capturing leaves the trajectory exactly as eager.
        """
        saved = [t.clone() for t in self._state_tensors()]
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self.train_step(self.corpus.train_x[0], self.corpus.train_y[0], layers)
        torch.cuda.current_stream().wait_stream(stream)
        for tensor, copy in zip(self._state_tensors(), saved):
            tensor.copy_(copy)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            self._epoch_body(layers)
        return graph

    def _state_tensors(self) -> list[torch.Tensor]:
        o = self.optimizer
        return [p.data for p in o.params] + o.m + o.v + [o.steps]

    def run_epoch(self) -> list[dict[str, Any]]:
        """Train and evaluate one epoch; returns one row per member still running."""
        start = time.perf_counter()
        self.model.train()
        train_loss = self.train_epoch()
        self.model.eval()
        stats = self.objective.evaluate(self.model, zip(self.corpus.val_x, self.corpus.val_y))
        # Python numbers from here: indexing K tensors member by member costs more than this.
        stats = to_host({"train_loss": train_loss, **stats})
        train_loss = stats["train_loss"]
        seconds = time.perf_counter() - start
        rows = []
        for k, (config, member) in enumerate(zip(self.configs, self.members)):
            if member.status != "running":
                continue
            ppl = stats["ppl"][k]
            member.epochs_run += 1
            member.train_seconds += seconds
            epoch = self.epochs[k]  # counted from 0, as the alpha schedule takes it
            number = epoch + 1  # what users see: epochs counted from 1
            rows.append({"member": k, "epoch": number, "train_loss": train_loss[k],
                         "val_ppl": ppl, "val_bpc": self.corpus.bits_per_char(ppl),
                         "acc": stats["acc"][k],
                         "shallow_ratio": stats["shallow_ratio"][k],
                         "compute_cost": stats["compute_cost"][k],
                         "alpha": config.get_layer_weights(epoch)[config.exits[0]],
                         "epoch_seconds": seconds})
            if not math.isfinite(train_loss[k]):
                ppl = math.nan
            if member.observe(number, ppl, config.patience):
                member.best = _best_metrics(stats, k)
            self.epochs[k] = number
            if number >= self.max_epochs and member.status == "running":
                member.status = "completed"
        return rows

    def results(self) -> list[dict[str, Any]]:
        """One result row per member: its configuration, best-epoch metrics and provenance."""
        return [self.result(k) for k in range(len(self.configs))]

    def result(self, k: int) -> dict[str, Any]:
        """Member k's result row (a refill needs only the leaving member's: building all K
        rows per refilled slot made an epoch boundary of a pruned sweep take seconds)."""
        member = self.members[k]
        row = {**self._config_columns[k], **EMPTY_METRICS, **member.best}
        row.update(member=k, cohort_size=len(self.configs), epochs_run=member.epochs_run,
                   train_seconds=member.train_seconds, status=member.status,
                   error=member.error, ufw_version=ufw.__version__,
                   torch_version=torch.__version__, device=device_name(self.device),
                   dataset=self.corpus.name, tokenizer=self.corpus.tokenizer,
                   vocab_size=self.corpus.vocab_size)
        if member.best_epoch >= 1:
            row.update(best_ppl=member.best_ppl, best_epoch=member.best_epoch,
                       best_bpc=self.corpus.bits_per_char(member.best_ppl))
        return row

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue training exactly where it stopped, refilled slots'
        configurations included (tensors and JSON values: ufw.tensorfile can save it)."""
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "members": [vars(m).copy() for m in self.members], "epoch": self.epoch,
                "epochs": list(self.epochs), "configs": [c.to_dict() for c in self.configs]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`'s state, on a population of the same shape and size.

        Slots refilled since this population's configurations were chosen get their
        configuration back from the state. A state from before per-member epochs (one
        shared "epoch", no "configs") still loads.
        """
        configs = [UniversalConfig.from_dict(c) for c in state.get("configs", [])]
        if configs and (len(configs) != len(self.configs)
                        or not all(self.can_host(c) for c in configs)):
            raise ConfigError("population: the saved state is of another population (size, "
                              "shape, confidence methods or distillation)")
        if configs:
            self._set_member_configs(list(range(len(configs))), configs)
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.members = [MemberRecord(**m) for m in state["members"]]
        self.epochs = list(state.get("epochs", [state["epoch"]] * len(self.members)))

    def save_member(self, k: int, path: str) -> None:
        """Save member k as a standalone model (usable as a distillation teacher).

        A safetensors file (ufw.tensorfile): loading it never runs code from it.
        """
        tensorfile.save(path, {"config": self.configs[k].to_dict(),
                               "vocab_size": self.corpus.vocab_size, "vocab": self.corpus.vocab,
                               "tokenizer": self.corpus.tokenizer,
                               "state": self.model.member_state(k)}, tensorfile.MODEL)


def to_host(tensors: dict[str, torch.Tensor]) -> dict[str, list]:
    """Tensors with a leading member axis, as Python lists, in one copy to the host: each copy
    waits for the device, and on a GPU shared with another trial for its turn there too."""
    flat = torch.cat([t.reshape(len(t), -1).double() for t in tensors.values()], 1).cpu()
    lists, column = {}, 0
    for name, t in tensors.items():  # float64 holds every float32 and int value exactly
        width = t[0].numel()
        lists[name] = flat[:, column:column + width].reshape(t.shape).to(t.dtype).tolist()
        column += width
    return lists


def _best_metrics(stats: dict[str, list], k: int) -> dict[str, Any]:
    """Member k's metrics of this epoch (`stats`: Objective.evaluate's, as lists)."""
    curve = [{"threshold": t, "ppl": stats["curve_ppl"][k][g],
              "compute_cost": stats["curve_compute_cost"][k][g],
              "shallow_ratio": stats["curve_shallow_ratio"][k][g]}
             for g, t in enumerate(THRESHOLD_GRID)]
    return {"acc": stats["acc"][k], "shallow_ratio": stats["shallow_ratio"][k],
            "compute_cost": stats["compute_cost"][k],
            "expert_ffns_per_token": stats["expert_ffns_per_token"][k],
            "exit_shares": json.dumps([round(s, 6) for s in stats["exit_shares"][k]]),
            "threshold_curve": json.dumps(curve)}


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return "cpu"


def members_that_fit(config: UniversalConfig, corpus: Corpus, device: str = "cuda",
                     memory_fraction: float = 1.0, precision: str = "fp32",
                     probe_members: int = 8, limit: int = 1024, compile: bool = False) -> int:
    """How many members like `config` fit in `memory_fraction` of the GPU's free memory.

    Measures the peak memory of one training step and one evaluation of a small population,
    then scales it: memory grows linearly with members (every tensor has a member axis).
    Keeps 30% headroom for CUDA graphs, the allocator's fragmentation and checkpoints.
    The probe runs eagerly, with the attention a compiled population would run (eager keeps
    at least as much for the backward as compiled).
    """
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    torch.cuda.reset_peak_memory_stats(device)
    base = torch.cuda.memory_allocated(device)
    attention = attention_kernel(ModelShape.of(config, corpus.vocab_size).head_dim,
                                 torch.device(device), compile)
    probe = Population([config.with_overrides({"seed": k}) for k in range(probe_members)],
                       corpus, device, cuda_graphs=False, precision=precision,
                       attention=attention)
    layers = tuple(active_layers(probe.objective.layer_weights(0)))
    probe.train_step(probe.corpus.train_x[0], probe.corpus.train_y[0], layers)
    probe.objective.evaluate(probe.model, zip(probe.corpus.val_x, probe.corpus.val_y))
    per_member = (torch.cuda.max_memory_allocated(device) - base) / probe_members
    del probe
    torch.cuda.empty_cache()
    return max(1, min(limit, int(free * memory_fraction * 0.7 / per_member)))


def train(configs: list[UniversalConfig], corpus: Corpus, device: str = "cpu",
          on_epoch: Callable[[Population, list[dict]], None] | None = None,
          state: dict | None = None, precision: str = "fp32",
          compile: bool = False) -> list[dict[str, Any]]:
    """Train a population to the end; `on_epoch` sees each epoch's rows (report, checkpoint)."""
    population = Population(configs, corpus, device, compile=compile, precision=precision)
    if state is not None:
        population.load_state_dict(state)
    while not population.finished:
        rows = population.run_epoch()
        if on_epoch is not None:
            on_epoch(population, rows)
    return population.results()


def main(argv: list[str] | None = None) -> int:
    from ufw import cli, rerun

    parser = cli.parser("python -m ufw.train", "Train one configuration; print its JSON row "
                                               "(every column: docs/design.md).")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a named preset: " + ", ".join(cli.preset_names()))
    source.add_argument("--config", help="a YAML file of config keys (docs/knobs.md)")
    source.add_argument("--from", dest="results", metavar="RESULTS",
                        help="re-train a row of a sweep (RESULTS: results/<sweep>), with "
                             "--config-id: its configuration on the sweep's data")
    parser.add_argument("--config-id", help="with --from: the row's config_id (or a prefix)")
    parser.add_argument("--seed", type=int, help="random seed (initialisation); with --from: "
                                                 "which seed of the row (default: its first)")
    parser.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")
    cli.speed_flags(parser)
    args = parser.parse_args(argv)
    if (args.results is None) != (args.config_id is None):
        parser.error("--from and --config-id go together")
    with cli.user_errors():
        device = cli.check_device(args.device)
        data, preset, again = None, args.preset, None
        if args.results is not None:
            again = rerun.rerun_of(args.results, args.config_id, args.seed)
            config = again.config.with_overrides(cli.parse_sets(args.set))
            data, preset = again.data, again.preset
            if data is None and all(getattr(args, k) is None for k in cli.DATA_KEYS):
                raise ConfigError(f"--from {args.results}: no sweep.json records its data; "
                                  f"give the data flags (the row says {again.row['dataset']})")
            for note in again.notes:
                print(f"note: {note}", file=sys.stderr)
        else:
            config = cli.config_from_args(args)
        corpus = cli.corpus_from_args(args, config, data)
        # Still a user error while training starts: a teacher of another vocabulary.
        row = train([config], corpus, device, on_epoch=print_progress,
                    precision=args.precision, compile=args.compile)[0]
    row["preset"] = preset
    if again is not None and again.row.get("best_ppl") and again.config.seed == again.row["seed"]:
        before = again.row["best_ppl"]
        print(f"note: best_ppl {row['best_ppl']:.6f}, the row's {before:.6f} (relative "
              f"difference {abs(row['best_ppl'] - before) / before:.1e})", file=sys.stderr)
    print(json.dumps(json_row(row), allow_nan=False))
    return 0


def print_progress(population: Population, rows: list[dict[str, Any]]) -> None:
    """One line per epoch on stderr (stdout is the JSON row): a long run shows it is alive."""
    for row in rows:
        left = population.max_epochs - row["epoch"]
        member = f" member {row['member']}" if len(population.configs) > 1 else ""
        print(f"epoch {row['epoch']}/{population.max_epochs}{member}: train loss "
              f"{row['train_loss']:.4f}, val PPL {row['val_ppl']:.3f}, "
              f"{row['epoch_seconds']:.1f} s/epoch, ETA {left * row['epoch_seconds']:.0f} s",
              file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
