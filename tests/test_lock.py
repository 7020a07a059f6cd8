"""The sweep lock alone (no Ray): one holder, named when refused; stale locks taken over;
a driver that lost its lock knows it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import time

import pytest

from ufw.config import ConfigError
from ufw.sweep import lock as sweep_lock
from ufw.sweep.lock import LOCK_FILE, SweepLock, is_stale


def test_a_second_holder_is_refused_naming_the_first(tmp_path):
    first = SweepLock(str(tmp_path / "s"))
    first.acquire()
    try:
        record = json.loads((tmp_path / "s" / LOCK_FILE).read_text())
        assert record["host"] == socket.gethostname() and record["token"] == first.token
        with pytest.raises(ConfigError, match=rf"being run by process {record['pid']} on "):
            SweepLock(str(tmp_path / "s")).acquire()
        assert first.held()
    finally:
        first.release()
    assert not (tmp_path / "s" / LOCK_FILE).exists()
    again = SweepLock(str(tmp_path / "s"))
    again.acquire()  # given back: free again
    again.release()


def test_stale_locks_are_taken_over(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True).stdout.strip()
    now = time.time()
    here = socket.gethostname()
    assert is_stale({"host": here, "pid": int(dead), "heartbeat": now})  # process gone
    assert not is_stale({"host": "elsewhere", "pid": 1, "heartbeat": now - 5})
    assert is_stale({"host": "elsewhere", "pid": 1, "heartbeat": now - 3600})  # no heartbeat
    assert is_stale({"host": here, "pid": 1, "heartbeat": "?"})  # unreadable
    for record in ({"host": here, "pid": int(dead), "heartbeat": now}, "half a reco"):
        path = tmp_path / "s" / LOCK_FILE
        path.parent.mkdir(exist_ok=True)
        path.write_text(json.dumps(record) if isinstance(record, dict) else record)
        taker = SweepLock(str(tmp_path / "s"))
        taker.acquire()
        assert taker.held()
        taker.release()


def test_a_driver_whose_lock_was_taken_knows_it(tmp_path, monkeypatch):
    monkeypatch.setattr(sweep_lock, "HEARTBEAT_SECONDS", 0.05)
    holder = SweepLock(str(tmp_path / "s"))
    holder.acquire()
    (tmp_path / "s" / LOCK_FILE).write_text(json.dumps({"token": "someone else"}))
    time.sleep(0.3)
    assert holder.lost and not holder.held()
    holder.release()
    assert (tmp_path / "s" / LOCK_FILE).exists()  # not its own: left alone
