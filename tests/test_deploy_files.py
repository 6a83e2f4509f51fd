"""The deploy/ examples stay valid for the distcrond they ship with."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from distcrond.cli import build_parser, settings_from_args

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines())
    return {k: v for k, v in (p for p in pairs if len(p) == 2) if not k.startswith("#")}


def exec_start_flags(unit: Path) -> list[str]:
    text = unit.read_text().replace("\\\n", " ")
    (line,) = re.findall(r"^ExecStart=(.*)$", text, re.M)
    return shlex.split(line)[1:]


@pytest.mark.parametrize("n", [1, 2, 3])
def test_the_three_instance_example_makes_three_peers_of_one_cluster(
    n: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in env_file(DEPLOY / f"systemd/cluster/peer-{n}.env").items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv(
        "DISTCRON_PEER_ID", f"peer-{n}"
    )  # the unit's Environment=DISTCRON_PEER_ID=%i
    flags = [
        f.replace("%i", f"peer-{n}")
        for f in exec_start_flags(DEPLOY / "systemd/distcrond@.service")
    ]
    settings = settings_from_args(build_parser().parse_args(flags))
    assert settings.zookeeper == "127.0.0.1:2181,127.0.0.1:2182,127.0.0.1:2183"
    assert (settings.peer_id, settings.bind) == (f"peer-{n}", f"127.0.0.1:808{n}")
    assert settings.state_dir == Path(f"/var/lib/distcron/peer-{n}")
    assert settings.zk_session_timeout == 4.0


def test_the_single_peer_unit_runs_with_the_original_directories() -> None:
    flags = exec_start_flags(DEPLOY / "systemd/distcrond.service")
    settings = settings_from_args(build_parser().parse_args(flags))
    assert (settings.jobs_dir, settings.nodes_dir) == (
        Path("/etc/distcron/jobs.d"),
        Path("/etc/distcron/nodes.d"),
    )


def test_a_zookeeper_server_starts_once_its_port_is_released_by_the_one_just_stopped(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The chaos suite's rolling restart found a stopped server's client port unbindable
    for a moment after the server was gone: starting it again failed at once."""
    import socket
    import subprocess
    import threading

    from deploy.services import zookeeper

    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    port = holder.getsockname()[1]
    ensemble = zookeeper.Ensemble(tmp_path, servers=1, base_port=port)
    ensemble.server_dir(1).mkdir(parents=True)
    spawned: list[list[str]] = []

    class FakePopen:
        pid = 4_000_000  # no such process

        def __init__(self, cmd: list[str], **_: object) -> None:
            spawned.append(cmd)

    monkeypatch.setattr(subprocess, "Popen", FakePopen)
    monkeypatch.setattr(ensemble, "_java", "/usr/bin/java")
    timer = threading.Timer(0.3, holder.close)
    timer.start()
    try:
        ensemble.start_server(1)
    finally:
        timer.cancel()
        holder.close()
    assert len(spawned) == 1 and spawned[0][0] == "/usr/bin/java"
