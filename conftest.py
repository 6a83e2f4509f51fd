"""Fixtures shared by tests/ and integration/: one real ZooKeeper ensemble, one set of real
sshd hosts and one real Elasticsearch per test session (each started only when a test asks)."""

pytest_plugins = ["integration.zk_fixtures", "integration.ssh_fixtures", "integration.es_fixtures"]
