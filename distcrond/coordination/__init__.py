"""Coordination state shared by the peers: leadership, membership, run records, triggers."""
