"""The HTTP API's middlewares and body reader: every error becomes OpenAI's error object.

`error_middleware` renders ApiError (and RequestError, aiohttp's HTTP errors and
anything unexpected) as OpenAI's error body, sets X-Request-Id and counts the
request; `auth_middleware` resolves the API key to a tenant for /v1/ paths and
/tokenize, /detokenize.
"""

from __future__ import annotations

import json
import logging

from aiohttp import web

from dyn.errors import RequestError
from dyn.frontend.auth import ApiKeys, Tenant
from dyn.frontend.metrics import FrontendMetrics
from dyn.frontend.protocol import ApiError

log = logging.getLogger("dyn.frontend.app")
"""Logs under the app's name, as before this module was split from it."""

MAX_BODY_BYTES = 32 * 1024 * 1024
REQUEST_ID_HEADER = "X-Request-Id"
TENANT_KEY = web.RequestKey("tenant", Tenant)
RID_KEY = web.RequestKey("request_id", str)
_JSON = "application/json"


async def json_body(request: web.Request):
    raw = await request.read()
    if not raw:
        raise ApiError("the request body is empty; send a JSON object")
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(f"the request body is not valid JSON: {exc}") from None
    except RecursionError:
        raise ApiError("the request body nests JSON too deeply") from None


def error_middleware(metrics: FrontendMetrics):
    @web.middleware
    async def middleware(request: web.Request, handler):
        endpoint = request.match_info.route.resource.canonical if request.match_info.route.resource else "other"
        try:
            response = await handler(request)
        except ApiError as exc:
            response = _error_response(exc)
        except RequestError as exc:  # e.g. the chat template refused the messages
            response = _error_response(ApiError(str(exc), param=exc.field))
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            code = {404: "not_found", 405: "method_not_allowed", 413: "request_too_large"}.get(exc.status)
            response = _error_response(ApiError(exc.reason if exc.status != 413 else
                                                f"the request body exceeds {MAX_BODY_BYTES} bytes",
                                                status=exc.status, code=code))
        except Exception:
            log.exception("internal error on %s", request.path)
            response = _error_response(ApiError("internal server error; see the frontend log", status=500,
                                                type="server_error", code="internal"))
        rid = request.get(RID_KEY)
        if rid is not None and not response.prepared:
            response.headers[REQUEST_ID_HEADER] = rid
        metrics.count_request(endpoint, response.status)
        return response

    return middleware


_TOKENIZER_PATHS = frozenset({"/tokenize", "/detokenize", "/tokenizer_info"})
"""Outside /v1/ (where vLLM serves them) but work on the tenants' behalf: keyed like /v1/."""


def auth_middleware(keys: ApiKeys):
    @web.middleware
    async def middleware(request: web.Request, handler):
        if request.path.startswith("/v1/") or request.path in _TOKENIZER_PATHS:
            tenant = keys.authenticate(request.headers.get("Authorization"))
            if tenant is None:
                raise ApiError("missing or invalid API key; send 'Authorization: Bearer <key>'", status=401,
                               code="invalid_api_key", type="authentication_error")
            request[TENANT_KEY] = tenant
        return await handler(request)

    return middleware


def _error_response(exc: ApiError) -> web.Response:
    headers = {}
    if exc.retry_after_s is not None:
        headers["Retry-After"] = str(max(1, round(exc.retry_after_s)))
    response = web.Response(body=json.dumps(exc.body()).encode(), status=exc.status, content_type=_JSON,
                            headers=headers)
    if exc.close_connection:
        response.force_close()
    return response
