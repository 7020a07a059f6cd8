"""One driver per sweep: a lock file, `<results>/<sweep>/driver.lock`, naming its holder.

Two drivers on one sweep would each write, and delete, the other's Parquet parts. The driver
takes the lock before anything else happens under the sweep (so it is also the check that
`--results` is writable, before Ray starts) and gives it back when it ends. The file holds
the holder's host, process id, start time and a heartbeat, renewed every
`HEARTBEAT_SECONDS` by a background thread. A lock is stale, and taken over, when its process
is gone (same host) or its heartbeat is older than `STALE_SECONDS` (another host: a lost head
node; or a process id reused). A SIGKILLed driver therefore leaves a lock that the next
`--resume` on the same machine takes at once, and one on another machine after
`STALE_SECONDS`.

On a local filesystem the lock is created with a hard link, which fails if the file exists,
so two drivers started at the same instant cannot both get it. Object stores (s3://) have no
such operation: there the lock is written, read back after a pause and kept only if it is
still this driver's, which catches all but near-simultaneous starts.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

import pyarrow.fs as pafs

from ufw.config import ConfigError
from ufw.results import filesystem, join, write_atomically

LOCK_FILE = "driver.lock"
HEARTBEAT_SECONDS = 10.0
STALE_SECONDS = 60.0
_OBJECT_STORE_SETTLE_SECONDS = 1.0


class SweepLock:
    """The lock of the sweep at `sweep_uri` (a directory or a pyarrow URI)."""

    def __init__(self, sweep_uri: str, flag: str = "--results"):
        self.sweep_uri = sweep_uri
        self.flag = flag  # what to name when the place cannot be written
        self.fs, self.dir = filesystem(sweep_uri)
        self.path = join(self.dir, LOCK_FILE)
        self.local = isinstance(self.fs, pafs.LocalFileSystem)
        self.token = uuid.uuid4().hex
        self.started = time.time()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.lost = False  # set when the heartbeat finds the file no longer ours

    # ---------------------------------------------------------------- the file
    def _record(self) -> dict[str, Any]:
        return {"host": socket.gethostname(), "pid": os.getpid(), "token": self.token,
                "started": self.started, "heartbeat": time.time()}

    def read(self) -> dict[str, Any] | None:
        """The lock's record; None if there is none; {} if it cannot be parsed."""
        try:
            with self.fs.open_input_stream(self.path) as f:
                text = f.readall().decode()
        except FileNotFoundError:
            return None
        except OSError as e:
            if self.fs.get_file_info(self.path).type == pafs.FileType.NotFound:
                return None
            raise ConfigError(f"{self.flag}: cannot read {self.path} "
                              f"({os_error_text(e)})") from None
        try:
            record = json.loads(text)
            return record if isinstance(record, dict) else {}
        except ValueError:
            return {}

    def _write_new(self) -> bool:
        """Create the lock file with this driver's record; False if it already exists."""
        data = json.dumps(self._record()).encode()
        if not self.local:
            with self.fs.open_output_stream(self.path) as f:
                f.write(data)
            time.sleep(_OBJECT_STORE_SETTLE_SECONDS)
            return (self.read() or {}).get("token") == self.token
        tmp = f"{self.path}.{self.token}.tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.link(tmp, self.path)  # atomic, and fails if the lock exists
            return True
        except FileExistsError:
            return False
        finally:  # also when the disk is full: no stray temporary file
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    def _set_aside(self) -> None:
        """Move a stale lock out of the way (a rename: of two drivers, one wins)."""
        stale = f"{self.path}.stale-{self.token}"
        with contextlib.suppress(FileNotFoundError):
            self.fs.move(self.path, stale)
            self.fs.delete_file(stale)

    # ---------------------------------------------------------------- taking and giving back
    def acquire(self) -> None:
        """Take the lock, or raise ConfigError naming who holds it (or why none can be made)."""
        try:
            self.fs.create_dir(self.dir, recursive=True)
            for _ in range(3):
                if self._write_new():
                    break
                record = self.read()
                if record is None:
                    continue  # given back meanwhile: try again
                if not is_stale(record):
                    raise ConfigError(f"sweep {self.sweep_uri} is being run by "
                                      f"{describe(record)}; wait for it to end (a second "
                                      "driver or --resume would overwrite its results)")
                self._set_aside()
            else:
                raise ConfigError(f"sweep {self.sweep_uri}: could not take its lock "
                                  f"{self.path}; another driver keeps taking it")
        except OSError as e:
            raise ConfigError(f"{self.flag}: cannot write {self.dir} "
                              f"({os_error_text(e)})") from None
        self._thread = threading.Thread(target=self._heartbeat, daemon=True,
                                        name="ufw-sweep-lock")
        self._thread.start()

    def held(self) -> bool:
        """Whether the lock file is still this driver's (checked before deleting anything)."""
        try:
            return not self.lost and (self.read() or {}).get("token") == self.token
        except ConfigError:
            return False

    def _heartbeat(self) -> None:
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                if not self.held():
                    self.lost = True
                    return
                # readers see the old record or the new one, whatever the disk does
                write_atomically(self.fs, self.path, json.dumps(self._record()).encode())
            except OSError:
                pass  # a full disk or a flaky mount: the next beat tries again

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
            if self.held():
                with contextlib.suppress(OSError):
                    self.fs.delete_file(self.path)


def is_stale(record: dict[str, Any], now: float | None = None) -> bool:
    """A lock whose driver is gone: dead process on this host, or no heartbeat for a while."""
    now = time.time() if now is None else now
    heartbeat = record.get("heartbeat")
    if not isinstance(heartbeat, (int, float)):
        return True  # unreadable: a driver killed while writing it
    if (record.get("host") == socket.gethostname() and isinstance(record.get("pid"), int)
            and not _process_alive(record["pid"])):
        return True
    return now - heartbeat > STALE_SECONDS  # also a reused process id


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def describe(record: dict[str, Any]) -> str:
    age = time.time() - float(record.get("heartbeat", 0))
    return (f"process {record.get('pid')} on {record.get('host')} (heartbeat {age:.0f} s ago; "
            f"lock {LOCK_FILE})")


def os_error_text(error: OSError) -> str:
    """An OSError as a few words, e.g. "No space left on device" (pyarrow's own text
    repeats the path the caller names already)."""
    if error.errno:
        return os.strerror(error.errno)
    return error.strerror or str(error).splitlines()[0]
