"""Datasets and data modules."""
