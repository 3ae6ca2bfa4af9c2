"""The learned per-token router and the MoE layer that composes expert adapters."""
