"""Process topology: the one place that reads rank and world size (from a launcher's environment)."""
from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class DistEnv:
    """Rank and world size of this process, read once; a plain single process is rank 0 of 1."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @classmethod
    def from_environ(cls) -> "DistEnv":
        env = os.environ
        if "RANK" in env and "WORLD_SIZE" in env:
            return cls(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)))
        return cls()


def resolve_device(name: str, env: DistEnv | None = None) -> torch.device:
    """``auto`` -> the process's CUDA device if there is one, else CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            local = env.local_rank if env else 0
            return torch.device("cuda", local % torch.cuda.device_count())
        return torch.device("cpu")
    return torch.device(name)
