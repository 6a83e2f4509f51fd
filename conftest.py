"""Fixtures shared by tests/ and integration/: one real ZooKeeper ensemble per test session."""

pytest_plugins = ["integration.zk_fixtures"]
