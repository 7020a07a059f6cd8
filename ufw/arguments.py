"""The command lines' argument parser: a usage mistake is one line on stderr and exit 2.

Kept apart from ufw.cli (which loads torch for the data flags) so that `ufw.analysis` can use
it without that import.
"""

from __future__ import annotations

import argparse

USER_ERROR = 2


class ArgumentParser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # argparse prints its usage too; one line is enough
        self.exit(USER_ERROR, f"{self.prog}: error: {message}\n")
