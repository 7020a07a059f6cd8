"""Classes that subclass Ray's, made on first use.

The searcher and the callback subclass Ray Tune's Searcher and Callback. Importing Ray takes
seconds, and a bad search space or flag must fail before that; so each such class is written
as a plain implementation class (`_CohortSearcher`) and the module's `__getattr__` (PEP 562)
puts Ray's base under it when the public name (`CohortSearcher`) is first used, including
when a pickle that refers to it is loaded.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from typing import Any


def ray_subclasses(namespace: dict[str, Any],
                   classes: dict[str, tuple[type, str, str]]) -> Callable[[str], type]:
    """A module `__getattr__` making each public name = (implementation, Ray module, base).

    `namespace` is the module's globals(): a class is made once and kept there, under its
    public name, so that it pickles by reference as `<module>.<name>`.
    """

    def __getattr__(name: str) -> type:
        if name not in classes:
            raise AttributeError(f"module {namespace['__name__']!r} has no attribute {name!r}")
        impl, module, base = classes[name]
        base_class = getattr(importlib.import_module(module), base)
        cls = type(name, (impl, base_class), {"__module__": namespace["__name__"],
                                              "__qualname__": name, "__doc__": impl.__doc__})
        namespace[name] = cls
        return cls

    return __getattr__
