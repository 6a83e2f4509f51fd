from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from integration.peers import Peer


@pytest.fixture
def make_peer(tmp_path: Path) -> Iterator[type[Peer]]:
    """Build peers (not started) on private directories; all are stopped at teardown."""
    peers: list[Peer] = []

    def build(
        peer_id: str = "peer-a", extra_args: list[str] | None = None, root: Path | None = None
    ) -> Peer:
        peer = Peer(root or tmp_path / peer_id, peer_id=peer_id, extra_args=list(extra_args or []))
        peers.append(peer)
        return peer

    yield build  # type: ignore[misc]
    for peer in peers:
        peer.kill()


@pytest.fixture
def peer(make_peer) -> Peer:  # type: ignore[no-untyped-def]
    """A standalone peer with one local node (roles web, db), not started yet."""
    p: Peer = make_peer()
    p.write_node("local", {"roles": ["web", "db"], "connection_type": "local"})
    return p


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Every test under integration/ starts real processes: mark it so."""
    here = Path(__file__).parent
    for item in items:
        if here in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.integration)
