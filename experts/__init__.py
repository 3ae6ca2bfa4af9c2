"""The built-in experts, each an ordinary plugin."""
