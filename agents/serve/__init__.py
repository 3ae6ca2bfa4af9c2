"""Serving on Ray Serve: the application and its deployments, the HTTP ingress and API, its config and client.

`agents/` itself holds the LangChain tools; everything that runs behind `medplib serve` lives here.
"""
