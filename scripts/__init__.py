"""Command-line entry points; `benchmark` is imported by its tests as a module."""
