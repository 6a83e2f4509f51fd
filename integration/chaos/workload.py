"""The workload: about thirty one-second jobs that prove where and when they ran.

Every job appends ``$DISTCRON_RUN_ID $DISTCRON_PEER <epoch s.ns>`` to one ledger
file (``integration.cluster.ledger_job``) and has ``misfire: run_all``: a mix of
``fuzzy`` jobs (spread over the second), burst jobs (all at the same instant),
``at_least_once`` jobs, jobs on the two SSH nodes (role ``remote``) and one
``hosts: all`` job (one run per node, run ids ``<job>@<slot>~<node>``). Every
"host" is this machine, so the ledger's absolute path works over SSH too.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from deploy.services.sshd import SSHHost
from distcrond.config.models import JobSpec
from integration.cluster import Cluster, ledger_job

LOCAL_NODE = "local"
LOCAL_ROLE = "worker"  # the role Cluster gives its "local" node
REMOTE_ROLE = "remote"
FUZZY = {"every": "1s", "fuzzy": True}
BURST = {"every": "1s"}


@dataclass
class Workload:
    """The jobs (id -> file contents) and what the checker needs to know about them."""

    ledger: Path
    jobs: dict[str, dict[str, Any]] = field(default_factory=dict)
    nodes: dict[str, list[str]] = field(default_factory=dict)  # node id -> roles

    def add(self, job_id: str, schedule: dict[str, Any], **fields: Any) -> None:
        spec = ledger_job(self.ledger, misfire={"policy": "run_all"}, **fields)
        spec["schedule"] = dict(schedule)
        self.jobs[job_id] = spec

    def specs(self) -> dict[str, JobSpec]:
        """The jobs as distcrond parses them."""
        return {jid: JobSpec.model_validate({**s, "id": jid}) for jid, s in self.jobs.items()}

    def at_least_once(self) -> list[str]:
        return sorted(j for j, s in self.jobs.items() if s.get("delivery") == "at_least_once")

    def nodes_per_slot(self) -> dict[str, list[str]]:
        """``hosts: all`` job id -> the nodes each of its slots runs on."""
        found: dict[str, list[str]] = {}
        for job_id, spec in self.jobs.items():
            policy = spec.get("policy", {})
            if policy.get("hosts") == "all":
                roles = set(policy.get("roles", []))
                found[job_id] = sorted(
                    n for n, r in self.nodes.items() if not roles or roles & set(r)
                )
        return found


def make_workload(ledger: Path, ssh_hosts: list[SSHHost]) -> Workload:
    """30 jobs: 12 fuzzy and 10 burst local ones (3 of them at least once), 4 on the SSH
    nodes (one at least once), one ``hosts: all`` on every node, 3 more fuzzy local ones."""
    w = Workload(ledger, nodes={LOCAL_NODE: [LOCAL_ROLE]})
    for n in range(len(ssh_hosts)):
        w.nodes[f"ssh-{chr(ord('a') + n)}"] = [REMOTE_ROLE]
    local = {"policy": {"hosts": "any", "roles": [LOCAL_ROLE]}}
    remote = {"policy": {"hosts": "any", "roles": [REMOTE_ROLE]}}
    for n in range(1, 13):
        extra = {"delivery": "at_least_once"} if n <= 2 else {}
        w.add(f"fuzzy-{n:02}", FUZZY, **local, **extra)
    for n in range(1, 11):
        extra = {"delivery": "at_least_once"} if n == 1 else {}
        w.add(f"burst-{n:02}", BURST, **local, **extra)
    for n in range(1, 5):
        extra = {"delivery": "at_least_once"} if n == 1 else {}
        w.add(f"ssh-{n:02}", FUZZY if n % 2 else BURST, **remote, **extra)
    w.add("all-01", FUZZY, policy={"hosts": "all"})
    for n in range(13, 16):
        w.add(f"fuzzy-{n:02}", FUZZY, **local)
    return w


def install(workload: Workload, cluster: Cluster, ssh_hosts: list[SSHHost]) -> None:
    """Write the SSH node files and the job files to every peer."""
    for n, host in enumerate(ssh_hosts):
        cluster.write_node(f"ssh-{chr(ord('a') + n)}", host.node_file([REMOTE_ROLE]))
    for job_id, spec in workload.jobs.items():
        cluster.write_job(job_id, spec)
