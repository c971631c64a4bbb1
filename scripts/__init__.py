"""Command-line entry points; the benchmark's pieces live in bench/."""
