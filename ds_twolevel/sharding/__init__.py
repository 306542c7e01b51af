"""Partition math: which slice of every dense tensor each rank holds."""
