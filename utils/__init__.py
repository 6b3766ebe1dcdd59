"""Shared utilities for the scripts: run folders, data loading, model loading, seeding, logging."""
