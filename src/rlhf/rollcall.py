"""The roll call: the first thing the ranks of a launch do together, once the process group is up and before
any weights load.

Every rank sends a record of itself: its host and node, the GPUs it sees, the Python and package it runs,
the network interfaces it was told to use, and the preflight blockers it found on its own disk. Rank 0 logs
one line per node and the time of one all-reduce through each transport. Then every rank reaches the same
verdict from the same records:
- a blocker on any rank stops every rank at once, with that rank's blockers named (without the roll call,
  a rank that failed its preflight before the process group existed left the other nodes waiting for it
  until the rendezvous timed out, 30 minutes);
- nodes that run different Python, package versions or install paths stop every rank, naming both sides
  (one node on an older image fails later, deep in a collective, with a message about pickles or shapes);
- GPUs a node has and no rank uses are logged as a warning.
The transports are probed with a short timeout (RLHF_CONNECT_TIMEOUT_S, default 120 s): a link that does
not work (a wrong interface, a firewall) fails here, naming the ranks that did not answer, instead of in the
first collective of the run after `run.collective_timeout_s`.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rlhf import engine
from rlhf.errors import RlhfError
from rlhf.preflight import Blocker, PreflightError, package_versions

log = logging.getLogger("rlhf")

CONNECT_TIMEOUT_S = 120.0
# What must be the same on every rank, with how a difference is shown.
SAME_EVERYWHERE = {"python": "Python", "package": "rlhf installed at", "versions": "package versions"}


class LaunchError(RlhfError):
    """The ranks of one launch do not run the same software, or cannot reach each other."""


def node_of(env) -> str:
    """This rank's node as the launcher numbers it (DeepSpeed: CROSS_RANK; torchrun: GROUP_RANK; srun:
    SLURM_NODEID), else its host name: loopback "nodes" on one machine stay apart."""
    for key in ("CROSS_RANK", "GROUP_RANK", "SLURM_NODEID", "NODE_RANK"):
        if env.get(key, "").isdecimal():
            return f"node{env[key]}"
    return socket.gethostname()


def own_record(blockers: list[Blocker], env=os.environ) -> dict[str, Any]:
    """What this rank tells the others about itself."""
    import torch

    import rlhf

    host = socket.gethostname()
    try:
        address = socket.gethostbyname(host)
    except OSError:
        address = "unresolved"
    return {"rank": engine.rank(), "host": host, "address": address, "node": node_of(env),
            "gpus": torch.cuda.device_count() if engine.cuda_available() else 0,
            "python": sys.executable, "package": str(Path(rlhf.__file__).resolve().parent),
            "versions": package_versions(),
            "interfaces": {key: env[key] for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME") if env.get(key)},
            "blockers": list(blockers)}


def verdict(records: list[dict[str, Any]]) -> tuple[RlhfError | None, list[str]]:
    """(the error every rank raises, or None; warnings) from all ranks' records. The same on every rank."""
    blocked = [r for r in records if r["blockers"]]
    if blocked:
        first = blocked[0]
        where = ", ".join(f"{r['rank']} ({r['host']})" for r in blocked)
        blockers = [Blocker(b.code, f"rank {first['rank']} on {first['host']}: {b.message}")
                    for b in first["blockers"]]
        if len(blocked) > 1:
            blockers.append(Blocker("launch.preflight", f"ranks {where} found blockers too; each rank's log has "
                                    "its own; every rank stopped before loading weights"))
        return PreflightError(blockers), []
    for key, what in SAME_EVERYWHERE.items():
        first = records[0]
        other = next((r for r in records if r[key] != first[key]), None)
        if other is not None:
            return LaunchError(f"ranks run different software: {what} {_show(first[key], other[key])} on rank 0 "
                               f"({first['host']}) but {_show(other[key], first[key])} on rank {other['rank']} "
                               f"({other['host']}); install the same environment at the same path on every "
                               "node (stages/README.md, Multi-node)"), []
    warnings = []
    ranks_on = Counter(r["node"] for r in records)
    for node, ranks in sorted(ranks_on.items()):
        gpus = max(r["gpus"] for r in records if r["node"] == node)
        if gpus > ranks:
            warnings.append(f"{node} has {gpus} GPUs and runs {ranks} rank(s): {gpus - ranks} stay idle "
                            f"(NUM_GPUS={ranks}; unset, it is the node's GPU count)")
    return None, warnings


def _show(value: Any, other: Any) -> str:
    """`value`, or for two dicts only the entries where it differs from `other`."""
    if isinstance(value, dict) and isinstance(other, dict):
        return ", ".join(f"{k}={value.get(k)}" for k in sorted(set(value) | set(other)) if value.get(k) != other.get(k))
    return str(value)


def summary(records: list[dict[str, Any]], took_ms: dict[str, float]) -> list[str]:
    """The lines rank 0 logs: one per node, then the transports' times."""
    nodes: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        nodes.setdefault(r["node"], []).append(r)
    lines = [f"roll call: {len(records)} rank(s) on {len(nodes)} node(s), all answered"]
    for node, rs in nodes.items():
        first = rs[0]
        interfaces = ", ".join(f"{k}={v}" for k, v in first["interfaces"].items()) or \
            f"no interface set (the host name resolves to {first['address']})"
        lines.append(f"  {node}: host {first['host']}, ranks {','.join(str(r['rank']) for r in rs)}, "
                     f"{first['gpus']} GPU(s), {interfaces}")
    if took_ms:
        lines.append("  one all-reduce: " + ", ".join(f"{name} {ms:.1f} ms" for name, ms in took_ms.items()))
    return lines


def roll_call(blockers: list[Blocker]) -> None:
    """Under a launcher, after `engine.init_distributed`: exchange records, log the summary on rank 0 and
    raise the verdict's error on every rank. In a plain process, raise `blockers` if there are any."""
    if not engine.launched():
        if blockers:
            raise PreflightError(blockers)
        return
    timeout_s = float(os.environ.get("RLHF_CONNECT_TIMEOUT_S") or CONNECT_TIMEOUT_S)
    records, took = engine.probe_links(own_record(blockers), timeout_s)
    error, warnings = verdict(records)
    if engine.is_main():
        for line in summary(records, took):
            log.info("%s", line)
        for line in warnings:
            log.warning("%s", line)
    if error is not None:
        raise error
