"""Serving (Ray) and agent integrations (LangChain)."""
