"""The template of the route Starlette's (or FastAPI's) router matched for a request, mount
prefixes included: what the server span is named after and what ``http.route`` says.

The router leaves the matched route in ``scope["route"]``. Its template lacks two things: the
prefixes of the mounts the request went through (their values are in ``scope["root_path"]``,
``/t/acme`` for ``Mount("/t/{tenant}")``: never put those in a span name) and, from FastAPI
0.120's router on, the prefix of ``include_router(prefix=...)`` (FastAPI keeps the effective
template in ``scope["fastapi"]``). Mount prefixes are found by following the request down the
router's tree from ``scope["router"]`` again, as the router did; a chain of mounts without
parameters is remembered, so only requests under a mount with parameters pay that walk each
time.
"""

from __future__ import annotations

import threading
from typing import Any

from ._inbound import Scope

_MAX_DEPTH = 16
"""Mounts nested deeper than this are not followed (the span keeps OTel's name)."""
_CACHE_SIZE = 1024
_MOUNT_TAIL = "/{path}"
_cache: dict[tuple[int, str], tuple[object, str]] = {}
_cache_lock = threading.Lock()


def route_template(scope: Scope) -> str | None:
    """The template of the route the router matched (``"/items/{item_id}"``, mount prefixes
    included: ``"/t/{tenant}/items/{item_id}"`` under ``Mount("/t/{tenant}", ...)``), None
    when it matched none, "" when it matched one whose template this cannot work out (the
    span then keeps OTel's name rather than get one per request)."""
    matched = scope.get("route")
    template = getattr(matched, "path_format", None)
    if not isinstance(template, str) or not template:
        return None
    if "fastapi" in scope:
        template = _included_template(scope, matched, template)
    root = scope.get("root_path") or ""
    # No mount took part of the path (a Starlette mount records the root it started from as
    # "app_root_path"): the root path is the server's (uvicorn --root-path).
    if "app_root_path" not in scope or (scope["app_root_path"] == root and not _is_mount(matched)):
        return f"{root}{template}"
    key = (id(matched), root)
    cached = _cache.get(key)
    if cached is not None and cached[0] is matched:
        return cached[1]
    try:
        found = _mounted_template(scope, matched, template, root)
    except Exception:  # a route whose matching fails on a copied scope: keep OTel's name
        return ""
    if found is None:
        return ""
    full, varies = found
    if not varies:  # the same for every request that reaches this route this way
        with _cache_lock:
            if len(_cache) >= _CACHE_SIZE:
                _cache.clear()
            _cache[key] = (matched, full)
    return full


def _included_template(scope: Scope, matched: object, template: str) -> str:
    """FastAPI's effective template of ``matched`` (with the ``include_router`` prefixes) when
    FastAPI recorded one for this very route, else ``template``."""
    fastapi = scope.get("fastapi")
    effective = fastapi.get("effective_route_context") if isinstance(fastapi, dict) else None
    if effective is not None and getattr(effective, "original_route", None) is matched:
        included = getattr(effective, "path_format", None)
        if isinstance(included, str) and included:
            return included
    return template


def _is_mount(route: object) -> bool:
    template = getattr(route, "path_format", None)
    # (endswith first: hasattr on a Route, which has no "routes", raises and catches inside)
    return isinstance(template, str) and template.endswith(_MOUNT_TAIL) and hasattr(route, "routes")


def _mounted_template(
    scope: Scope, matched: object, template: str, root: str
) -> tuple[str, bool] | None:
    """``(template with the mounts' prefixes, True when a mount on the way has parameters)``,
    following the request from the outermost router (``scope["router"]``) through the mounts
    the router took (the first full match at each level, on a copy of the scope) until they
    have taken the whole root path; None when that way does not end where the router did."""
    routes = getattr(scope.get("router"), "routes", None)
    probe: dict[str, Any] = {
        "type": scope.get("type"),
        "path": scope.get("path", ""),
        "root_path": scope.get("app_root_path") or "",
        "method": scope.get("method"),
        "headers": scope.get("headers") or [],
        "path_params": {},
    }
    prefix = str(probe["root_path"])
    varies = False
    for _ in range(_MAX_DEPTH):
        taken = _first_full_match(routes, probe)
        if taken is None or not _is_mount(taken[0]):
            return None
        mount, child = taken
        params = getattr(mount, "param_convertors", None) or {}
        varies = varies or any(name != "path" for name in params)
        if mount is matched:  # the router stopped at this mount (static files, a 404 inside)
            return f"{prefix}{template}", varies
        prefix += str(mount.path_format)[: -len(_MOUNT_TAIL)]
        probe.update(child)
        if probe.get("root_path") == root:  # the mounts took the whole root path
            return f"{prefix}{template}", varies
        routes = getattr(mount, "routes", None)
    return None


def _first_full_match(routes: object, probe: dict[str, Any]) -> tuple[Any, Any] | None:
    """The route Starlette's router takes first for ``probe`` among ``routes`` (a full
    match), with its child scope."""
    if not isinstance(routes, list):
        return None
    for route in routes:
        match, child = route.matches(probe)
        if getattr(match, "name", "") == "FULL":
            return route, child
    return None
