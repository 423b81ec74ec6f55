"""Serving a model: terminal chat and an OpenAI-compatible server."""
