"""HTTP authentication and roles: API keys from ``NEPHROTRACK_API_KEYS``, one policy for every service.

``NEPHROTRACK_API_KEYS`` is ``role:key,role:key,…`` (contract, "Auth"); one key may appear with
several roles. Roles:

- ``staff``    study staff: the write commands (POST/PUT/PATCH/DELETE under ``/v1`` and ``/fhir``)
  and the clinical services' reads;
- ``analyst``  read-only queries and exports (every GET of outcomes; the clinical services' reads)
  and outcomes' analysis locks (``POST /v1/locks``);
- ``operator`` ``/readyz``, ``/metrics``, ``/asyncapi.json``, ``/v1/admin/*`` and ``/v1/audit``;
- ``lab``      (beyond the contract's three) a lab system's key: may only submit results to labs
  (``POST /fhir…`` and ``POST /v1/results``), which staff may do too.

``/healthz`` is open; ``/docs`` and ``/openapi.json`` take any valid key; anything not in the
policy (:func:`required_roles`) is refused, whoever asks. A request without a key, or with a key
that is not configured, gets 401 with ``WWW-Authenticate: Bearer``; a valid key without the
route's role gets 403 naming the role. Without ``NEPHROTRACK_API_KEYS`` a service fails closed:
every route but ``/healthz`` answers 401.

The acting principal of an authorised request is ``<role>:<fingerprint>`` (the role the request
used, and the first 8 hex digits of the key's SHA-256): never the key itself. It is put on
``request.state.principal`` (read by :func:`shared.service.command_context`) and into
:data:`shared.events.request_principal`, so every event recorded while serving the request
carries it as its ``actor``.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass
from typing import Any

import structlog

from shared import metrics
from shared.events import request_principal

log = structlog.get_logger(__name__)

ENV_VAR = "NEPHROTRACK_API_KEYS"
CONTRACT_ROLES: tuple[str, ...] = ("staff", "analyst", "operator")
ROLES: tuple[str, ...] = (*CONTRACT_ROLES, "lab")
MIN_KEY_LENGTH = 16

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class AuthConfigError(ValueError):
    """``NEPHROTRACK_API_KEYS`` cannot be parsed; the message names the entry, never a key."""


def fingerprint(key: str) -> str:
    """First 8 hex digits of the key's SHA-256: enough to tell keys apart in an audit trail,
    useless for recovering the key."""
    return hashlib.sha256(key.encode()).hexdigest()[:8]


def parse_api_keys(spec: str) -> dict[str, frozenset[str]]:
    """``role:key,role:key`` → key → roles. Empty entries (a trailing comma) are ignored."""
    roles_by_key: dict[str, set[str]] = {}
    for index, raw in enumerate(spec.split(","), start=1):
        entry = raw.strip()
        if not entry:
            continue
        role, colon, key = entry.partition(":")
        role, key = role.strip().lower(), key.strip()
        where = f"{ENV_VAR} entry {index}"
        if not colon:
            raise AuthConfigError(f"{where} is not role:key (no ':' found); expected e.g. staff:<key>,analyst:<key>")
        if role not in ROLES:
            shown = role if role.isidentifier() and len(role) <= 20 else "…"
            raise AuthConfigError(f"{where}: unknown role {shown!r}; roles are {', '.join(ROLES)}")
        if not key:
            raise AuthConfigError(f"{where} ({role}): the key is empty")
        if any(ch.isspace() for ch in key):
            raise AuthConfigError(f"{where} ({role}): the key contains whitespace")
        roles_by_key.setdefault(key, set()).add(role)
    return {key: frozenset(roles) for key, roles in roles_by_key.items()}


def format_api_keys(keys: Mapping[str, str]) -> str:
    """role -> key as ``NEPHROTRACK_API_KEYS``."""
    return ",".join(f"{role}:{key}" for role, key in keys.items())


def first_key_with_role(spec: str | None, role: str) -> str | None:
    """The first key of ``spec`` that holds ``role`` (for tools that must act as that role)."""
    if not spec:
        return None
    try:
        keys = parse_api_keys(spec)
    except AuthConfigError:
        return None
    return next((key for key, roles in keys.items() if role in roles), None)


@dataclass(frozen=True)
class ApiKey:
    digest: bytes
    fingerprint: str
    roles: frozenset[str]

    def principal(self, role: str) -> str:
        return f"{role}:{self.fingerprint}"


class KeyRing:
    """The configured keys, kept only as SHA-256 digests; lookup compares against every one."""

    def __init__(self, keys: Mapping[str, frozenset[str]]) -> None:
        self._keys = [
            ApiKey(hashlib.sha256(key.encode()).digest(), fingerprint(key), frozenset(roles)) for key, roles in keys.items()
        ]
        self.short_keys = [k.fingerprint for k, raw in zip(self._keys, keys, strict=True) if len(raw) < MIN_KEY_LENGTH]

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> KeyRing:
        spec = (os.environ if environ is None else environ).get(ENV_VAR)
        return cls(parse_api_keys(spec) if spec else {})

    @property
    def configured(self) -> bool:
        return bool(self._keys)

    def roles(self) -> dict[str, list[str]]:
        """fingerprint -> roles (safe to log)."""
        return {key.fingerprint: sorted(key.roles) for key in self._keys}

    def identify(self, token: str) -> ApiKey | None:
        """The key ``token`` is, or None. Constant time in the token: its digest is compared
        with every configured digest (``hmac.compare_digest``), with no early exit."""
        presented = hashlib.sha256(token.encode()).digest()
        found: ApiKey | None = None
        for key in self._keys:
            if hmac.compare_digest(presented, key.digest) and found is None:
                found = key
        return found


# --- the policy -------------------------------------------------------------------------------------

OPEN: frozenset[str] | None = None
"""No key needed (``/healthz`` and routes a service declares public)."""
ANY_ROLE = frozenset(ROLES)
DENIED: frozenset[str] = frozenset()
"""Not in the policy: refused for every key."""

READ_METHODS = frozenset({"GET", "HEAD"})
WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
OPERATIONS = frozenset({"/readyz", "/metrics", "/asyncapi.json"})
DOCUMENTATION = frozenset({"/docs", "/docs/oauth2-redirect", "/redoc", "/openapi.json"})
CLINICAL_READERS = frozenset({"staff", "analyst"})
LAB_SUBMISSIONS = ("/fhir", "/v1/results")


def _under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def required_roles(service: str, method: str, path: str) -> frozenset[str] | None:
    """The roles that may call ``method path`` on ``service`` (any one of them), :data:`OPEN`, or
    :data:`DENIED`. The route→role table of the README's "Security" section, as code."""
    method = method.upper()
    if path == "/healthz":
        return OPEN
    if path in OPERATIONS:
        return frozenset({"operator"}) if method in READ_METHODS else DENIED
    if path in DOCUMENTATION:
        return ANY_ROLE if method in READ_METHODS else DENIED
    if _under(path, "/v1/admin") or _under(path, "/v1/audit"):
        return frozenset({"operator"}) if method in READ_METHODS | WRITE_METHODS else DENIED
    if _under(path, "/v1") or _under(path, "/fhir"):
        if method in WRITE_METHODS:
            if service == "outcomes" and method == "POST" and path == "/v1/locks":
                return frozenset({"analyst"})  # freezing an analysis is the analyst's act
            if service == "labs" and method == "POST" and any(_under(path, p) for p in LAB_SUBMISSIONS):
                return frozenset({"staff", "lab"})
            return frozenset({"staff"})
        if method in READ_METHODS:
            return frozenset({"analyst"}) if service == "outcomes" else CLINICAL_READERS
    return DENIED


# --- the middleware ---------------------------------------------------------------------------------

MALFORMED = "missing or malformed bearer token"
UNCONFIGURED = f"no API keys are configured ({ENV_VAR} is unset): every request but /healthz is refused"


class Refusal(Exception):
    def __init__(self, status: int, detail: str, *, challenge: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail, self.challenge = status, detail, challenge


@dataclass
class Authorizer:
    """Decides one request: the principal it acts as (None for an open route) or a Refusal."""

    service: str
    keys: KeyRing
    public: list[tuple[frozenset[str] | None, Any]]  # (methods or None for all, compiled path regex)

    def is_public(self, method: str, path: str) -> bool:
        return any((methods is None or method in methods) and regex.match(path) for methods, regex in self.public)

    def authorize(self, method: str, path: str, authorization: str | None) -> str | None:
        needed = OPEN if self.is_public(method, path) else required_roles(self.service, method, path)
        if needed is OPEN:
            return None
        if not self.keys.configured:
            raise Refusal(401, UNCONFIGURED, challenge='Bearer realm="nephrotrack"')
        token = _bearer_token(authorization)
        if token is None:
            raise Refusal(401, MALFORMED, challenge='Bearer realm="nephrotrack"')
        key = self.keys.identify(token)
        if key is None:
            raise Refusal(401, MALFORMED, challenge='Bearer realm="nephrotrack", error="invalid_token"')
        if not needed:
            raise Refusal(403, f"no role may {method} {path} (not in the access policy)")
        usable = [role for role in ROLES if role in needed and role in key.roles]
        if not usable:
            wanted = " or ".join(role for role in ROLES if role in needed)
            raise Refusal(403, f"role {wanted} required for {method} {path}; this key has: {', '.join(sorted(key.roles))}")
        return key.principal(usable[0])


def _bearer_token(header: str | None) -> str | None:
    if not header:
        return None
    scheme, _, token = header.strip().partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token or any(ch.isspace() for ch in token):
        return None
    return token


def _path_for_logs(path: str) -> str:
    """A refused request's path as the logs may keep it: its first two segments
    (``/v1/patients/…``). Refusal comes before any validation, so the rest can be anything the
    caller typed — a name or an MRN in place of a pseudonym — and no personal identifier may
    reach a log (docs/robustness.md)."""
    parts = path.split("/")
    return "/".join(parts[:3]) + ("/…" if len(parts) > 3 else "")


class AuthMiddleware:
    """Pure ASGI middleware: every HTTP request is decided before routing (so unknown paths are
    refused, not probed), websockets are refused, lifespan passes through."""

    def __init__(self, app: ASGIApp, authorizer: Authorizer) -> None:
        self.app = app
        self.authorizer = authorizer

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": 1008})
            return
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        method, path = scope["method"], scope["path"]
        try:
            principal = self.authorizer.authorize(method, path, _header(scope, b"authorization"))
        except Refusal as refusal:
            logged = _path_for_logs(path)
            log.info("request refused", status=refusal.status, method=method, path=logged,
                     reason=refusal.detail.replace(path, logged), client=(scope.get("client") or ("?",))[0])
            await _refuse(send, refusal)
            metrics.HTTP_REQUESTS.labels(route="(refused)", method=_method_label(method),
                                         status=f"{refusal.status // 100}xx").observe(time.perf_counter() - started)
            return
        if principal is None:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        token = request_principal.set(principal)
        try:
            await self.app(scope, receive, send)
        finally:
            request_principal.reset(token)


def _header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers") or ():
        if key.lower() == name:
            return value.decode("latin-1")
    return None


def _method_label(method: str) -> str:
    return method if method in READ_METHODS | WRITE_METHODS | {"OPTIONS"} else "other"


async def _refuse(send: Send, refusal: Refusal) -> None:
    body = json.dumps({"detail": refusal.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    if refusal.challenge:
        headers.append((b"www-authenticate", refusal.challenge.encode()))
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def leaf_routes(routes: Iterable[Any]) -> Iterable[Any]:
    """The routes themselves: FastAPI ≥ 0.16x keeps an included router as one entry holding the
    ``original_router`` (its paths unprefixed — Service.app includes routers without a prefix)."""
    for route in routes:
        inner = getattr(route, "original_router", None)
        if inner is not None:
            yield from leaf_routes(inner.routes)
        else:
            yield route


def route_patterns(routes: Iterable[Any]) -> list[tuple[frozenset[str] | None, Any]]:
    """(methods, path regex) of Starlette routes, for :attr:`Authorizer.public`."""
    found = []
    for route in routes:
        regex = getattr(route, "path_regex", None)
        if regex is not None:
            methods = getattr(route, "methods", None)
            found.append((frozenset(methods) if methods else None, regex))
    return found


PUBLIC_ATTRIBUTE = "nephrotrack_public"


def public(router: Any) -> Any:
    """Mark a router's routes (or one endpoint function) as open: no key needed. For pages that
    hold no data and read everything through the authenticated API, e.g.
    ``service.app(api, public(dashboard_routes(service)), …)``. The mark is on the endpoint
    functions, so it holds wherever the router is included. Use sparingly: the README's
    "Security" section lists every open route."""
    for route in getattr(router, "routes", None) or [router]:
        endpoint = getattr(route, "endpoint", route)
        setattr(endpoint, PUBLIC_ATTRIBUTE, True)
    return router


def is_public_endpoint(endpoint: Any) -> bool:
    return bool(getattr(endpoint, PUBLIC_ATTRIBUTE, False))
