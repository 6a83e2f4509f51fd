"""distcrond: a distributed cron. Periodic commands on any matching host, each slot once."""

__version__ = "0.1.0"
