"""Reliability tests (faults, bad input, access control, poisoning, soak); helpers in harness.py."""
