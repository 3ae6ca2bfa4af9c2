"""Serving tests: one Ray cluster per run of this package (`ray_cluster` is package-scoped, and
pytest gives a directory package scope only when it is a package)."""
