"""Fixtures shared by tests/ and integration/: one real ZooKeeper ensemble and one set of real
sshd hosts per test session (each started only when a test asks for it)."""

pytest_plugins = ["integration.zk_fixtures", "integration.ssh_fixtures"]
