"""Shipped YAML configs (models, jobs, serve), readable through importlib.resources."""
