"""Faults injected into real sweeps (real Ray, real Optuna, tiny models).

- The driver is SIGKILLed at points drawn from a fixed seed across one sweep (while it starts,
  mid-trial, while a part is written, while it prints the summary) and resumed each time;
  on the way a second driver and a `--resume` on the same sweep are refused, and a part is
  truncated: the finished sweep has every configuration exactly once.
- A local sweep's Ray listens on loopback only and is gone soon after the driver ends
  (SIGINT, SIGTERM).
- A results directory that cannot be written stops the sweep before Ray starts.
"""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ufw import sweep
from ufw.results import read_epochs, read_trials

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
parameters:
  routing_threshold: {type: float, low: 0.5, high: 1.0}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""
LOOPBACK = ("127.", "::1", "::ffff:127.")


class Driver:
    """`python -m ufw.sweep ...` in the background, its output collected line by line."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-m", "ufw.sweep", *args], cwd=ROOT,
                                        env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.STDOUT, text=True)
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.process.stdout:
            self.lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    def wait_for(self, condition, timeout: float = 240) -> bool:
        """Poll `condition` until it holds (True) or the driver ends first (False)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            if condition():
                return True
            if self.process.poll() is not None:
                return condition()
            time.sleep(0.002)
        raise AssertionError(f"timed out; output so far:\n{self.output}")

    def kill(self, sig: int = signal.SIGKILL) -> bool:
        """Send `sig`; True if the driver was still running."""
        running = self.process.poll() is None
        if running:
            self.process.send_signal(sig)
        return running

    def finish(self, timeout: float = 300) -> int:
        code = self.process.wait(timeout)
        self._reader.join(10)
        return code


def count(results: Path, name: str, kind: str) -> int:
    return len(list((results / name / kind).glob("part-*.parquet")))


@pytest.mark.slow
def test_driver_killed_at_random_points_and_resumed_runs_every_configuration_once(
        ray_local, tiny_space, tmp_path):
    num_samples, name = 16, "faults"
    results = tmp_path / "results"
    space = tiny_space(SPACE, max_epochs=3)
    base = [str(space), "--results", str(results), "--address", ray_local, "--name", name]
    rng = random.Random(14)
    points = ["start", "mid-trial", "part", "part",
              *(rng.choice(["start", "mid-trial", "part"]) for _ in range(4))]
    rng.shuffle(points)
    points.append("summary")
    kills, checked_second_driver, truncated = 0, False, None
    for i, point in enumerate(points):
        driver = Driver(*base, *(["--num-samples", str(num_samples)] if i == 0 else
                                 ["--resume"]))
        epochs_before = count(results, name, "epochs")
        if point == "start":  # Python, the plan, joining Ray, Tune's start
            time.sleep(rng.uniform(0.5, 4.0))
        elif point == "mid-trial":  # a trial has checkpointed an epoch (Tune has started)
            driver.wait_for(lambda: any((results / name / "ray").glob("*/checkpoint_*")))
            time.sleep(rng.uniform(0.0, 1.0))
        elif point == "part":  # the moment a trial's epochs part appears (its trials part next)
            driver.wait_for(lambda b=epochs_before: count(results, name, "epochs") > b)
        else:  # summary: every trial is done and the table is being printed
            driver.wait_for(lambda d=driver: "configurations by" in d.output)
        if point == "mid-trial" and not checked_second_driver and driver.process.poll() is None:
            # One driver per sweep: a second one, or a resume, is refused naming the holder.
            for extra in (["--resume"], ["--num-samples", "2"]):
                second = subprocess.run([sys.executable, "-m", "ufw.sweep", *base, *extra],
                                        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)},
                                        capture_output=True, text=True, timeout=120)
                assert second.returncode == 2, second.stdout + second.stderr
                message = second.stderr.strip()
                assert len(message.splitlines()) == 1
                assert (f"process {driver.process.pid}" in message
                        or "already exists" in message), message
            checked_second_driver = True
        kills += driver.kill()
        driver.finish()
        if truncated is None and count(results, name, "trials") >= 2:
            # A part damaged while the driver was down: the resume sets it aside, reruns it.
            victim = sorted((results / name / "trials").glob("part-*.parquet"))[0]
            victim.write_bytes(victim.read_bytes()[:50])
            truncated = victim.name[len("part-"):-len(".parquet")]
    assert kills >= 8 and checked_second_driver and truncated

    final = Driver(*base, "--resume")
    assert final.finish() == 0, final.output
    assert "Traceback" not in final.output
    frame = read_trials(str(results / name))
    assert len(frame) == num_samples, frame[["trial_id", "config_id", "status"]]
    assert frame["config_id"].is_unique and frame["trial_id"].is_unique
    assert set(frame["status"]) == {"completed"}
    assert truncated in set(frame["trial_id"])  # its trial ran again
    assert (results / name / "trials" / f"_damaged-part-{truncated}.parquet").exists()
    epochs = read_epochs(str(results / name))
    assert not epochs.duplicated(["trial_id", "member", "epoch"]).any()
    assert set(epochs["trial_id"]) == set(frame["trial_id"])
    assert not list((results / name).glob("*/.part-*"))
    assert not (results / name / "driver.lock").exists()  # given back at the end


def listening(processes) -> list[tuple[int, str, str]]:
    """(pid, name, address) of every listening TCP socket of these processes."""
    import psutil

    found = []
    for p in processes:
        try:
            for c in p.net_connections(kind="inet"):
                if c.status == psutil.CONN_LISTEN:
                    found.append((p.pid, p.name(), c.laddr.ip))
        except psutil.Error:
            continue
    return found


@pytest.mark.slow
def test_a_local_sweep_listens_on_loopback_and_its_ray_ends_with_the_driver(tiny_space,
                                                                            tmp_path):
    import ray  # noqa: F401, I001  (first: Ray ships psutil)
    import psutil

    space = tiny_space(SPACE, max_epochs=3)
    results = tmp_path / "results"
    base = [str(space), "--results", str(results), "--name", "local"]
    for i, sig in enumerate((signal.SIGINT, signal.SIGTERM)):
        launched = time.time()
        driver = Driver(*base, *(["--num-samples", "6"] if i == 0 else ["--resume"]))
        parent = psutil.Process(driver.process.pid)
        assert driver.wait_for(lambda t=launched: any(  # a trial of this driver checkpointed
            c.stat().st_mtime > t for c in (results / "local" / "ray").glob("*/checkpoint_*")))
        started = [parent, *parent.children(recursive=True)]
        sockets = listening(started)
        assert any(name == "gcs_server" for _, name, _ in sockets), (sockets, started,
                                                                      driver.output)
        assert [s for s in sockets if not s[2].startswith(LOOPBACK)] == [], sockets
        assert driver.kill(sig)
        driver.finish(120)
        ended = time.time()
        alive = [p for p in started[1:] if p.is_running()
                 and p.status() != psutil.STATUS_ZOMBIE]
        while alive and time.time() - ended < 15:
            time.sleep(0.2)
            alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        assert not alive, (sig, [(p.pid, p.name()) for p in alive], driver.output)


def test_an_unwritable_results_directory_stops_the_sweep_before_ray(tiny_space, tmp_path,
                                                                     capsys):
    space = tiny_space(SPACE)
    read_only = tmp_path / "read-only"
    read_only.mkdir()
    read_only.chmod(0o555)
    # root writes anywhere but in sysfs; anyone else is stopped by the mode
    target = "/sys/ufw-results" if os.geteuid() == 0 else str(read_only / "results")
    with pytest.raises(SystemExit) as exit_info:
        sweep.main([str(space), "--results", target, "--name", "x"])
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.err.startswith("error: --results: cannot write") and not captured.out
