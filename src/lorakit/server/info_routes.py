"""A1111's informational endpoints: ``/sdapi/v1/png-info`` and ``/sdapi/v1/embeddings`` (being written)."""
from __future__ import annotations

from typing import Any

from fastapi import FastAPI


def add_info_routes(app: FastAPI, state: Any) -> None:
    """Register the routes on ``app`` (``state``: the server's ``ServerState``)."""
