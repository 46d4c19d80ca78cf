"""Envoy ext_authz sidecar for OpenAI-compatible APIs."""

__version__ = "0.1.0"
