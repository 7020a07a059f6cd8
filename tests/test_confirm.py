"""ufw.confirm: the generated space rebuilds the chosen configurations exactly (fast, no Ray),
and end to end on CPU: fresh seeds, a baseline on the same seeds, rows linked to the source,
resume after the driver is killed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from ufw import confirm, sweep
from ufw.analysis import load_sweep
from ufw.config import PRESETS
from ufw.space import build_config, parse_space, space_from_dict

ROOT = Path(__file__).resolve().parents[1]
SPACE = {
    "fixed": {"preset": "asymmetric_best", "dim": 16, "num_heads": 2},
    "parameters": {
        "routing_threshold": {"type": "float", "low": 0.5, "high": 1.0},
        "schedule": {"type": "categorical", "choices": ["none", "linear"]},
        "alpha_start": {"type": "float", "low": 0.3, "high": 0.9,
                        "condition": {"schedule": "linear"}},
        "layer_lr_scales.2": {"type": "float", "low": 0.1, "high": 1.0, "log": True},
    },
}


def source_sweep(tmp_path: Path, n: int = 6) -> Path:
    """A sweep as ufw.sweep records it: rows from real configurations, and its sweep.json."""
    space = parse_space(SPACE, name="src")
    rows = []
    for i in range(n):
        point = {"routing_threshold": 0.5 + 0.08 * i, "schedule": ["none", "linear"][i % 2],
                 "layer_lr_scales.2": 0.2 + 0.1 * i}
        if point["schedule"] == "linear":
            point["alpha_start"] = 0.4 + 0.05 * i
        config, preset = build_config(space.fixed, point, {"max_epochs": 2})
        rows.append({**config.flat(), "sweep": "src-1", "trial_id": f"t{i}", "member": 0,
                     "preset": preset, "status": "completed", "best_ppl": 10.0 - i,
                     "compute_cost": 0.9, "best_epoch": 1})
    out = tmp_path / "results" / "src-1"
    (out / "trials").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows), out / "trials" / "part-a.parquet")
    record = {"space": space.to_dict(), "overrides": {"max_epochs": 2}, "data": {}, "seeds": 1}
    (out / "sweep.json").write_text(json.dumps(record))
    return out


def test_generated_space_rebuilds_the_top_configurations(tmp_path):
    source = load_sweep(source_sweep(tmp_path))
    generated, base_id, ids = confirm.confirmation_space(source, top=3, seeds=4)
    best = source.trials.sort_values("best_ppl")["config_id"].head(3).tolist()
    assert ids == best  # by the objective, best first
    space = parse_space(generated, name="c")
    configs = [build_config(space.fixed, p, {"max_epochs": 2})[0] for p in space.points]
    assert [c.config_id for c in configs[:3]] == best  # exactly the sweep's configurations
    base = configs[3]  # default baseline: the preset the space starts from, in its setting
    assert base.config_id == base_id and base.dim == 16 and base.max_epochs == 2
    assert base.layer_weights == PRESETS["asymmetric_best"].layer_weights
    assert base.routing_threshold == 0.95
    assert generated["defaults"] == {"seeds": 4, "cohort": 4}
    assert confirm.fresh_first_seed(source) == 43
    other = confirm.confirmation_space(source, 2, 2, baseline="standard_llm")[1]
    assert other != base_id
    with pytest.raises(confirm.AnalysisError, match="nope"):
        confirm.confirmation_space(source, 2, 2, baseline="nope")


def test_point_of_inverts_sampling():
    space = space_from_dict(parse_space(SPACE).to_dict())
    point = {"routing_threshold": 0.7, "schedule": "linear", "alpha_start": 0.5,
             "lr_scale_2": 0.3}  # names as the space stores them (canonical knobs)
    config, _ = build_config(space.fixed, point, {})
    assert space.point_of(config.flat()) == point
    no_alpha = {"routing_threshold": 0.7, "schedule": "none", "lr_scale_2": 0.3}
    assert space.point_of(build_config(space.fixed, no_alpha, {})[0].flat()) == no_alpha


def test_confirm_user_errors(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    for args, word in (([str(tmp_path / "none")], "none"),
                       ([str(source_sweep(tmp_path)), "--top", "0"], "--top")):
        result = subprocess.run([sys.executable, "-m", "ufw.confirm", *args], env=env,
                                capture_output=True, text=True, timeout=120, check=False)
        assert result.returncode == 2 and word in result.stderr
        assert "Traceback" not in result.stderr


@pytest.mark.slow
def test_confirm_end_to_end_with_resume(ray_local, tiny_space, tmp_path):
    space = tiny_space("""
        parameters:
          routing_threshold: {type: float, low: 0.5, high: 1.0}
          lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
        """, preset="asymmetric_best")
    results = tmp_path / "results"
    assert sweep.main([str(space), "--results", str(results), "--name", "src",
                       "--num-samples", "4", "--cohort", "2"]) == 0
    source = pd.read_parquet(results / "src" / "trials")
    top2 = source.sort_values("best_ppl")["config_id"].head(2).tolist()

    command = [sys.executable, "-m", "ufw.confirm", str(results / "src"), "--top", "2",
               "--seeds", "2", "--cohort", "1", "--address", ray_local]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    driver = subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    trials = results / "src-confirm" / "trials"
    deadline = time.time() + 240
    while not list(trials.glob("part-*")) and driver.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    driver.send_signal(signal.SIGKILL)
    first = driver.communicate()[0]
    assert 1 <= len(list(trials.glob("part-*"))) < 3, first

    resumed = subprocess.run([*command, "--resume"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=300, check=False)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert "Sweep PPL" in resumed.stdout and "baseline" in resumed.stdout

    rows = pd.read_parquet(trials)
    assert len(rows) == 6 and (rows["status"] == "completed").all()  # 3 configurations x 2
    assert not rows.duplicated(["config_id", "seed"]).any()
    assert set(rows["source_sweep"]) == {"src"} and set(rows["sweep"]) == {"src-confirm"}
    assert set(rows["seed"]) == {43, 44} and not set(rows["seed"]) & set(source["seed"])
    assert set(top2) < set(rows["config_id"])  # the sweep's two best, re-trained
    (baseline,) = set(rows["config_id"]) - set(top2)
    assert set(rows.loc[rows["config_id"] == baseline, "seed"]) == {43, 44}  # same seeds
    assert set(rows.loc[rows["config_id"] == baseline, "preset"]) == {"asymmetric_best"}
    assert (results / "src-confirm" / "study.journal").is_file()
