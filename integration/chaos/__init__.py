"""The chaos suite: a workload, a nemesis, a checker (``python -m integration.chaos``).

It starts its own ZooKeeper ensemble, Elasticsearch node, two sshd hosts and three
distcrond peers, runs about thirty one-second jobs that append to a ledger, injects
faults one after the other (``nemesis.py``), heals everything, lets the cluster
settle, and checks the invariants and recovery bounds (``checker.py``) from what
the commands wrote and what the stores recorded. See README.md beside this file.
"""
