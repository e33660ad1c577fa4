"""Reproducible random numbers, whatever the backend, worker count or chunk size.

Before a loop runs, the master draws one 64-bit base seed from Python's
global :mod:`random` state and, if NumPy is imported, another from NumPy's
global state (``seed=`` replaces both draws). Each iteration then seeds the
worker's global generators from a hash of the base seed and the iteration's
index. An iteration's draws thus depend only on the seed set before the loop
and on its own index, never on which process ran it or what ran before it.

Drawing the base seeds advances the master's generators by one draw each, as
a sequential loop that used them would; the sequential backend restores the
master's generator states after the loop so that iterations running in the
master process do not disturb them.
"""

from __future__ import annotations

import hashlib
import random
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_current_seed: int | None = None


@dataclass(frozen=True)
class SeedPlan:
    """The base seeds of one loop.

    Attributes:
        python: base seed for :mod:`random`.
        numpy: base seed for NumPy's legacy global generator, or None when
            NumPy was not imported in the master.
    """

    python: int
    numpy: int | None

    @classmethod
    def draw(cls, seed: int | None = None) -> SeedPlan:
        """Draws the base seeds from the master's generators (or ``seed``)."""
        np = sys.modules.get("numpy")
        if seed is not None:
            return cls(_mix(seed, "python"), _mix(seed, "numpy") if np else None)
        python = random.getrandbits(64)
        numpy_seed = None
        if np is not None:
            words = np.random.randint(0, 2**32, size=2, dtype=np.uint64)
            numpy_seed = (int(words[0]) << 32) | int(words[1])
        return cls(python, numpy_seed)

    def seed_iteration(
        self, index: int, hook: Callable[[int], None] | None = None
    ) -> None:
        """Seeds this process's global generators for iteration ``index``.

        Args:
            index: the iteration's position in the loop.
            hook: the loop's ``seed_worker`` option; when given it is called
                with the iteration's seed instead of the default seeding.
        """
        global _current_seed
        seed = _mix(self.python, index)
        _current_seed = seed
        if hook is not None:
            hook(seed)
            return
        random.seed(seed)
        if self.numpy is not None:
            try:
                import numpy as np
            except ImportError:  # a body cannot draw from NumPy without it
                return
            value = _mix(self.numpy, index)
            np.random.seed([value & 0xFFFFFFFF, value >> 32])


def _mix(base: int, salt: int | str) -> int:
    digest = hashlib.blake2b(f"{base}:{salt}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "big")


def clear_iteration_seed() -> None:
    """Marks that no iteration runs any more, so iteration_seed() raises again."""
    global _current_seed
    _current_seed = None


def iteration_seed() -> int:
    """The seed of the iteration that is running, for generators of your own.

    Use it to build an independent generator that is as reproducible as the
    global ones, for example ``numpy.random.default_rng(iteration_seed())``.

    Raises:
        RuntimeError: called outside a loop body.
    """
    if _current_seed is None:
        raise RuntimeError("iteration_seed() is only available inside a loop body")
    return _current_seed


@contextmanager
def preserved_state() -> Iterator[None]:
    """Restores the global generators' states (and iteration seed) on exit."""
    global _current_seed
    saved_seed = _current_seed
    state: Any = random.getstate()
    np = sys.modules.get("numpy")
    np_state = np.random.get_state() if np is not None else None
    try:
        yield
    finally:
        random.setstate(state)
        if np is not None and np_state is not None:
            np.random.set_state(np_state)
        _current_seed = saved_seed
