"""Joining a group whose launcher keeps its store across restarts (torchrun's elastic agent), every time.

torchrun (torch >= 2.5, c10d rendezvous) hands its workers the agent's own TCPStore
(``TORCHELASTIC_USE_AGENT_STORE=True``): one server for the whole job, kept across restarts of the group.
``init_process_group("env://")`` keys the ranks' gloo/NCCL addresses in it under the same names on every
start (``default_pg/0/...``), so after a restart a rank can read the dead attempt's addresses before the new
rank 0 has written its own, and connect to a port nobody listens on: "connectFullMesh failed ... Connection
refused", or a connect timeout gloo stretches far past the group's timeout (pytorch/pytorch#135712; the
restart count torch once scoped keys with is per agent, not global). docs/failures.md has the plain
reproduction.

Here every start of the group first agrees on a fresh key prefix: rank 0 publishes a new random id; every
other rank answers under that id with a nonce of its own and waits for rank 0 to echo it. A stale id (the
dead attempt's) gets no echo, so the rank reads the id again. The process group is then made on the
prefixed store: nothing of an earlier attempt can be read. It forms or fails within ``timeout_s``.
"""
from __future__ import annotations

import datetime
import os
import time
import uuid

import torch.distributed as dist

from trainrig.errors import RunFailed

GROUP_KEY = "trainrig/group"
RETRY_S = 2.0  # how long a rank waits for rank 0's echo before it reads the group id again


def agent_store_shared() -> bool:
    """Whether the launcher's store outlives the group (torchrun's default since torch 2.5)."""
    return os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True" and "MASTER_PORT" in os.environ


def fresh_store(rank: int, world: int, timeout_s: float) -> dist.Store:
    """A store (the launcher's, under a prefix new to this start of the group) that holds no key of an
    earlier start; ``RunFailed`` naming the rank and what it waited for after ``timeout_s``."""
    addr, port = os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"])
    deadline = time.monotonic() + timeout_s
    base = dist.TCPStore(addr, port, world, is_master=False, timeout=datetime.timedelta(seconds=timeout_s),
                         wait_for_workers=False)
    where = f"the launcher's store {addr}:{port}"
    if rank == 0:
        group = uuid.uuid4().hex
        base.set(GROUP_KEY, group)
        scoped = dist.PrefixStore(f"trainrig/{group}/", base)
        for peer in range(1, world):
            _wait(scoped, f"join/{peer}", deadline, f"rank 0: the group did not form within {timeout_s:.0f} s: "
                                                    f"rank {peer} never joined it through {where}")
            scoped.set(f"welcome/{peer}", scoped.get(f"join/{peer}"))
        return scoped
    nonce = uuid.uuid4().hex.encode()
    failure = f"rank {rank}: the group did not form within {timeout_s:.0f} s: rank 0 never answered through {where}"
    while True:
        _wait(base, GROUP_KEY, deadline, failure)
        scoped = dist.PrefixStore(f"trainrig/{base.get(GROUP_KEY).decode()}/", base)
        scoped.set(f"join/{rank}", nonce)
        until = min(deadline, time.monotonic() + RETRY_S)
        while time.monotonic() < until:
            if scoped.check([f"welcome/{rank}"]) and scoped.get(f"welcome/{rank}") == nonce:
                return scoped
            time.sleep(0.05)
        if time.monotonic() >= deadline:
            raise RunFailed(failure)


def _wait(store: dist.Store, key: str, deadline: float, failure: str) -> None:
    left = deadline - time.monotonic()
    try:
        if left <= 0:
            raise TimeoutError
        store.wait([key], datetime.timedelta(seconds=left))
    except (TimeoutError, dist.DistError) as exc:
        timed_out = isinstance(exc, TimeoutError) or "timeout" in str(exc).lower()
        raise RunFailed(failure if timed_out else f"{failure} ({str(exc).splitlines()[0]})") from None
