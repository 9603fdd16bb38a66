"""A stand-in for a Ray Serve deployment handle, for unit tests of experts/client.py: `handle.m.remote(...)`
runs the subclass's `async def _m(...)` as a task (an awaitable response, like a DeploymentResponse)."""

from __future__ import annotations

import asyncio


class RemoteMethod:
    def __init__(self, fn) -> None:
        self.fn = fn

    def remote(self, *args, **kwargs):
        return asyncio.ensure_future(self.fn(*args, **kwargs))


class FakeHandle:
    """Subclass and define `async def _<method>(self, ...)` for each handle method the client calls."""

    def __getattr__(self, name: str) -> RemoteMethod:
        if name.startswith("_"):
            raise AttributeError(name)
        return RemoteMethod(getattr(self, f"_{name}"))

    async def _endpoint(self, replica=None):
        return None                     # no data plane: every call goes through the (fake) handle
