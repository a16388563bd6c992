"""The studio's datasets pages and API (being written)."""

from fastapi import FastAPI


def register(app: FastAPI) -> None:
    pass
