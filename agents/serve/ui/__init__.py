"""The web page and `medplib ui`: the page's files and render route (`page.py`), the `/v1` API backed by
a model in this process (`service.py`), and the server that runs both without Ray (`server.py`)."""
