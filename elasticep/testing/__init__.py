"""Fault injection and pytest fixtures for testing code built on elasticep."""
