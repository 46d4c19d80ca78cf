"""Demo pieces for trying the sidecar locally and for end-to-end tests (not used in production)."""
