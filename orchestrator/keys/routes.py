"""HTTP key management for admin keys: GET/POST /v1/admin/keys, DELETE /v1/admin/keys/{name}.

The first admin key can only come from the CLI (`ensemble keys add NAME --scope admin`): these routes refuse
everyone (403) until one exists. A created key is in the response body once, and nowhere else.
"""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field

from orchestrator.api import ErrorResponse, OpenAIError
from orchestrator.keys.guard import KeyGuard
from orchestrator.keys.records import KeySpecError


class KeyInfo(BaseModel):
    name: str
    scope: str
    rpm: int | None
    tpm: int | None
    max_streams: int | None
    created: float
    revoked: float | None


class KeyList(BaseModel):
    object: str = "list"
    data: list[KeyInfo]


class NewKeyRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)

    name: str
    scope: str = "user"
    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_streams: int | None = Field(None, ge=1)


class CreatedKey(KeyInfo):
    key: str = Field(description="the API key: shown here once, stored only as a salted digest")


_ERRORS = {s: {"model": ErrorResponse, "description": d} for s, d in
           ((401, "no key, or an unknown or revoked one"), (403, "not an admin key"))}


def admin_router(guard: KeyGuard) -> APIRouter:
    router = APIRouter(prefix="/v1/admin", tags=["admin"], dependencies=[Depends(guard.admin)], responses=_ERRORS)
    store, view = guard.store, guard.view

    @router.get("/keys", operation_id="listKeys", response_model=KeyList, summary="List API keys (no secrets)")
    async def list_keys() -> KeyList:
        keys = await asyncio.to_thread(store.list)
        return KeyList(data=[KeyInfo(**k.public()) for k in keys])

    @router.post("/keys", operation_id="createKey", status_code=201, response_model=CreatedKey,
                 summary="Create an API key", responses={400: {"model": ErrorResponse}})
    async def create_key(body: NewKeyRequest) -> CreatedKey:
        try:
            key, token = await asyncio.to_thread(store.add, body.name, body.scope, rpm=body.rpm, tpm=body.tpm,
                                                 max_streams=body.max_streams)
        except KeySpecError as exc:
            raise OpenAIError(str(exc), param="name", code="invalid_parameter") from None
        await asyncio.to_thread(view.refresh)     # this replica at once; the others within their refresh
        return CreatedKey(**key.public(), key=token)

    @router.delete("/keys/{name}", operation_id="revokeKey", response_model=KeyInfo, summary="Revoke an API key",
                   responses={404: {"model": ErrorResponse}})
    async def revoke_key(name: str) -> KeyInfo:
        try:
            key = await asyncio.to_thread(store.revoke, name)
        except KeySpecError as exc:
            raise OpenAIError(str(exc), status=404, type="not_found_error", code="key_not_found") from None
        await asyncio.to_thread(view.refresh)
        return KeyInfo(**key.public())

    return router
