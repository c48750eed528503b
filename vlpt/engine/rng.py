"""Named random streams. Every seeded draw of a run that must not depend on process state (MLM masks, augmentation,
ITM negatives, image masks, codeword restarts, each rank's stream) comes from `generator(name, seed, *index)`: its
seed hashes the stream's name, the run's `train.seed` and the draw's index (a step, a sample's position, a rank), so
two streams never share draws and a draw is the same whatever the number of ranks, workers or restarts."""
from __future__ import annotations

import hashlib

import torch


def seed_of(name: str, seed: int, *index: int) -> int:
    """A 63-bit seed for stream `name` at `index` of a run seeded `seed`."""
    key = ":".join(map(str, (name, seed, *index))).encode()
    return int.from_bytes(hashlib.blake2b(key, digest_size=8).digest(), "little") >> 1


def generator(name: str, seed: int, *index: int, device=None) -> torch.Generator:
    """A torch.Generator (on `device`, CPU by default) seeded for stream `name` at `index`."""
    return torch.Generator(device if device is not None else "cpu").manual_seed(seed_of(name, seed, *index))
