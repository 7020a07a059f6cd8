"""A results directory that runs out of space (a full disk, a quota, a file-size limit).

Such a write is not a trial's fault and cannot succeed on a retry, so it must not be
recorded as a failed trial (its configuration would then never run again): the sweep stops
at once, with one line saying what could not be written where, and `--resume`, once space
is freed, continues it. Nothing already written is lost: Parquet parts and the lock are
written under a temporary name and renamed, so a write cut short leaves no part that looks
valid, and Ray resumes a trial whose checkpoint could not be saved from its last one.

The error reaches the driver in three shapes: an OSError from its own writes; an OSError of
a worker (a checkpoint), which Ray hands over as text in the trial's error; and an exception
raised in a Tune callback, which Tune re-raises as a TuneError holding the traceback as
text. `reason` recognises all three.
"""

from __future__ import annotations

import errno
import os
import re

# ENOSPC: no space left; EDQUOT: the user's quota; EFBIG: the filesystem's file-size limit.
OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_MESSAGES = tuple(os.strerror(n) for n in OUT_OF_SPACE_ERRNOS)


class OutOfSpace(Exception):
    """Raised to stop a sweep: `what` could not be written, for `why` (e.g. "No space left
    on device")."""

    def __init__(self, what: str, why: str):
        super().__init__(f"cannot write {what} ({why})")
        self.what, self.why = what, why

    def __reduce__(self):  # rebuilt from what and why where Ray hands it over (the study actor)
        return OutOfSpace, (self.what, self.why)


def reason(error: BaseException | str | None) -> str | None:
    """Why `error` (an exception with its causes, or an error's text) is a write that ran
    out of space, e.g. "No space left on device"; None if it is something else."""
    if isinstance(error, str) or error is None:
        text = (error or "").lower()
        return next((m for m in _MESSAGES if m.lower() in text), None)
    for exception in _chain(error):
        if isinstance(exception, OutOfSpace):
            return exception.why
        if isinstance(exception, OSError) and exception.errno in OUT_OF_SPACE_ERRNOS:
            return os.strerror(exception.errno)
        found = reason(str(exception))
        if found:
            return found
    return None


def what_of(text: str | None) -> str | None:
    """What an OutOfSpace raised elsewhere (e.g. in the study actor) and handed over as text
    says could not be written; None if the text holds none."""
    why = "|".join(map(re.escape, _MESSAGES))
    found = re.search(rf"cannot write (.+) \((?:{why})\)", text or "")
    return found.group(1) if found else None


def find(error: BaseException) -> OutOfSpace | None:
    """The OutOfSpace among `error` and the exceptions it was raised from, if one is."""
    return next((e for e in _chain(error) if isinstance(e, OutOfSpace)), None)


def _chain(error: BaseException) -> list[BaseException]:
    """`error` and what it was raised from or while handling, in that order."""
    chain: list[BaseException] = []
    current: BaseException | None = error
    while current is not None and all(current is not e for e in chain):
        chain.append(current)
        current = current.__cause__ or current.__context__
    return chain
