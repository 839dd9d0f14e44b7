"""Counters that tests bump and the session summary prints."""

hostile_cases = 0
