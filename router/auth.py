"""Who may call what: the router's one authentication, a dependency of every route (``router.app``).

``/health`` is public (probes carry no keys, and it says only healthy or not); ``/metrics`` is public only with
``metrics_public``; ``/admin/*`` needs the admin key; everything else (the API, ``/docs``, ``/openapi.json``, the
operator page) needs an API key when keys are set. A browser opening ``/ui`` cannot send a header, so that page
may carry its key as ``?key=``. The keys are compared in constant time (``cycleqd.auth``).

The API keys are read off the request path: ``ApiKeys`` re-reads them once a second (the app's poll loop) and when
the policy is replaced, so a request compares bytes and reads no file and no environment variable.
"""

from __future__ import annotations

import contextlib
import hashlib
import os

from fastapi import Request

from cycleqd.auth import bearer_token, key_matches
from router.errors import APIError
from router.policy import RoutingPolicy


class ApiKeys:
    """The policy's API keys, and the name each key's requests are rate-limited under (a hash, not the key)."""

    def __init__(self) -> None:
        self.policy: RoutingPolicy | None = None
        self.keys: tuple[bytes, ...] = ()
        self.names: dict[bytes, str] = {}
        self._stamp: tuple[str, int | None] | None = None

    def of(self, policy: RoutingPolicy) -> tuple[bytes, ...]:
        """The keys of ``policy`` (read now if it is not the policy last read)."""
        if policy is not self.policy:
            self.refresh(policy)
        return self.keys

    def refresh(self, policy: RoutingPolicy) -> None:
        """Re-read the keys if the policy, its variable or its file's mtime changed."""
        mtime = None
        if policy.api_keys_file is not None:
            with contextlib.suppress(OSError):
                mtime = os.stat(policy.api_keys_file).st_mtime_ns
        stamp = (os.environ.get(policy.api_keys_env, ""), mtime)
        if policy is self.policy and stamp == self._stamp:
            return
        keys = tuple(k.encode() for k in policy.api_keys())
        self.names = {k: hashlib.sha256(k).hexdigest()[:16] for k in keys}
        self.keys, self.policy, self._stamp = keys, policy, stamp


async def authenticate(request: Request) -> None:
    """The dependency: returns, or raises APIError 401/403. An authenticated request's ``request.state.client_key``
    is what the rate limit counts it under (without keys: the client's address, ``client_key``). (``async``: a
    plain ``def`` dependency would send every request through FastAPI's thread pool.)"""
    state = request.app.state
    policy: RoutingPolicy = state.router.policy
    path = request.scope["path"]
    if path.startswith("/admin/"):
        key = os.environ.get(policy.admin_key_env, "")
        if not key:
            raise APIError(403, f"admin endpoints are disabled: set {policy.admin_key_env}", "admin_disabled")
        if not key_matches(bearer_token(request.headers.get("authorization", "")), (key.encode(),)):
            raise APIError(401, "missing or wrong admin key", "invalid_api_key")
        return
    keys = state.api_keys.of(policy)
    if not keys or path == "/health" or (path == "/metrics" and policy.metrics_public):
        return
    given = bearer_token(request.headers.get("authorization", ""))
    if not given and path == "/ui":  # a browser opening the operator page passes its key in the URL
        given = request.query_params.get("key", "").encode()
    if not key_matches(given, keys):  # every key compared, in constant time each
        raise APIError(401, "missing or invalid API key (Authorization: Bearer <key>)", "invalid_api_key")
    request.state.client_key = state.api_keys.names[given]


def client_key(request: Request) -> str:
    """What the rate limit counts a request under: its key's name, or without keys the client's address."""
    name = getattr(request.state, "client_key", None)
    if name is None:
        name = request.client.host if request.client else "unknown"
    return name
