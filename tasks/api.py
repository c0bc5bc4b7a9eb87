"""Porter's HTTP status API (read-only): job records as JSON, for dashboards and scripts.

    GET /healthz            Redis reachable
    GET /v1/jobs            recent jobs (?state=FAILED&limit=50)
    GET /v1/jobs/{id}       one job with its steps and progress

Served by `porter serve` (uvicorn). It changes nothing, so it needs no token; job-changing calls
(submit, cancel, retry) are the CLI's for now.
"""

from __future__ import annotations

from typing import Any

import redis
from fastapi import FastAPI, HTTPException, Query

from tasks import service
from tasks.records import JobRecords


def create_app(records: JobRecords | None = None) -> FastAPI:
    """The status API over `records` (default: the configured Redis)."""
    app = FastAPI(title="Porter", version="1", summary="Status of Porter's conversion jobs")
    state = {"records": records}

    def recs() -> JobRecords:
        if state["records"] is None:
            state["records"] = service.connect()
        return state["records"]

    @app.get("/healthz")
    def healthz() -> dict[str, str]:
        try:
            recs().redis.ping()
        except redis.RedisError as exc:
            raise HTTPException(503, f"redis unreachable: {exc}") from exc
        return {"redis": "ok"}

    @app.get("/v1/jobs")
    def jobs(
        state_filter: str | None = Query(None, alias="state"),
        limit: int = Query(50, ge=1, le=1000),
    ) -> list[dict[str, Any]]:
        rows = []
        for job in recs().job_ids(limit):
            record = recs().get(job, steps=False)
            if record and (state_filter is None or record["state"] == state_filter):
                rows.append(_summary(record))
        return rows

    @app.get("/v1/jobs/{job}")
    def job(job: str) -> dict[str, Any]:
        record = recs().get(job)
        if record is None:
            raise HTTPException(404, f"no job {job!r}")
        done, total = service.progress(record)
        return {**record, "progress": {"bytes_done": done, "bytes_total": total}}

    return app


def _summary(record: dict[str, Any]) -> dict[str, Any]:
    keys = ("id", "kind", "state", "created", "finished", "error", "attempt", "manifest_uri")
    return {k: record.get(k) for k in keys} | {"output": record["spec"].get("output")}
