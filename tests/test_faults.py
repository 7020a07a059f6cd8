"""Faults injected into real sweeps (real Ray, real Optuna, tiny models).

- The driver is SIGKILLed at points drawn from a fixed seed across one sweep (while it starts,
  mid-trial, while a part is written, while it prints the summary) and resumed each time;
  on the way a second driver and a `--resume` on the same sweep are refused, and a part is
  truncated: the finished sweep has every configuration exactly once.
- A local sweep's Ray listens on loopback only and is gone soon after the driver ends
  (SIGINT, SIGTERM).
- A results directory that cannot be written stops the sweep before Ray starts; one that
  fills up mid-sweep (a real, small filesystem: a tmpfs) stops it with one line, and once
  space is freed `--resume` finishes it: every configuration exactly once.
- Ctrl-C while Ray starts: one line saying how to resume, exit 130, the lock given back and
  no Ray process left.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import random
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from ufw import sweep
from ufw.config import ConfigError
from ufw.results import read_epochs, read_trials
from ufw.sweep.repair import drop_torn_journal_record, repair_experiment_state

ROOT = Path(__file__).resolve().parents[1]
SPACE = """
parameters:
  routing_threshold: {type: float, low: 0.5, high: 1.0}
  lr: {type: float, low: 1.0e-3, high: 1.0e-2, log: true}
"""
LOOPBACK = ("127.", "::1", "::ffff:127.")
# A line of Ray's own logging (e.g. its notice that token authentication is on), not ufw's.
RAY_LOG_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d+\s+(INFO|WARNING) \S+:\d+ -- ")


def ufw_lines(stderr: str) -> list[str]:
    """The lines of a driver's stderr that are not Ray's own INFO or WARNING log lines."""
    return [line for line in stderr.splitlines() if line.strip()
            and not RAY_LOG_LINE.match(line)]


class Driver:
    """`python -m ufw.sweep ...` in the background, its output collected line by line."""

    def __init__(self, *args: str):
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        self.process = subprocess.Popen([sys.executable, "-m", "ufw.sweep", *args], cwd=ROOT,
                                        env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []  # stdout and stderr, as they come
        self.error_lines: list[str] = []  # stderr alone
        self._readers = [threading.Thread(target=self._read, args=(stream, lists), daemon=True)
                         for stream, lists in ((self.process.stdout, [self.lines]),
                                               (self.process.stderr,
                                                [self.lines, self.error_lines]))]
        for reader in self._readers:
            reader.start()

    @staticmethod
    def _read(stream, into: list[list[str]]) -> None:
        for line in stream:
            for lines in into:
                lines.append(line)

    @property
    def output(self) -> str:
        return "".join(self.lines)

    @property
    def errors(self) -> str:
        return "".join(self.error_lines)

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
        for reader in self._readers:
            reader.join(10)
        return code


def count(results: Path, name: str, kind: str) -> int:
    return len(list((results / name / kind).glob("part-*.parquet")))


def resume_to_the_end(base: list[str], sweep_dir: Path, num_samples: int):
    """`--resume` the sweep until it ends: exit 0, every configuration exactly once, each
    with its epochs once. Returns its trials."""
    final = Driver(*base, "--resume")
    assert final.finish() == 0, final.output
    assert "Traceback" not in final.output
    frame = read_trials(str(sweep_dir))
    assert len(frame) == num_samples, frame[["trial_id", "config_id", "status"]]
    assert frame["config_id"].is_unique and frame["trial_id"].is_unique
    assert set(frame["status"]) == {"completed"}
    epochs = read_epochs(str(sweep_dir))
    assert not epochs.duplicated(["trial_id", "member", "epoch"]).any()
    assert set(epochs["trial_id"]) == set(frame["trial_id"])
    return frame


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

    frame = resume_to_the_end(base, results / name, num_samples)
    assert truncated in set(frame["trial_id"])  # its trial ran again
    assert (results / name / "trials" / f"_damaged-part-{truncated}.parquet").exists()
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


def mount_tmpfs(mount_point: Path, options: str):
    """Mount a tmpfs (a real filesystem: we run as root, as CI does) at `mount_point` for the
    test; a generator for a fixture, unmounting at its end."""
    mount_point.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs",
                              str(mount_point)], capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root or CAP_SYS_ADMIN): "
                    f"{mounted.stderr.strip()}")
    yield mount_point
    subprocess.run(["umount", "--lazy", str(mount_point)], check=True)


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB filesystem, so that a sweep can genuinely run out of space."""
    yield from mount_tmpfs(tmp_path / "disk", "size=16m")


@pytest.fixture
def read_only_disk(tmp_path):
    """A filesystem mounted read-only: no one, root included, can write to it."""
    yield from mount_tmpfs(tmp_path / "read-only", "ro,size=1m")


def fill(directory: Path) -> Path:
    """Write a file into `directory` until its filesystem is full; returns the file."""
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(b"\0" * (1 << 16))
        except OSError as e:
            assert e.errno == errno.ENOSPC, e
    return filler


@pytest.mark.slow
@pytest.mark.parametrize("checkpoints", [
    [],  # every epoch: a worker's checkpoint is usually the first write to fail
    ["--checkpoint-seconds", "1000"],  # none: the driver's writes (parts, Ray's state) are
], ids=["checkpoint-every-epoch", "no-checkpoint"])
def test_a_full_results_directory_stops_the_sweep_and_resume_finishes_it(ray_local,
                                                                          tiny_space,
                                                                          small_disk,
                                                                          checkpoints):
    num_samples, name = 6, "full"
    results = small_disk / "results"
    space = tiny_space(SPACE)
    base = [str(space), "--results", str(results), "--address", ray_local, "--name", name]
    driver = Driver(*base, "--num-samples", str(num_samples), *checkpoints)
    assert driver.wait_for(lambda: count(results, name, "trials") >= 2), driver.output
    filler = fill(small_disk)  # mid-sweep: trials are training, the next write fails
    assert driver.finish() == 1, driver.output
    lines = ufw_lines(driver.errors)
    assert len(lines) == 1 and "Traceback" not in driver.errors, driver.errors
    assert re.fullmatch(
        rf"\[{name}\] out of space: cannot write .* under {re.escape(str(results / name))}\S* "
        r"\(No space left on device\); everything written before is intact: free space and "
        rf"resume with: python -m ufw.sweep {re.escape(str(space))} --resume --name {name} "
        rf"--results {re.escape(str(results))}", lines[0]), lines[0]
    # What was written is intact: every part is readable Parquet, no temporary file is left
    # (they would be hidden from readers, but take space), and the lock was given back.
    written = read_trials(str(results / name))
    assert len(written) >= 2 and set(written["status"]) == {"completed"}
    assert not list(results.rglob(".*.tmp")), list(results.rglob(".*.tmp"))
    assert not (results / name / "driver.lock").exists()

    filler.unlink()  # space freed
    frame = resume_to_the_end(base, results / name, num_samples)
    assert set(written["trial_id"]) <= set(frame["trial_id"])  # kept, not re-run


def test_a_results_directory_full_from_the_start_stops_the_sweep_before_ray(tiny_space,
                                                                           small_disk):
    """Out of space at the start: exit 2 and one line, before Ray is even imported."""
    space = tiny_space(SPACE)
    fill(small_disk)
    started = subprocess.run(
        [sys.executable, "-c", CHECK_NO_RAY, str(space), "--results",
         str(small_disk / "results"), "--name", "x"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120)
    assert started.returncode == 2, started.stderr
    assert started.stderr.splitlines() == [
        f"error: --results: cannot write {small_disk / 'results' / 'x'} "
        "(No space left on device)"]
    assert not started.stdout and not list(small_disk.rglob("*.tmp"))


# `python -m ufw.sweep ARGS`, failing (exit 1) if it imported Ray.
CHECK_NO_RAY = """
import sys
from ufw import sweep
try:
    sys.exit(sweep.main(sys.argv[1:]))
finally:
    assert "ray" not in sys.modules
"""


def test_a_journal_record_cut_short_is_dropped_and_the_study_goes_on(tmp_path):
    """A full disk can leave the Optuna journal's last record without its newline; the next
    record appended would be glued to it. Resume drops it; the study then reads and grows."""
    import optuna

    from ufw.study import journal_storage

    path = tmp_path / "study.journal"
    study = optuna.create_study(storage=journal_storage(str(path)), study_name="s")
    study.enqueue_trial({"x": 1.0})
    study.tell(study.ask(), 1.0)
    intact = path.read_bytes()
    path.write_bytes(intact + b'{"op_code": 4, "worker_id": "cut sh')
    assert drop_torn_journal_record(str(path)) and path.read_bytes() == intact
    assert not drop_torn_journal_record(str(path))  # an intact journal is left alone
    study = optuna.load_study(storage=journal_storage(str(path)), study_name="s")
    study.tell(study.ask(), 2.0)
    reread = optuna.load_study(storage=journal_storage(str(path)), study_name="s")
    assert [t.value for t in reread.trials] == [1.0, 2.0]


@pytest.mark.slow
def test_ctrl_c_while_ray_starts_ends_cleanly_and_the_sweep_can_start_again(ray_local,
                                                                            tiny_space,
                                                                            tmp_path):
    import ray  # noqa: F401, I001  (first: Ray ships psutil)
    import psutil

    space = tiny_space(SPACE)
    results = tmp_path / "results"
    base = [str(space), "--results", str(results), "--name", "ctrl-c", "--num-samples", "2"]
    driver = Driver(*base)  # a local Ray: the driver starts it
    parent = psutil.Process(driver.process.pid)
    started: dict[int, psutil.Process] = {}

    def ray_is_starting() -> bool:
        """Ray's first server is up, the rest of Ray still to come (ray.init is running)."""
        with contextlib.suppress(psutil.Error):
            started.update((p.pid, p) for p in parent.children(recursive=True))
        return any(p.name() == "gcs_server" for p in started.values() if p.is_running())

    assert driver.wait_for(ray_is_starting), driver.output
    assert driver.kill(signal.SIGINT)
    while driver.process.poll() is None:  # what Ray still starts meanwhile must end too
        ray_is_starting()
        time.sleep(0.01)
    assert driver.finish(120) == 130, driver.output
    assert "results in" not in driver.output  # it was stopped before Tune, during Ray's start
    assert "Traceback" not in driver.errors
    assert ufw_lines(driver.errors) == ["[ctrl-c] interrupted; no trial had started; run the "
                                        "same command again to start it"], driver.errors
    assert not (results / "ctrl-c" / "driver.lock").exists()  # the lock was given back
    ended = time.time()
    alive = list(started.values())
    while alive and time.time() - ended < 15:
        alive = [p for p in alive if p.is_running() and p.status() != psutil.STATUS_ZOMBIE]
        time.sleep(0.2)
    assert not alive, [(p.pid, p.name()) for p in alive]

    again = Driver(*base, "--address", ray_local)  # the same command: the name is free
    assert again.finish() == 0, again.output
    assert len(read_trials(str(results / "ctrl-c"))) == 2


def test_an_experiment_state_cut_short_is_restored_from_rays_copy_or_set_aside(tmp_path,
                                                                              monkeypatch):
    """Ray copies its experiment state into the results in place; a full disk can cut the
    copy short. Resume takes Ray's staging copy if there is one, else the previous session's
    state, else refuses (exit 2) rather than let Ray start afresh."""
    experiment = tmp_path / "results" / "s" / "ray"
    experiment.mkdir(parents=True)
    older, newer = "2026-01-01_00-00-00", "2026-01-02_00-00-00"
    state = {"trial_data": [], "runner_data": {}}
    (experiment / f"experiment_state-{newer}.json").write_text(json.dumps(state)[:20])
    (experiment / f"searcher-state-{newer}.pkl").write_bytes(b"cut")
    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path / "tmp"))
    with pytest.raises(ConfigError, match="no copy of it is left: start a new sweep"):
        repair_experiment_state(str(experiment))  # the only state, no copy: refused

    staging = (tmp_path / "tmp" / "ray" / "session_x" / "artifacts" / newer / "ray" /
               "driver_artifacts")
    staging.mkdir(parents=True)
    (staging / f"experiment_state-{newer}.json").write_text(json.dumps(state))
    (staging / f"searcher-state-{newer}.pkl").write_bytes(b"whole")
    assert "restored from Ray's copy" in repair_experiment_state(str(experiment))
    assert json.loads((experiment / f"experiment_state-{newer}.json").read_text()) == state
    assert (experiment / f"searcher-state-{newer}.pkl").read_bytes() == b"whole"
    assert repair_experiment_state(str(experiment)) is None  # readable: left alone

    (experiment / f"experiment_state-{older}.json").write_text(json.dumps(state))
    (experiment / f"experiment_state-{newer}.json").write_text("{")
    (staging / f"experiment_state-{newer}.json").write_text("{")  # Ray's copy is no good
    assert f"resuming from experiment_state-{older}.json" in repair_experiment_state(
        str(experiment))
    assert sorted(p.name for p in experiment.iterdir()) == [
        f"_damaged-experiment_state-{newer}.json", f"_damaged-searcher-state-{newer}.pkl",
        f"experiment_state-{older}.json"]


def test_a_read_only_results_directory_stops_the_sweep_before_ray(tiny_space, read_only_disk):
    space = tiny_space(SPACE)
    started = subprocess.run(
        [sys.executable, "-c", CHECK_NO_RAY, str(space), "--results", str(read_only_disk),
         "--name", "x"],
        cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT)}, capture_output=True, text=True,
        timeout=120)
    assert started.returncode == 2, started.stderr
    message = f"error: --results: cannot write {read_only_disk / 'x'} (Read-only file system)"
    assert started.stderr.splitlines() == [message], started.stderr
    assert not started.stdout


def test_the_study_journal_out_of_space_is_named_as_the_study(tmp_path, monkeypatch, ray_local):
    """The study actor's journal write without space raises OutOfSpace naming the study, and
    the driver, which sees it as a trial's error text (through Ray), names the study too,
    not a checkpoint of that trial."""
    import errno

    import ray

    from ufw.space import parse_space
    from ufw.sweep import out_of_space
    from ufw.sweep.callback import error_line
    from ufw.sweep.study_service import StudyService

    space = parse_space({"fixed": {"dim": 16, "num_heads": 2},
                         "parameters": {"lr": {"type": "float", "low": 1e-3, "high": 1e-2}},
                         "sampler": {"type": "random", "seed": 0}})
    service = StudyService(space.to_dict(), str(tmp_path / "study.journal"), "s", 4)

    def full(logs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(service.journal.file, "append_logs", full)
    with pytest.raises(out_of_space.OutOfSpace) as raised:
        service.ask(2, "t")
    assert raised.value.what == f"the sweep's Optuna study {tmp_path / 'study.journal'}"

    @ray.remote
    def actor_call(what, why):
        raise out_of_space.OutOfSpace(what, why)

    with pytest.raises(ray.exceptions.RayTaskError) as through_ray:
        ray.get(actor_call.remote(raised.value.what, raised.value.why))
    assert isinstance(through_ray.value, out_of_space.OutOfSpace)
    text = error_line(str(through_ray.value))  # what the driver reads: the error's last line
    assert out_of_space.reason(text) == os.strerror(errno.ENOSPC)
    assert out_of_space.what_of(text) == raised.value.what
    assert out_of_space.what_of("OSError: [Errno 28] No space left on device") is None
