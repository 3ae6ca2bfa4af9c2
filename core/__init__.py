"""Schemas, errors, I/O, the composed model and the plugin manager: what every other folder builds on."""
