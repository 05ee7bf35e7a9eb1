"""The roll call's verdict (rlhf.rollcall), from hand-made records: what every rank decides alike."""

from __future__ import annotations

import pytest

from rlhf import rollcall
from rlhf.preflight import Blocker, PreflightError

VERSIONS = {"python": "3.11.9", "rlhf": "0.1.0", "torch": "2.13.0"}


def rec(rank: int, node: str = "node0", *, gpus: int = 0, blockers=(), **over) -> dict:
    return {"rank": rank, "host": f"h{node[-1]}", "address": "10.0.0.1", "node": node, "gpus": gpus,
            "python": "/opt/venv/bin/python", "package": "/opt/venv/lib/rlhf", "versions": dict(VERSIONS),
            "interfaces": {}, "blockers": list(blockers), **over}


def test_agreeing_ranks_pass_and_the_summary_has_a_line_per_node():
    records = [rec(0), rec(1), rec(2, "node1", interfaces={"GLOO_SOCKET_IFNAME": "ib0"}), rec(3, "node1")]
    assert rollcall.verdict(records) == (None, [])
    lines = rollcall.summary(records, {"gloo": 1.25})
    assert lines[0] == "roll call: 4 rank(s) on 2 node(s), all answered"
    assert lines[1] == "  node0: host h0, ranks 0,1, 0 GPU(s), no interface set (the host name resolves to 10.0.0.1)"
    assert lines[2] == "  node1: host h1, ranks 2,3, 0 GPU(s), GLOO_SOCKET_IFNAME=ib0"
    assert lines[3] == "  one all-reduce: gloo 1.2 ms"


def test_a_blocker_on_one_rank_stops_every_rank_with_its_message():
    blocked = rec(3, "node1", blockers=[Blocker("data.missing", "data/x.jsonl: no such file")])
    error, _ = rollcall.verdict([rec(0), rec(1), rec(2, "node1"), blocked])
    assert isinstance(error, PreflightError)
    assert str(error) == "blocked: [data.missing] rank 3 on h1: data/x.jsonl: no such file"
    twice = rollcall.verdict([rec(0, blockers=[Blocker("a.b", "one")]), rec(1, blockers=[Blocker("a.b", "two")])])[0]
    assert "rank 0 on h0: one" in str(twice) and "ranks 0 (h0), 1 (h0) found blockers" in str(twice)


@pytest.mark.parametrize(("key", "value", "shown"), [
    ("versions", {**VERSIONS, "torch": "2.12.0"}, "package versions torch=2.13.0 on rank 0 (h0) but torch=2.12.0"),
    ("python", "/usr/bin/python3", "Python /opt/venv/bin/python on rank 0 (h0) but /usr/bin/python3"),
    ("package", "/home/me/rlhf/src/rlhf", "rlhf installed at /opt/venv/lib/rlhf on rank 0 (h0) but /home/me"),
])
def test_ranks_running_different_software_stop(key, value, shown):
    error, _ = rollcall.verdict([rec(0), rec(1), rec(2, "node1", **{key: value})])
    assert isinstance(error, rollcall.LaunchError)
    assert shown in str(error) and "on rank 2 (h1)" in str(error)


def test_idle_gpus_are_a_warning():
    error, warnings = rollcall.verdict([rec(0, gpus=8), rec(1, gpus=8), rec(2, "node1", gpus=2), rec(3, "node1", gpus=2)])
    assert error is None
    assert warnings == ["node0 has 8 GPUs and runs 2 rank(s): 6 stay idle (NUM_GPUS=2; unset, it is the node's GPU "
                        "count)"]


def test_node_of_prefers_the_launchers_node_number():
    assert rollcall.node_of({"CROSS_RANK": "3", "SLURM_NODEID": "1"}) == "node3"
    assert rollcall.node_of({"GROUP_RANK": "2"}) == "node2"
    assert rollcall.node_of({}) == __import__("socket").gethostname()
