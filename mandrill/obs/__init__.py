"""Observability: counters, logging, metrics export, debugging aids."""
