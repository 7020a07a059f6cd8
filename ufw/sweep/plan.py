"""The plan of a sweep: its command line, what it asks of Ray per trial, and the record
(`sweep.json`) that lets `--resume` continue it as it was started. No Ray is started here."""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import socket
import time
from dataclasses import dataclass
from typing import Any

import torch

import ufw
from ufw import cli
from ufw.config import ConfigError
from ufw.data import load_corpus
from ufw.memory import check_fits
from ufw.results import SWEEP_RECORD, join, read_sweep_record
from ufw.space import (
    SearchSpace,
    as_number,
    is_numeric_key,
    knob_name,
    load_space,
    space_from_dict,
)
from ufw.study import study_file
from ufw.sweep.study_service import PRUNERS
from ufw.train import members_that_fit


@dataclass
class Plan:
    space: SearchSpace
    space_path: str
    name: str
    root: str  # results root: a directory or a URI
    num_samples: int
    cohort: int
    seeds: int
    max_concurrent: int | None
    cpus_per_trial: float
    gpus_per_trial: float
    overrides: dict[str, Any]
    data: dict[str, Any]
    dataset: str
    resume: bool
    address: str | None
    resources_per_trial: dict[str, float] = dataclasses.field(default_factory=dict)
    precision: str = "fp32"
    compile: bool = False
    checkpoint_seconds: float = 0.0
    source_sweep: str | None = None  # the sweep whose configurations this one re-trains
    # --pruner and its knobs ({"pruner": "none"}: every configuration trains to its end)
    pruning: dict[str, Any] = dataclasses.field(default_factory=lambda: {"pruner": "none"})

    @property
    def study_actor(self) -> bool:
        """Whether trials get their configurations from the sweep's study actor (a cohort, or
        explicit points); else one configuration per trial from Ray Tune's OptunaSearch."""
        return self.cohort > 1 or bool(self.space.points)

    @property
    def refill(self) -> bool:
        """Whether a cohort trial hands the slot of a configuration that is done (early-stopped,
        at max_epochs, pruned, failed) to a new one from the study actor (ufw/sweep/cohort.py).
        Without it a slot stays frozen, still computed, until its population's longest
        member ends: ~12% of a no-pruning alpha_lr.yaml sweep's GPU time."""
        return self.study_actor

    @property
    def ray_scheduler(self) -> bool:
        """With one configuration per Ray trial, Ray Tune's own scheduler prunes."""
        return self.pruning["pruner"] != "none" and not self.study_actor

    @property
    def sweep_uri(self) -> str:
        return join(self.root, self.name)

    @property
    def experiment_path(self) -> str:
        return join(self.sweep_uri, "ray")

    @property
    def study_file(self) -> str:
        """The sweep's Optuna study (a journal file, ufw/study.py)."""
        return study_file(self.root, self.name)

    @property
    def num_trials(self) -> int:
        return -(-self.num_samples // self.cohort)

    def spec(self) -> dict[str, Any]:
        """What every trial needs (it travels in the trial config)."""
        return {"sweep": self.name, "fixed": self.space.fixed, "overrides": self.overrides,
                "seeds": self.seeds, "data": self.data, "dataset": self.dataset,
                "objectives": [[o.metric, o.direction] for o in self.space.objectives],
                "cpus_per_trial": self.cpus_per_trial, "precision": self.precision,
                "compile": self.compile, "checkpoint_seconds": self.checkpoint_seconds,
                "source_sweep": self.source_sweep, "pruning": self.pruning,
                "report_rows": self.ray_scheduler, "num_samples": self.num_samples,
                "refill": self.refill}


def build_parser() -> cli.ArgumentParser:
    p = cli.parser("python -m ufw.sweep",
                   "Sweep early-exit training hyperparameters with Ray Tune + Optuna; "
                   "results go to Parquet (see docs/sweep.md; every column: "
                   "docs/design.md).")
    p.add_argument("space", metavar="SPACE", help="search space YAML (search_spaces/*.yaml)")
    p.add_argument("--num-samples", type=int, help="configurations to sample")
    p.add_argument("--cohort", type=_cohort,
                   help="configurations trained together as one population per Ray trial, "
                        "or auto: as many as fit the trial's share of free GPU memory")
    p.add_argument("--seeds", type=int, help="seeds per configuration (42, 43, ...)")
    p.add_argument("--gpus-per-trial", type=float, default=0.0,
                   help="GPUs per trial (fractions share a GPU); default 0")
    p.add_argument("--cpus-per-trial", type=float, default=1.0, help="CPUs per trial; default 1")
    p.add_argument("--resources-per-trial", metavar="JSON",
                   help='custom Ray resources per trial, e.g. \'{"a100": 1}\' (a JSON object of '
                        "resource name to amount; nodes declare them with ray start "
                        "--resources)")
    p.add_argument("--max-concurrent", type=int, help="most trials running at once")
    p.add_argument("--address", help="Ray cluster: auto or HOST:PORT (default: start a local "
                                     "Ray sized to this machine)")
    p.add_argument("--results", default="results",
                   help="results root, a directory or URI (s3://..., file://...); default "
                        "results")
    p.add_argument("--name", help="sweep name (default: SPACE's name and the time)")
    p.add_argument("--resume", action="store_true",
                   help="continue an interrupted sweep (--name, or the latest of SPACE)")
    cli.speed_flags(p)
    p.add_argument("--pruner", choices=PRUNERS, default="none",
                   help="stop poor configurations early, each on its own: asha (asynchronous "
                        "successive halving), hyperband, median, or none (default). With "
                        "--cohort > 1 Optuna's pruner over the sweep's study decides and freed "
                        "population slots train new configurations; with --cohort 1 Ray "
                        "Tune's scheduler (ASHA, HyperBand, median stopping) does")
    p.add_argument("--min-resource", type=int, default=1,
                   help="epochs every configuration trains before it can be pruned (ASHA's "
                        "grace period; median: warm-up); default 1")
    p.add_argument("--reduction-factor", type=int, default=3,
                   help="asha, hyperband: 1 in this many configurations goes on at each rung; "
                        "default 3")
    p.add_argument("--max-resource", type=int,
                   help="hyperband (and Ray's ASHA): the most epochs a configuration trains; "
                        "default max_epochs")
    p.add_argument("--checkpoint-seconds", type=float, default=0.0,
                   help="checkpoint a trial, and report its progress to Ray, at most this "
                        "often (0: every epoch); a large population's checkpoint is hundreds "
                        "of MB, so on a GPU use e.g. 60")
    return p


def _cohort(value: str) -> int | str:
    if value == "auto":
        return value
    try:
        return int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer or auto, got {value!r}") from None


def auto_cohort(first, corpus, num_samples: int, seeds: int, gpus_per_trial: float,
                precision: str, compile: bool = False) -> int:
    """Configurations per trial that fit the trial's share of free GPU memory.

    Measured here, on the driver's GPU, which stands for the workers' (same kind in a
    cluster); without one, 8 (a CPU gains little from larger populations).
    """
    if not (gpus_per_trial > 0 and torch.cuda.is_available()):
        return min(8, num_samples)
    members = members_that_fit(first, corpus, "cuda", min(1.0, gpus_per_trial), precision,
                               compile=compile)
    return max(1, min(num_samples, members // seeds))


def _positive(value: Any, flag: str) -> None:
    if value is not None and value < 1:
        raise ConfigError(f"{flag}: must be a positive integer, got {value}")


def parse_resources(text: str | None) -> dict[str, float]:
    """--resources-per-trial: a JSON object of custom resource name -> amount (>= 0)."""
    flag = "--resources-per-trial"
    if text is None:
        return {}
    try:
        value = json.loads(text)
    except ValueError:
        raise ConfigError(f"{flag}: {text!r} is not JSON; expected an object such as "
                          '\'{"a100": 1}\'') from None
    if not isinstance(value, dict):
        raise ConfigError(f"{flag}: expected a JSON object of resource name to amount, got "
                          f"{text!r}")
    resources = {}
    for name, amount in value.items():
        if name.lower() in ("cpu", "gpu", "memory", "object_store_memory"):
            raise ConfigError(f"{flag}: {name!r} is not a custom resource; use --cpus-per-trial "
                              "or --gpus-per-trial")
        if (isinstance(amount, bool) or not isinstance(amount, (int, float))
                or not math.isfinite(amount) or amount < 0):
            raise ConfigError(f"{flag}: {name}: the amount must be a number >= 0, got "
                              f"{amount!r}")
        if not name:
            raise ConfigError(f"{flag}: a resource name must not be empty")
        resources[name] = float(amount)
    return resources


def absolute_data_paths(data: dict[str, Any]) -> dict[str, Any]:
    """The data flags with their local paths made absolute (relative to this directory)."""
    data = dict(data)
    for key in ("train_file", "val_file"):
        if data.get(key):
            data[key] = os.path.abspath(os.path.expanduser(data[key]))
    kind, _, directory = str(data["data"]).partition(":")
    if kind == "wikitext2" and directory:
        data["data"] = f"{kind}:{os.path.abspath(os.path.expanduser(directory))}"
    return data


def make_plan(args) -> Plan:
    space = load_space(args.space)
    for flag in ("num_samples", "seeds", "max_concurrent", "train_chars", "val_chars"):
        _positive(getattr(args, flag), "--" + flag.replace("_", "-"))
    if args.cohort != "auto":
        _positive(args.cohort, "--cohort")
    if args.checkpoint_seconds < 0:
        raise ConfigError(f"--checkpoint-seconds: must be >= 0, got {args.checkpoint_seconds}")
    if args.cpus_per_trial <= 0:
        raise ConfigError(f"--cpus-per-trial: must be > 0, got {args.cpus_per_trial}")
    if args.gpus_per_trial < 0:
        raise ConfigError(f"--gpus-per-trial: must be >= 0, got {args.gpus_per_trial}")
    resources = parse_resources(args.resources_per_trial)
    overrides = {}
    for key, value in cli.parse_sets(args.set).items():
        key = knob_name(key, "--set")
        overrides[key] = as_number(value) if is_numeric_key(key) else value
    first = space.validate_configs(overrides)
    pruning = _pruning(args, space, first.max_epochs)
    # Absolute paths: Ray Tune runs trials in their own directories.
    data = absolute_data_paths(cli.data_flags(args, space.data))
    corpus = load_corpus(**data, batch_size=first.batch_size, seq_len=first.seq_len)
    defaults = space.defaults
    grid = space.sampler["type"] == "grid"
    num_samples = (args.num_samples or defaults["num_samples"]
                   or (space.grid_size if grid else 8))
    if grid and num_samples > space.grid_size:
        raise ConfigError(f"--num-samples: {num_samples} is more than the grid's "
                          f"{space.grid_size} points")
    if not (space.parameters or space.points) and num_samples > 1 and not args.resume:
        raise ConfigError(f"parameters: none, so all {num_samples} samples would be the same "
                          "configuration; give parameters, or --num-samples 1 and --seeds N")
    root = args.results
    if "://" not in root:
        root = os.path.abspath(os.path.expanduser(root))
    plan = Plan(space=space, space_path=str(args.space), name=args.name or "", root=root,
                num_samples=num_samples, cohort=args.cohort or defaults["cohort"],
                seeds=args.seeds or defaults["seeds"], precision=args.precision,
                compile=args.compile, checkpoint_seconds=args.checkpoint_seconds,
                max_concurrent=args.max_concurrent or defaults["max_concurrent"],
                cpus_per_trial=args.cpus_per_trial, gpus_per_trial=args.gpus_per_trial,
                overrides=overrides, data=data, dataset=corpus.name, resume=args.resume,
                address=args.address, resources_per_trial=resources, pruning=pruning)
    if args.name is not None and (not args.name or "/" in args.name
                                  or args.name.startswith(".")):
        raise ConfigError(f"--name: {args.name!r} must be a plain, non-empty name")
    if plan.address:
        check_address(plan.address)
    if plan.cohort == "auto" and not plan.resume:
        plan.cohort = auto_cohort(first, corpus, num_samples, plan.seeds, plan.gpus_per_trial,
                                  plan.precision, plan.compile)
    elif not plan.address:  # a trial's population, on this machine's device
        members = min(plan.cohort, num_samples) * plan.seeds
        on_gpu = plan.gpus_per_trial > 0 and torch.cuda.is_available()
        check_fits(first, corpus.vocab_size, members, "cuda" if on_gpu else "cpu")
    if plan.resume:
        plan.name = plan.name or _latest_sweep(plan)
        if not can_restore(plan.experiment_path):
            raise ConfigError(f"--resume: no sweep to resume at {plan.experiment_path}")
        saved = _load_plan(plan)  # the sweep as it was started, whatever the flags say now
        for key in ("num_samples", "cohort", "seeds", "overrides", "data", "dataset"):
            setattr(plan, key, saved[key])
        plan.pruning = saved.get("pruning", {"pruner": "none"})
        plan.source_sweep = saved.get("source_sweep")
        plan.space = space_from_dict(saved["space"])
    else:
        plan.name = plan.name or f"{space.name}-{time.strftime('%Y%m%d-%H%M%S')}"
        if can_restore(plan.experiment_path):
            raise ConfigError(f"--name: a sweep {plan.name!r} already exists under {root}; "
                              "pass --resume to continue it or another --name")
    return plan


def check_address(address: str, timeout: float = 5.0) -> None:
    """ConfigError unless something listens at --address HOST:PORT. Given an address where
    nothing answers, ray.init retries for many minutes (40 s per attempt, Ray 2.60) before it
    fails; `auto` and other forms are left to Ray, which fails fast for them."""
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or "://" in address:
        return
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"--address {address}: nothing answers there "
                          f"({e.strerror or type(e).__name__}); is the cluster's head running "
                          "(`ray status` on it)? On the head node, --address auto finds it"
                          ) from None


def _pruning(args, space: SearchSpace, max_epochs: int) -> dict[str, Any]:
    """--pruner and its knobs, checked (a pruner needs one objective to rank by)."""
    if args.pruner == "none":
        return {"pruner": "none"}
    if len(space.objectives) > 1:
        raise ConfigError(f"--pruner {args.pruner}: Optuna and Ray Tune prune by one objective; "
                          f"this space has {len(space.objectives)}")
    max_resource = args.max_resource or max_epochs
    if args.min_resource < 1:
        raise ConfigError(f"--min-resource: must be >= 1 epoch, got {args.min_resource}")
    if args.reduction_factor < 2:
        raise ConfigError(f"--reduction-factor: must be >= 2, got {args.reduction_factor}")
    if not args.min_resource <= max_resource:
        raise ConfigError(f"--max-resource: {max_resource} is below --min-resource "
                          f"{args.min_resource}")
    return {"pruner": args.pruner, "min_resource": args.min_resource,
            "reduction_factor": args.reduction_factor, "max_resource": max_resource}


def can_restore(experiment_path: str) -> bool:
    """Whether Ray Tune's experiment state is there (what tune.Tuner.can_restore checks)."""
    import pyarrow.fs as pafs

    from ufw.results import filesystem

    fs, path = filesystem(experiment_path)
    return fs.get_file_info(join(path, "tuner.pkl")).type == pafs.FileType.File


def _latest_sweep(plan: Plan) -> str:
    import pyarrow.fs as pafs

    from ufw.results import filesystem

    fs, base = filesystem(plan.root)
    infos = fs.get_file_info(pafs.FileSelector(base, allow_not_found=True))
    names = sorted(i.base_name for i in infos if i.type == pafs.FileType.Directory
                   and i.base_name.startswith(plan.space.name + "-"))
    for name in reversed(names):
        if can_restore(join(plan.root, name, "ray")):
            return name
    raise ConfigError(f"--resume: no sweep of {plan.space.name} under {plan.root} to resume; "
                      "pass --name")


def _plan_record(plan: Plan) -> dict[str, Any]:
    return {"name": plan.name, "space_path": plan.space_path, "space": plan.space.to_dict(),
            "num_samples": plan.num_samples, "cohort": plan.cohort, "seeds": plan.seeds,
            "overrides": plan.overrides, "data": plan.data, "dataset": plan.dataset,
            "precision": plan.precision, "compile": plan.compile,
            "source_sweep": plan.source_sweep, "pruning": plan.pruning,
            "ufw_version": ufw.__version__, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}


def _save_plan(plan: Plan) -> None:
    """Write the sweep's record (before Ray starts: a disk that cannot take it stops here)."""
    from ufw.results import filesystem, write_atomically
    from ufw.sweep.lock import os_error_text

    fs, base = filesystem(plan.sweep_uri)
    path = join(base, SWEEP_RECORD)
    try:
        fs.create_dir(base, recursive=True)
        write_atomically(fs, path, json.dumps(_plan_record(plan), indent=2,
                                              default=str).encode())
    except OSError as e:
        raise ConfigError(f"--results: cannot write {path} ({os_error_text(e)})") from None


def _load_plan(plan: Plan) -> dict[str, Any]:
    record = read_sweep_record(plan.sweep_uri)
    if record is None:
        raise ConfigError(f"--resume: {join(plan.sweep_uri, SWEEP_RECORD)} is missing or "
                          "unreadable")
    return record


def _trial_resources(plan: Plan) -> dict[str, tuple[str, float]]:
    """Ray resource name -> (the flag that asks for it, amount per trial)."""
    needs = {"CPU": ("--cpus-per-trial", plan.cpus_per_trial)}
    if plan.gpus_per_trial > 0:
        needs["GPU"] = ("--gpus-per-trial", plan.gpus_per_trial)
    for name, amount in plan.resources_per_trial.items():
        if amount > 0:
            needs[name] = ("--resources-per-trial", amount)
    return needs


def _check_resources(plan: Plan) -> None:
    """A trial that can never be placed would wait forever: say so before starting."""
    import ray

    if plan.address:  # a cluster may scale up to fit
        return
    resources = ray.cluster_resources()
    for name, (flag, need) in _trial_resources(plan).items():
        have = resources.get(name, 0)
        if need > have:
            what = "" if flag != "--resources-per-trial" else f" {name}"
            raise ConfigError(f"{flag}:{what} {need:g} requested but this machine's Ray has "
                              f"{have:g}")


def _concurrency(plan: Plan, resources: dict[str, float] | None = None) -> int:
    """Trials at once (and so trials Ray keeps pending): --max-concurrent; on a cluster
    (--address) every trial, since an autoscaling cluster starts without the workers that will
    run them and sizes itself to what is pending; else what this machine's Ray fits."""
    if plan.max_concurrent:
        return plan.max_concurrent
    if plan.address:
        return plan.num_trials
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    slots = plan.num_trials
    for name, (_, need) in _trial_resources(plan).items():
        slots = min(slots, int(resources.get(name, 0) // need))
    return max(1, slots)
