"""Scheduling: when slots fall (schedules), where they run (placement), and the leader's loop."""
