"""The template of the route Starlette's (or FastAPI's) router matched for a request, mount
prefixes included: what the server span is named after and what ``http.route`` says."""

from __future__ import annotations

from typing import Any

from ._inbound import Scope

_MAX_DEPTH = 16
"""Mounts nested deeper than this are not followed (the span keeps OTel's name)."""


def route_template(scope: Scope) -> str | None:
    """The template of the route the router matched (``"/items/{item_id}"``, mount prefixes
    included, ``"/t/{tenant}/items/{item_id}"`` under ``Mount("/t/{tenant}", ...)``), None
    when it matched none, "" when it matched one whose template this cannot work out (the
    span then keeps OTel's name rather than get one per request)."""
    matched = scope.get("route")
    template = getattr(matched, "path_format", None)
    if not isinstance(template, str) or not template:
        return None
    root = scope.get("root_path")
    if not root:
        return template
    if hasattr(matched, "routes"):  # a Mount: its template starts with its own prefix, which
        prefix = getattr(matched, "path", None)  # the mount added to the root path already
        if isinstance(prefix, str) and root.endswith(prefix):
            return f"{root[: len(root) - len(prefix)]}{template}"
    else:  # a route inside mounts: their prefixes are in the root path as the request had them
        own = getattr(matched, "param_convertors", None)
        if isinstance(own, dict) and all(name in own for name in scope.get("path_params") or ()):
            return f"{root}{template}"
    # Under a mount with parameters in its prefix ("/t/{tenant}") the root path holds the
    # request's values: follow the request down the router's tree for the mounts' templates.
    try:
        return _template_from_router(scope, matched) or ""
    except Exception:  # a route whose matching raises on a copied scope: keep OTel's name
        return ""


def _template_from_router(scope: Scope, target: object) -> str | None:
    """The template of ``target`` as the router reached it for this request: the prefixes of
    the mounts the request went through, then ``target``'s own template. Follows the request
    from the outermost router (``scope["router"]``), taking at each level the route the
    router takes (the first full match, else the first partial one) on a copy of the scope;
    None when that path does not lead to ``target``."""
    routes = getattr(scope.get("router"), "routes", None)
    probe: dict[str, Any] = {
        "type": scope.get("type"),
        "path": scope.get("path", ""),
        "root_path": scope.get("app_root_path", ""),
        "method": scope.get("method"),
        "headers": scope.get("headers") or [],
        "path_params": {},
    }
    prefix = str(probe["root_path"] or "")
    for _ in range(_MAX_DEPTH):
        if not isinstance(routes, list):
            return None
        taken = _route_taken(routes, probe)
        if taken is None:
            return None
        route, child = taken
        if route is target:
            template = getattr(route, "path_format", None)
            return f"{prefix}{template}" if isinstance(template, str) else None
        own = getattr(route, "path", "")  # a Mount's prefix template; a Host has none
        prefix += own if isinstance(own, str) else ""
        probe.update(child)
        routes = getattr(route, "routes", None)
    return None


def _route_taken(routes: list[Any], probe: dict[str, Any]) -> tuple[Any, dict[str, Any]] | None:
    """The route Starlette's router takes for ``probe`` among ``routes``, and its child scope."""
    partial: tuple[Any, dict[str, Any]] | None = None
    for route in routes:
        match, child = route.matches(probe)
        kind = getattr(match, "name", "")
        if kind == "FULL":
            return route, child
        if kind == "PARTIAL" and partial is None:
            partial = (route, child)
    return partial
