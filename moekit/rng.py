"""Seeds derived from a run's one seed (shared by the data and engine layers)."""

from __future__ import annotations

import numpy as np


def derived_seed(*parts: int) -> int:
    """A 63-bit seed that is a fixed function of ``parts`` (seed, epoch, process, worker...),
    from NumPy's ``SeedSequence`` so that nearby inputs give unrelated seeds."""
    state = np.random.SeedSequence([int(p) for p in parts]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1
