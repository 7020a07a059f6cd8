"""A sweep on a multi-node Ray cluster, all on this machine, that loses a worker node.

`ray.cluster_utils.Cluster` starts a head node (1 CPU, no `fake_gpu`) and two worker nodes
(1 CPU and one `fake_gpu` each: a custom resource standing in for a GPU). The sweep runs as
its own driver process joined with `--address` (so this process needs no `ray.init` and
does not meet the session's local Ray of conftest.py) and asks for `--resources-per-trial
'{"fake_gpu": 1}'`, so its trials run on the workers only, one per worker. Once trials have
finished on both workers and the two running trials have checkpointed, one worker is killed
(no graceful shutdown) and a fresh one joins: the interrupted trial must be retried from its
checkpoint, and the sweep must end with every configuration x seed exactly once. About 20 s
on 2 CPU cores.

Cluster nodes are added and removed from the main thread (Ray's node starts install a
SIGTERM handler, which only the main thread may do); the driver is a subprocess.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from ufw import sweep
from ufw.results import read_epochs, read_trials

ROOT = Path(__file__).resolve().parents[1]

NUM_SAMPLES, SEEDS, MAX_EPOCHS = 6, 2, 8
# Every trial trains all MAX_EPOCHS epochs (no early stop), so that it lasts long enough for
# the node under it to be killed mid-trial.
SPACE = f"""\
fixed: {{dim: 16, num_heads: 2, max_epochs: {MAX_EPOCHS}, patience: {MAX_EPOCHS},
        batch_size: 8, seq_len: 32}}
data: {{train_chars: 8000, val_chars: 3000}}
parameters:
  routing_threshold: {{type: float, low: 0.5, high: 1.0}}
  lr: {{type: float, low: 1.0e-3, high: 1.0e-2, log: true}}
"""
# A lost node is noticed after health checks fail (period x threshold), not Ray's 30 s.
SYSTEM_CONFIG = {"health_check_initial_delay_ms": 0, "health_check_period_ms": 500,
                 "health_check_timeout_ms": 500, "health_check_failure_threshold": 3}
WORKER = {"num_cpus": 1, "resources": {"fake_gpu": 1}}
CHECKPOINT = re.compile(r"checkpoint_(\d+)$")


@pytest.fixture
def cluster():
    """A head and two `fake_gpu` workers on localhost; every node is removed afterwards.

    Starting a node in this process repoints some of its Ray globals at the new cluster: the
    internal KV client (a later use of the session's local Ray, conftest.py, would wait on a
    dead GCS and abort), the SIGTERM handler, the address file of `ray.init()`. The fixture
    puts them back.
    """
    pytest.importorskip("ray")
    from ray._common.utils import reset_ray_address
    from ray._private.utils import read_ray_address, write_ray_address
    from ray.cluster_utils import Cluster
    from ray.experimental import internal_kv

    saved_kv = (internal_kv.global_gcs_client, internal_kv._initialized)
    saved_sigterm = signal.getsignal(signal.SIGTERM)
    saved_address = read_ray_address()
    cluster = None
    try:
        cluster = Cluster(initialize_head=True, connect=False, shutdown_at_exit=True,
                          head_node_args={"num_cpus": 1, "include_dashboard": False,
                                          "_system_config": SYSTEM_CONFIG})
        for _ in range(2):
            cluster.add_node(**WORKER)
        cluster.wait_for_nodes()
        yield cluster
    finally:
        # Not cluster.shutdown(): it would also reset the internal KV client.
        for node in [*cluster.worker_nodes, cluster.head_node] if cluster else []:
            if node is not None:
                try:
                    cluster.remove_node(node, allow_graceful=False)
                except Exception as e:  # teardown goes on: the other nodes must go too
                    logging.getLogger(__name__).warning("removing a Ray node: %s", e)
        if cluster is not None:
            cluster.global_state.disconnect()
        internal_kv.global_gcs_client, internal_kv._initialized = saved_kv
        signal.signal(signal.SIGTERM, saved_sigterm)
        reset_ray_address()
        if saved_address:
            write_ray_address(saved_address)


def finished_nodes(sweep_dir: Path) -> dict[str, str]:
    """Finished trials (their trials part is written) -> the node id they ran on."""
    nodes = {}
    for part in (sweep_dir / "trials").glob("part-*.parquet"):
        node_ids = pq.read_table(part, columns=["node_id"]).column("node_id").to_pylist()
        nodes[part.stem[len("part-"):]] = node_ids[0]
    return nodes


def registered_checkpoints(experiment: Path, finished: set[str]) -> dict[str, int]:
    """Unfinished trials whose driver has taken a checkpoint of epoch >= 2: trial -> index.

    With CheckpointConfig(num_to_keep=1), the driver deletes checkpoint_000000 once it has
    registered checkpoint_000001, so a trial directory holding only checkpoint_00000k, k >= 1,
    has a checkpoint the driver knows (a worker writes a checkpoint before reporting it).
    """
    found = {}
    for trial_dir in experiment.iterdir() if experiment.is_dir() else []:
        if trial_dir.name in finished or not trial_dir.is_dir():
            continue
        indices = sorted(int(m.group(1)) for p in trial_dir.iterdir()
                         if (m := CHECKPOINT.match(p.name)))
        if indices and indices[0] >= 1:
            found[trial_dir.name] = indices[-1]
    return found


@pytest.mark.slow
def test_sweep_survives_losing_a_worker_node(cluster, tmp_path):
    space = tmp_path / "multinode.yaml"
    space.write_text(SPACE)
    results = tmp_path / "results"
    name = "multinode"
    sweep_dir = results / name
    log = tmp_path / "driver.log"
    command = [sys.executable, "-m", "ufw.sweep", str(space), "--address", cluster.address,
               "--results", str(results), "--name", name, "--num-samples", str(NUM_SAMPLES),
               "--seeds", str(SEEDS), "--resources-per-trial", '{"fake_gpu": 1}']
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    workers = list(cluster.worker_nodes)
    worker_ids = {node.node_id for node in workers}
    start = time.time()
    with open(log, "w") as out:
        driver = subprocess.Popen(command, cwd=ROOT, env=env, stdout=out,
                                  stderr=subprocess.STDOUT, text=True)
        try:
            # Each worker runs one trial at a time. Once trials have finished on both workers
            # and the two running ones have a checkpoint the driver knows and epochs left to
            # train, kill the first worker: its trial is interrupted.
            killed_at = None
            deadline = time.time() + 120
            while time.time() < deadline and driver.poll() is None:
                finished = finished_nodes(sweep_dir)
                running = registered_checkpoints(sweep_dir / "ray", set(finished))
                if (len(set(finished.values())) >= 2 and len(running) >= 2
                        and max(running.values()) <= MAX_EPOCHS - 4):
                    killed_at = dict(running)
                    cluster.remove_node(workers[0], allow_graceful=False)
                    fresh = cluster.add_node(**WORKER)
                    worker_ids.add(fresh.node_id)
                    break
                time.sleep(0.05)
            assert killed_at, ("no moment with two checkpointed trials running",
                               log.read_text())
            driver.wait(timeout=120)
        finally:
            if driver.poll() is None:
                driver.kill()
                driver.wait()
    elapsed = time.time() - start
    output = log.read_text()
    assert driver.returncode == 0, output
    assert "retrying from its last checkpoint" in output, output

    frame = read_trials(str(sweep_dir))
    assert len(frame) == NUM_SAMPLES * SEEDS, frame[["trial_id", "config_id", "seed", "status"]]
    assert not frame.duplicated(["config_id", "seed"]).any()
    assert frame["config_id"].nunique() == NUM_SAMPLES
    assert set(frame["status"]) == {"completed"}, frame[["status", "error"]]
    assert (frame["epochs_run"] == MAX_EPOCHS).all()
    # Trials ran on the fake_gpu workers (never the head, which has none), on both of them.
    assert set(frame["node_id"]) <= worker_ids
    assert frame["node_id"].nunique() >= 2, frame[["trial_id", "node_id"]]
    # The trial on the killed worker went on from its checkpoint, not from scratch.
    resumed = frame[frame["resumed_from_epoch"] > 0]
    assert len(resumed), (killed_at, frame[["trial_id", "node_id", "resumed_from_epoch"]])
    assert set(resumed["trial_id"]) <= set(killed_at)
    assert (resumed["resumed_from_epoch"] >= 2).all()
    # Its epochs from before the loss are kept once, the ones after it added once.
    epochs = read_epochs(str(sweep_dir))
    assert not epochs.duplicated(["trial_id", "member", "epoch"]).any()
    assert len(epochs) == NUM_SAMPLES * SEEDS * MAX_EPOCHS
    print(f"multi-node sweep: {elapsed:.1f}s; killed with checkpoints {killed_at}")


# ---------------------------------------------------------------------- the flags, no Ray run
def plan_of(tmp_path: Path, *flags: str) -> sweep.Plan:
    space = tmp_path / "multinode.yaml"
    space.write_text(SPACE)
    args = sweep.build_parser().parse_args([str(space), "--results", str(tmp_path / "r"),
                                            "--num-samples", str(NUM_SAMPLES), *flags])
    return sweep.make_plan(args)


def test_concurrency_on_a_cluster_is_every_trial_unless_capped(tmp_path):
    # An autoscaling cluster starts with no GPU worker: what is there says nothing.
    plan = plan_of(tmp_path, "--address", "auto", "--gpus-per-trial", "1")
    assert sweep._concurrency(plan, {"CPU": 2}) == NUM_SAMPLES
    plan = plan_of(tmp_path, "--address", "auto", "--cohort", "4")
    assert sweep._concurrency(plan, {"CPU": 2}) == 2  # 6 configurations: 2 trials
    plan = plan_of(tmp_path, "--address", "auto", "--max-concurrent", "3")
    assert sweep._concurrency(plan, {"CPU": 2}) == 3
    # Without --address: what this machine's Ray fits, by every resource a trial asks for.
    plan = plan_of(tmp_path, "--resources-per-trial", '{"fake_gpu": 0.5}')
    assert sweep._concurrency(plan, {"CPU": 8, "fake_gpu": 1}) == 2
    assert sweep._concurrency(plan, {"CPU": 1, "fake_gpu": 4}) == 1
    assert sweep._concurrency(plan, {"CPU": 64, "fake_gpu": 64}) == NUM_SAMPLES
    plan = plan_of(tmp_path, "--gpus-per-trial", "0.25", "--cpus-per-trial", "2")
    assert sweep._concurrency(plan, {"CPU": 16, "GPU": 1}) == 4
    assert sweep._concurrency(plan, {"CPU": 4, "GPU": 1}) == 2


def test_resources_per_trial_reach_the_trials_placement(tmp_path):
    pytest.importorskip("ray")
    plan = plan_of(tmp_path, "--resources-per-trial", '{"fake_gpu": 0.5, "big_disk": 1}',
                   "--gpus-per-trial", "0.25")
    assert plan.resources_per_trial == {"fake_gpu": 0.5, "big_disk": 1.0}
    bundles = sweep._trainable(plan)._resources.bundles
    assert bundles == [{"CPU": 1.0, "GPU": 0.25, "fake_gpu": 0.5, "big_disk": 1.0}]


@pytest.mark.parametrize(("value", "message"), [
    ("{fake_gpu: 1}", "is not JSON"),
    ('["fake_gpu"]', "expected a JSON object"),
    ('{"fake_gpu": -1}', "must be a number >= 0"),
    ('{"fake_gpu": "one"}', "must be a number >= 0"),
    ('{"GPU": 1}', "use --cpus-per-trial or --gpus-per-trial"),
])
def test_bad_resources_per_trial_exit_2(tmp_path, capsys, value, message):
    space = tmp_path / "multinode.yaml"
    space.write_text(SPACE)
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([str(space), "--results", str(tmp_path), "--resources-per-trial", value])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--resources-per-trial" in err and message in err and "Traceback" not in err


@pytest.mark.slow
def test_pruning_decisions_are_shared_by_trials_on_both_nodes(cluster, tmp_path):
    """--pruner asha with cohorts of 2 on two worker nodes: the study actor runs beside the
    driver (on the head) and every trial reports to it, so the rungs the pruner compares
    hold configurations trained on both nodes, and each configuration has one row."""
    from ufw.study import load_study

    space = tmp_path / "multinode.yaml"
    space.write_text(SPACE)
    results = tmp_path / "results"
    command = [sys.executable, "-m", "ufw.sweep", str(space), "--address", cluster.address,
               "--results", str(results), "--name", "mp", "--num-samples", "8",
               "--cohort", "2", "--pruner", "asha", "--reduction-factor", "2",
               "--resources-per-trial", '{"fake_gpu": 1}']
    done = subprocess.run(command, cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout + done.stderr
    frame = read_trials(str(results / "mp"))
    assert len(frame) == 8 and frame["config_id"].is_unique
    assert (frame["status"] == "pruned").sum() >= 1, frame[["status", "epochs_run"]]
    assert frame["node_id"].nunique() == 2  # both workers trained configurations
    trials = {t.number: t for t in load_study(str(results / "mp" / "study.journal")).trials}
    # Rung 0 (after epoch 1) of the one pruner holds configurations from both nodes.
    rung0 = [trials[int(n)].system_attrs.get("completed_rung_0") is not None
             for n in frame["optuna_number"]]
    assert frame.loc[rung0, "node_id"].nunique() == 2, frame[["node_id", "status"]]
