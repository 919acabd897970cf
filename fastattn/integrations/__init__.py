"""Integrations of the fastattn runtime with model libraries (diffusers)."""
