"""Porter's HTTP service (`porter serve`, FastAPI on uvicorn).

    GET  /healthz                          Redis and the profiles' S3 buckets reachable
    GET  /metrics                          Prometheus exposition
    GET  /v1/jobs?state=&model=&limit=     recent jobs
    GET  /v1/jobs/{id}                     one job with its steps and progress
    POST /v1/jobs                          a job spec → its id (same spec → same id)   [token]
    POST /v1/jobs/{id}/cancel                                                         [token]
    POST /v1/jobs/{id}/retry                                                          [token]
    POST /v1/hooks/training-complete       signed (X-Porter-Signature, `tasks.triggers.signing`)
    POST /v1/hooks/huggingface             Hub webhook (X-Webhook-Secret)

Job-changing calls need `Authorization: Bearer <PORTER_API_TOKEN>` (disabled when no token is
set), and all calls that queue or change jobs (hooks too) stay closed (403) until both location
allow-lists are set or `PORTER_ALLOW_ANY_LOCATION=1` (`tasks.jobs.locations`); a location outside
them is 403 naming the rule. Request bodies are read up to `max_request_bytes` (413 beyond).
Secrets, tokens and signatures are never logged or echoed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Annotated, Any

import redis
from fastapi import Depends, FastAPI, HTTPException, Query, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import APIKeyHeader, HTTPAuthorizationCredentials, HTTPBearer
from redis.backoff import NoBackoff
from redis.retry import Retry

from config.settings import Settings
from converters.errors import ConversionError
from tasks.jobs import locations, service
from tasks.jobs.iterations import parse_job
from tasks.jobs.records import JobRecords
from tasks.ops.metrics_collector import render as render_metrics
from tasks.storage.base import ArtifactError
from tasks.storage.store import open_store
from tasks.triggers import hooks, openapi
from tasks.triggers.profiles import PLACEHOLDER_CHECKPOINT, Profile, load_profiles
from tasks.triggers.signing import HEADER, BadSignature, same_secret, sign, verify

ASGIApp = Callable[..., Awaitable[None]]
HEALTH_TIMEOUT = 2.0  # seconds /healthz waits for Redis's PING (no retries: 503 at once)
_BEARER = Depends(HTTPBearer(auto_error=False, description="Bearer $PORTER_API_TOKEN"))
_SIGNATURE = Depends(APIKeyHeader(
    name=HEADER, scheme_name="PorterSignature", auto_error=False,
    description="t=<unix seconds>,v1=<hex HMAC-SHA256(PORTER_HOOK_SECRET, '<t>.' + body)>",
))  # fmt: skip
_HUB_SECRET = Depends(APIKeyHeader(
    name="X-Webhook-Secret", scheme_name="HubWebhookSecret", auto_error=False,
    description="PORTER_HF_WEBHOOK_SECRET, as the Hugging Face Hub sends it",
))  # fmt: skip


class BodyLimit:
    """ASGI middleware: a request body larger than `limit` bytes gets 413 before it is read
    into memory (Content-Length checked first, then the bytes actually received)."""

    def __init__(self, app: ASGIApp, limit: int) -> None:
        self.app, self.limit = app, limit

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        length = dict(scope.get("headers") or []).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            return await self._too_large(send)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > self.limit:
                return await self._too_large(send)
            chunks.append(chunk)
            more = message.get("more_body", False)
        body, delivered = b"".join(chunks), False

        async def replay() -> dict:
            nonlocal delivered
            if delivered:
                return await receive()
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}

        return await self.app(scope, replay, send)

    async def _too_large(self, send: Any) -> None:
        response = JSONResponse(
            {"detail": f"request body larger than {self.limit} bytes"}, status_code=413
        )
        await response({"type": "http"}, None, send)


def create_app(
    records: JobRecords | None = None,
    settings: Settings | None = None,
    profiles: dict[str, Profile] | None = None,
) -> FastAPI:
    """The service over `records` (default: the configured Redis), `settings` and `profiles`
    (default: from the environment and `PORTER_CONFIG`, loaded and checked now)."""
    settings = settings or Settings.from_env()
    profiles = load_profiles() if profiles is None else profiles
    app = FastAPI(title="Porter", version="1", summary="Porter's conversion jobs and triggers")
    state = {"records": records}
    buckets = _output_buckets(profiles)
    for off in _switched_off(settings):  # said once at start: nothing is silently off
        logging.getLogger(__name__).warning("porter serve: %s", off)

    def recs() -> JobRecords:
        if state["records"] is None:
            # A caller waits a few seconds at most for an unreachable Redis (503), not the
            # half minute of retries that workers use to ride out a restart.
            state["records"] = service.connect(settings, interactive=True)
        return state["records"]

    def authorized(credentials: Annotated[HTTPAuthorizationCredentials | None, _BEARER]) -> None:
        if not settings.api_token:
            raise HTTPException(403, "job-changing calls are disabled: set PORTER_API_TOKEN")
        # The scheme is case-insensitive (RFC 7235): HTTPBearer accepts "bearer" and "BEARER".
        if not same_secret(settings.api_token, credentials and credentials.credentials):
            challenge = 'Bearer realm="porter"' + (', error="invalid_token"' if credentials else "")
            raise HTTPException(
                401, "missing or wrong bearer token", headers={"WWW-Authenticate": challenge}
            )

    closed = locations.write_routes_problem(settings)  # secure by default: no lists, no writes
    if closed:
        logging.getLogger(__name__).warning("porter serve: %s", closed)

    def writable() -> None:
        if closed:
            raise HTTPException(403, closed)

    @app.exception_handler(ConversionError)
    async def _invalid(_: Request, exc: ConversionError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=422)

    @app.exception_handler(locations.LocationRefused)
    async def _refused(_: Request, exc: locations.LocationRefused) -> JSONResponse:
        return JSONResponse({"detail": str(exc), "rule": exc.rule}, status_code=403)

    @app.exception_handler(service.JobNotFound)
    async def _not_found(_: Request, exc: service.JobNotFound) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=404)

    @app.exception_handler(ArtifactError)
    async def _storage(_: Request, exc: ArtifactError) -> JSONResponse:
        return JSONResponse({"detail": f"storage: {exc}"}, status_code=502)

    @app.exception_handler(redis.RedisError)
    async def _redis_trouble(_: Request, exc: redis.RedisError) -> JSONResponse:
        if isinstance(exc, redis.ConnectionError | redis.TimeoutError):
            return JSONResponse({"detail": f"redis unreachable: {exc}"}, status_code=503)
        # Redis answered, with an error: not "unreachable" (was said of WRONGTYPE, when a job id
        # named another key; ids are checked now, so this is damage in Redis itself).
        return JSONResponse({"detail": f"redis refused the command: {exc}"}, status_code=502)

    @app.exception_handler(hooks.HookInProgress)
    async def _in_progress(_: Request, exc: hooks.HookInProgress) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status_code=409)

    @app.get("/healthz")
    def healthz(response: Response) -> dict[str, str]:
        report = {"redis": _ping(settings.redis_url)}
        for bucket in buckets:
            try:
                open_store(f"s3://{bucket}/").check()
                report[f"s3:{bucket}"] = "ok"
            except ArtifactError as exc:
                report[f"s3:{bucket}"] = f"unreachable: {exc}"
        if any(value != "ok" for value in report.values()):
            response.status_code = 503
        return report

    @app.get("/metrics")
    def metrics() -> Response:
        body, content_type = render_metrics(recs().redis)
        return Response(body, media_type=content_type)

    @app.get("/v1/jobs")
    def jobs(
        state_filter: str | None = Query(None, alias="state"),
        model: str | None = Query(None),
        limit: int = Query(50, ge=1, le=1000),
    ) -> list[dict[str, Any]]:
        rows = []
        for job in recs().job_ids(limit):
            record = recs().get(job, steps=False)
            if record is None:
                continue
            if state_filter is not None and record["state"] != state_filter:
                continue
            if model is not None and record.get("model") != model:
                continue
            rows.append(_summary(record))
        return rows

    @app.post(
        "/v1/jobs",
        dependencies=[Depends(authorized), Depends(writable)],
        openapi_extra=openapi.job_spec_body(),
    )
    async def submit(request: Request, response: Response) -> dict[str, Any]:
        spec, labels = parse_job(hooks.parse_json(await request.body()))
        job, created = service.submit(spec, recs(), trigger="api", **labels)
        response.status_code = 201 if created else 200
        return {"id": job, "created": created, "state": recs().state(job)}

    @app.get("/v1/jobs/{job}")
    def job(job: str) -> dict[str, Any]:
        record = service.get(recs(), job)
        done, total = service.progress(record)
        return {**record, "progress": {"bytes_done": done, "bytes_total": total}}

    @app.post("/v1/jobs/{job}/cancel", dependencies=[Depends(authorized), Depends(writable)])
    def cancel(job: str) -> dict[str, Any]:
        return service.cancel(recs(), job)

    @app.post("/v1/jobs/{job}/retry", dependencies=[Depends(authorized), Depends(writable)])
    def retry(job: str) -> dict[str, Any]:
        return {"job": job, "attempt": service.retry(recs(), job)}

    @app.post(
        "/v1/hooks/training-complete",
        status_code=202,
        dependencies=[Depends(writable)],
        openapi_extra=openapi.TRAINING_COMPLETE_BODY,
    )
    async def training_complete(
        request: Request, response: Response, signature: Annotated[str | None, _SIGNATURE]
    ) -> dict[str, Any]:
        body = await request.body()
        try:
            timestamp = verify(settings.hook_secret, signature, body, settings.hook_max_age)
        except BadSignature as exc:
            raise HTTPException(401, str(exc)) from None
        # Replays are recognised by what was signed (timestamp and MAC), not by the header's
        # spelling: reordered, padded or zero-prefixed copies of one signature are one request.
        signed = sign(settings.hook_secret, body, timestamp)
        answer, replayed = hooks.training_complete(
            body, signed, profiles, recs(), ttl=2 * settings.hook_max_age + 60
        )
        if replayed:
            response.status_code = 200
        return {**answer, "replayed": replayed}

    @app.post(
        "/v1/hooks/huggingface",
        status_code=202,
        dependencies=[Depends(writable)],
        openapi_extra=openapi.HUB_EVENT_BODY,
    )
    async def huggingface(
        request: Request, response: Response, secret: Annotated[str | None, _HUB_SECRET]
    ) -> dict[str, Any]:
        if not hooks.check_hub_secret(settings.hf_webhook_secret, secret):
            raise HTTPException(401, "missing or wrong X-Webhook-Secret")
        answer = hooks.huggingface(await request.body(), profiles, recs())
        if answer is None:
            response.status_code = 200
            return {"ignored": True}
        return answer

    app.add_middleware(BodyLimit, limit=settings.max_request_bytes)
    return app


def _switched_off(settings: Settings) -> list[str]:
    """What this service refuses for want of a secret, and the setting that turns it on."""
    off = {
        "job-changing calls (POST /v1/jobs, cancel, retry)": ("PORTER_API_TOKEN", "api_token"),
        "training-complete hooks": ("PORTER_HOOK_SECRET", "hook_secret"),
        "Hugging Face Hub webhooks": ("PORTER_HF_WEBHOOK_SECRET", "hf_webhook_secret"),
    }
    return [
        f"{what} are off: set {variable} to turn them on"
        for what, (variable, name) in off.items()
        if not getattr(settings, name)
    ]


def _ping(url: str) -> str:
    """`ok` if Redis answers one PING within HEALTH_TIMEOUT, else why not (no retries)."""
    client = redis.Redis.from_url(
        url, socket_timeout=HEALTH_TIMEOUT, socket_connect_timeout=HEALTH_TIMEOUT,
        retry=Retry(NoBackoff(), 0),
    )  # fmt: skip
    try:
        client.ping()
        return "ok"
    except redis.RedisError as exc:
        return f"unreachable: {exc}"
    finally:
        client.close()


def _output_buckets(profiles: dict[str, Profile]) -> list[str]:
    """The S3 buckets the profiles write to (checked by /healthz)."""
    buckets = set()
    for profile in profiles.values():
        for _, spec in profile.expand(PLACEHOLDER_CHECKPOINT, "1"):
            if spec.output.startswith("s3://"):
                buckets.add(spec.output[len("s3://") :].split("/", 1)[0])
    return sorted(buckets)


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = (
        "id", "kind", "state", "created", "finished", "error", "attempt", "manifest_uri",
        "model", "profile", "export", "iteration", "trigger",
    )  # fmt: skip
    return {k: record.get(k) for k in keys} | {"output": record["spec"].get("output")}
