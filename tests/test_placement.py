from __future__ import annotations

from collections import Counter
from typing import Any

from distcrond.config.models import JobSpec, NodeSpec
from distcrond.scheduling.placement import place


def job(**policy: Any) -> JobSpec:
    return JobSpec.model_validate(
        {"id": "j", "schedule": {"every": "1m"}, "command": ["/bin/true"], "policy": policy}
    )


def nodes(*specs: tuple[str, list[str]], **extra: Any) -> dict[str, NodeSpec]:
    return {
        n: NodeSpec.model_validate({"id": n, "roles": roles, "connection_type": "local", **extra})
        for n, roles in specs
    }


NODES = nodes(("a", ["web"]), ("b", ["web", "db"]), ("c", ["db"]))


def test_any_picks_one_node_with_a_matching_role() -> None:
    p = place(job(hosts="any", roles=["db"]), "j@1", NODES, ["p1"], {}, {}, ["local"])
    assert len(p.assignments) == 1 and p.assignments[0].node_id in {"b", "c"}


def test_any_prefers_the_least_busy_node() -> None:
    p = place(job(hosts="any"), "j@1", NODES, ["p1"], {"a": 2, "b": 1}, {}, ["local"])
    assert p.assignments[0].node_id == "c"


def test_any_spreads_ties_over_slots_stably() -> None:
    picks = [
        place(job(), f"j@{i}", NODES, ["p1"], {}, {}, ["local"]).assignments[0].node_id
        for i in range(300)
    ]
    again = [
        place(job(), f"j@{i}", NODES, ["p1"], {}, {}, ["local"]).assignments[0].node_id
        for i in range(300)
    ]
    assert picks == again
    assert all(count > 60 for count in Counter(picks).values()), Counter(picks)


def test_all_runs_on_every_matching_node() -> None:
    p = place(job(hosts="all", roles=["web"]), "j@1", NODES, ["p1"], {}, {}, ["local"])
    assert [a.node_id for a in p.assignments] == ["a", "b"]


def test_count_takes_that_many_least_busy_nodes() -> None:
    p = place(job(hosts=2), "j@1", NODES, ["p1"], {"b": 5}, {}, ["local"])
    assert sorted(a.node_id for a in p.assignments) == ["a", "c"]


def test_count_larger_than_eligible_nodes_fails_with_reason() -> None:
    p = place(job(hosts=4), "j@1", NODES, ["p1"], {}, {}, ["local"])
    assert not p.assignments and "needs 4 nodes" in p.reason


def test_no_node_with_the_roles_fails_with_reason() -> None:
    p = place(job(roles=["gpu"]), "j@1", NODES, ["p1"], {}, {}, ["local"])
    assert not p.assignments and "gpu" in p.reason


def test_node_without_a_runner_is_not_eligible() -> None:
    ssh = {
        "r": NodeSpec.model_validate(
            {
                "id": "r",
                "connection_type": "ssh",
                "connection_options": {
                    "ssh_user": "u",
                    "ssh_host": "h:22",
                    "ssh_private_key_file": "/k",
                },
            }
        )
    }
    p = place(job(), "j@1", ssh, ["p1"], {}, {}, ["local"])
    assert not p.assignments and "no runner for connection_type ssh" in p.reason


def test_unhealthy_node_is_skipped() -> None:
    p = place(job(roles=["web"]), "j@1", NODES, ["p1"], {}, {}, ["local"], unhealthy_nodes={"a"})
    assert [a.node_id for a in p.assignments] == ["b"]


def test_local_node_pinned_to_a_dead_peer_is_not_eligible() -> None:
    pinned = nodes(("a", []), peer="p2")
    assert not place(job(), "j@1", pinned, ["p1"], {}, {}, ["local"]).assignments
    p = place(job(), "j@1", pinned, ["p1", "p2"], {}, {}, ["local"])
    assert p.assignments[0].peer_id == "p2"


def test_unpinned_node_goes_to_the_least_busy_peer() -> None:
    p = place(job(), "j@1", NODES, ["p1", "p2"], {}, {"p1": 3}, ["local"])
    assert p.assignments[0].peer_id == "p2"


def test_no_live_peer_fails_with_reason() -> None:
    p = place(job(), "j@1", NODES, [], {}, {}, ["local"])
    assert not p.assignments and "no live peer" in p.reason


def test_hosts_all_still_runs_on_an_unhealthy_node_so_that_its_failure_is_reported() -> None:
    p = place(job(hosts="all", roles=["web"]), "j@1", NODES, ["p1"], {}, {}, ["local"], {"a"})
    assert [a.node_id for a in p.assignments] == ["a", "b"]
    counted = place(job(hosts=2), "j@1", NODES, ["p1"], {}, {}, ["local"], {"a"})
    assert {a.node_id for a in counted.assignments} == {"b", "c"}
