"""The supervisor's admin API (``admin_host``, 127.0.0.1 by default): add or remove an elite while the engines run.

State-changing endpoints need the admin key (``Authorization: Bearer <key>``, compared in constant time), read
from the environment variable named by ``admin_key_env``; without a key configured they are refused.

    GET    /manifest         the current serving manifest
    POST   /elites           {"id": "g00012c01"}: materialise it as an adapter and load it
    DELETE /elites/{id}      unload it
"""

from __future__ import annotations

import os
import threading

import uvicorn
from fastapi import Depends, FastAPI, Header, HTTPException
from pydantic import BaseModel

from cycleqd.auth import bearer_token, key_matches
from evolve.rundir import RunError
from serve.materialise import MaterialiseError
from serve.preflight import ServeError
from serve.supervisor import Supervisor


class AddElite(BaseModel):
    id: str


def make_app(sup: Supervisor) -> FastAPI:
    app = FastAPI(title="cycleqd-serve admin")
    key = os.environ.get(sup.cfg.admin_key_env, "")

    def admin(authorization: str = Header("")) -> None:
        if not key:
            raise HTTPException(403, f"the admin API is disabled: set {sup.cfg.admin_key_env} before starting")
        if not key_matches(bearer_token(authorization), (key.encode(),)):
            raise HTTPException(401, "missing or wrong admin key (Authorization: Bearer <key>)")

    @app.get("/manifest")
    def manifest() -> dict:
        with sup.lock:
            return sup.manifest.model_dump(mode="json")

    @app.post("/elites", dependencies=[Depends(admin)])
    def add(body: AddElite) -> dict:
        try:
            return sup.add_elite(body.id).model_dump(mode="json")
        except (ServeError, RunError, MaterialiseError) as exc:
            raise HTTPException(409 if "already" in str(exc) else 400, str(exc)) from exc

    @app.delete("/elites/{elite_id}", dependencies=[Depends(admin)])
    def remove(elite_id: str) -> dict:
        try:
            sup.remove_elite(elite_id)
        except ServeError as exc:
            raise HTTPException(404 if "not served" in str(exc) else 400, str(exc)) from exc
        return {"removed": elite_id}

    return app


def serve_admin(sup: Supervisor) -> uvicorn.Server:
    """Run the admin API in a daemon thread; returns the server (``should_exit = True`` stops it)."""
    config = uvicorn.Config(make_app(sup), host=sup.cfg.admin_host, port=sup.cfg.admin_port, log_level="warning")
    server = uvicorn.Server(config)
    threading.Thread(target=server.run, name="admin-api", daemon=True).start()
    return server
