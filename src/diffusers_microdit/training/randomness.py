"""The one seeding scheme of the training code: a torch generator keyed by a tuple of integers (run seed, then what
the draw is for: micro-step, shard, batch...), mixed by numpy's `SeedSequence`, so nearby keys give unrelated
streams and a draw never depends on global RNG state, on resuming or on how many processes share the work."""

from __future__ import annotations

import numpy as np
import torch


def seeded_generator(*keys: int) -> torch.Generator:
    """A CPU `torch.Generator` seeded from `keys` (non-negative integers) through `np.random.SeedSequence`."""
    state = np.random.SeedSequence(list(keys)).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))


class BatchRandomness:
    """Random draws for one micro-batch that depend only on (seed, micro-step) and the row in the global batch.

    Every process draws the values of the whole global batch from the same generator and keeps its own rows, so
    a 2-process run sees exactly the draws of a 1-process run with the same global batch, and a resumed run the
    draws of an uninterrupted one. Use `generator` with a `global_batch`-sized draw, then `local(...)`.
    """

    def __init__(self, seed: int, micro_step: int, process_index: int, num_processes: int, local_batch: int, device):
        self.generator = seeded_generator(seed, micro_step)
        self.global_batch = local_batch * num_processes
        self.rows = slice(process_index * local_batch, (process_index + 1) * local_batch)
        self.device = device

    def local(self, values: torch.Tensor) -> torch.Tensor:
        """This process's rows of a global-batch draw, on the training device."""
        return values[self.rows].to(self.device)
