"""Run reports: the history of every run with its output."""
