"""Workspace RPM/TPM token buckets: pure maths, an in-process twin and a Redis backend."""
