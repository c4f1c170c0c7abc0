"""`ebr serve BUNDLE`: FastAPI over the Retriever (DESIGN.md "Serving").

POST /v1/retrieve, GET /healthz, GET /readyz, GET /metrics (Prometheus), POST /v1/admin/reload,
OpenAPI at /docs. A reload loads and verifies the new bundle first, then swaps one reference:
requests in flight keep the Retriever they started with, so none fails.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import Annotated, Any, Literal

import orjson
from fastapi import FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Histogram, generate_latest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from ebr.index.verify import BundleError
from ebr.serve import explore as ex
from ebr.serve.retriever import Retriever
from ebr.stages import Stages

MODES = ("single", "multi", "conditional", "auto")
MAX_BODY_BYTES = 1 << 20  # a request body above this is a 413 (the largest valid request is far below)


def _utf8(s: str) -> str:
    """JSON can carry escaped lone surrogates that are not text (pydantic lets some through in lists)."""
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("must be valid unicode text (it holds a lone surrogate escape)") from None
    return s


Text = Annotated[str, AfterValidator(_utf8)]


class HistoryItem(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin_id: Text
    action: Literal["impression", "closeup", "click", "save", "hide"] = "click"


class RetrieveRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    user_id: Text = Field(min_length=1, max_length=256)
    k: int = Field(description="number of pins, 1..max_k (the server's --max-k)")
    mode: Literal["single", "multi", "conditional", "auto"] = "single"
    interests: list[Text] = Field(default_factory=list, max_length=64,
                                 description="conditional: the conditions; otherwise a filter")
    exclude: list[Text] = Field(default_factory=list, max_length=10000)
    history: list[Text | HistoryItem] | None = Field(default=None, max_length=1000,
                                                          description="overrides the stored history, most recent last")
    features: dict[Text, Text | int | float | bool | None] | None = Field(
        default=None, description="overrides stored user features, e.g. {\"age_bucket\": \"25-34\"}")
    followed_interests: list[Text] | None = Field(
        default=None, max_length=64, description="overrides the stored followed interests (unknown ones are dropped)")
    explain: bool = Field(default=False, description="multi mode: also return each embedding's importance and the "
                                                     "history items clustered into it; conditional/auto: each list's "
                                                     "interest and why it was chosen")


class Item(BaseModel):
    pin_id: str
    score: float
    source: str


class Embedding(BaseModel):
    """One list of the merge: an embedding of the user (multi: its importance and history cluster)
    or, in modes conditional/auto, an interest (`kind`: requested, followed or inferred; implicit
    for the unconditioned embedding)."""

    source: str
    importance: float | None = None
    history: list[str] | None = None
    kind: str | None = None
    interest: str | None = None


class RetrieveResponse(BaseModel):
    items: list[Item]
    version: str
    mode: str
    cold_start: bool
    embeddings: list[Embedding] | None = None


class PinsRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    pin_ids: list[Text] = Field(max_length=1000)


class ReloadRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    bundle: Text = Field(min_length=1, max_length=4096, description="path of the bundle folder on the server")
    expect_version: Text | None = Field(default=None, description="refuse the bundle unless its version is this")


class Problem(BaseModel):
    detail: Any


class _Observe:
    """Plain ASGI middleware calling observe(inner app, scope, receive, send) (create_app's)."""

    def __init__(self, app, observe):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send) -> None:
        await self.observe(self.app, scope, receive, send)


def _encode(out: dict) -> bytes:
    """JSON bytes of a response body: orjson (0.05 ms for k = 500; json.dumps took 0.8 ms), or
    json.dumps where orjson refuses a string (a lone surrogate in an id from a bundle: escaped)."""
    try:
        return orjson.dumps(out)
    except orjson.JSONEncodeError:
        return json.dumps(out, separators=(",", ":")).encode()


def _declares_json(scope) -> bool:
    """The request's content-type is application/json (parameters such as charset allowed)."""
    for name, value in scope["headers"]:
        if name == b"content-type":
            return value.split(b";", 1)[0].strip().lower() == b"application/json"
    return False


def _error(status: int, detail: Any) -> JSONResponse:
    return JSONResponse(status_code=status, content={"detail": detail})


def _problems(exc: ValidationError | RequestValidationError, skip: int = 1) -> list[dict[str, Any]]:
    """Validation errors as {field, problem}, without echoing the raw input back."""
    out = []
    for e in exc.errors():
        if e.get("type") == "json_invalid":
            out.append(
                {"field": "body", "problem": f"the request body is not valid JSON: {e.get('ctx', {}).get('error', '')}"}
            )
        else:
            out.append({"field": ".".join(str(x) for x in e.get("loc", ())[skip:]) or "body", "problem": e.get("msg")})
    return out


def create_app(
    bundle: str,
    max_k: int = 1000,
    timeout_s: float = 2.0,
    threads: int = 1,
    admin_token: str | None = None,
    expect_version: str | None = None,
    reload_timeout_s: float = 120.0,
    workspace: str | None = None,
    retrieval_threads: int = 2,
) -> FastAPI:
    """The service over one bundle; `admin_token` defaults to $EBR_ADMIN_TOKEN (unset: reload refused).
    `workspace`: where the explorer page finds a synthetic world's latent interests (truth/).
    `retrieval_threads`: retrievals computed at once (more wait; their wait counts toward the
    timeout)."""
    import faiss
    import torch

    def set_threads() -> None:  # OpenMP's thread count is per thread: set in each thread that computes
        torch.set_num_threads(threads)
        faiss.omp_set_num_threads(threads)

    set_threads()
    token = admin_token if admin_token is not None else os.environ.get("EBR_ADMIN_TOKEN") or None
    state: dict[str, Retriever] = {"r": Retriever(bundle, expect_version)}
    reload_lock = threading.Lock()
    reg = CollectorRegistry()
    requests = Counter("ebr_requests", "requests by endpoint and status", ["endpoint", "status"], registry=reg)
    errors = Counter("ebr_errors", "requests answered with an error status", ["endpoint", "status"], registry=reg)
    latency = Histogram(
        "ebr_request_latency_seconds",
        "request latency",
        ["endpoint"],
        registry=reg,
        buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1, 2, 5),
    )
    stage_seconds = Histogram(
        "ebr_stage_seconds",
        "time of each stage of POST /v1/retrieve (ebr/stages.py: parse, dispatch, user_state, user_tower, filters, "
        "ann_search, results, encode)",
        ["stage"],
        registry=reg,
        buckets=(5e-5, 1e-4, 2e-4, 5e-4, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1),
    )
    # retrievals run off the event loop on these threads (torch and FAISS release the GIL, so two
    # can overlap); the loop parses and encodes meanwhile
    pool = ThreadPoolExecutor(max_workers=retrieval_threads, thread_name_prefix="ebr-retrieve", initializer=set_threads)
    reloads = Counter("ebr_reloads", "bundle reloads by outcome", ["outcome"], registry=reg)
    truth = ex.load_truth(workspace)

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        pool.shutdown(wait=False, cancel_futures=True)  # queued retrievals are dropped at shutdown

    app = FastAPI(
        lifespan=lifespan,
        title="ebr retrieval service",
        version="1",
        description="Candidate retrieval over an ebr bundle (two-tower user tower + ANN index).",
    )

    async def bounded_body(request: Request) -> JSONResponse | None:
        """Read the body (cached for the endpoint) unless it exceeds MAX_BODY_BYTES: then a 413."""
        declared = request.headers.get("content-length", "")
        if declared and (not declared.isdigit() or int(declared) > MAX_BODY_BYTES):
            return _error(413, f"the request body exceeds {MAX_BODY_BYTES:,} bytes")
        n, chunks = 0, []
        async for chunk in request.stream():
            n += len(chunk)
            if n > MAX_BODY_BYTES:
                return _error(413, f"the request body exceeds {MAX_BODY_BYTES:,} bytes")
            chunks.append(chunk)
        request._body = b"".join(chunks)
        return None

    paths: set[str] = set()

    async def observe(inner, scope, receive, send) -> None:
        """Every answer, errors included, is counted by endpoint and status; a POST body above
        MAX_BODY_BYTES is a 413 before the endpoint runs (reload reads its body after the token).
        Plain ASGI: a BaseHTTPMiddleware (`@app.middleware`) streamed every response through an
        extra task and cost about 1 ms a request."""
        if scope["type"] != "http":
            return await inner(scope, receive, send)
        t0 = time.perf_counter()
        paths.update(() if paths else (r.path for r in app.routes))
        endpoint = scope["path"] if scope["path"] in paths else "other"
        stages = Stages(t0) if endpoint == "/v1/retrieve" else None
        scope.setdefault("state", {})["stages"] = stages  # request.state.stages in the endpoint
        status = [0]

        async def sending(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
            await send(message)

        try:
            too_big, body = None, b""
            if scope["method"] == "POST" and endpoint != "/v1/admin/reload":
                request = Request(scope, receive)
                too_big = await bounded_body(request)
                body, sent = getattr(request, "_body", b""), [False]

                async def receive():  # the endpoint reads the body read here
                    if sent[0]:
                        return {"type": "http.disconnect"}
                    sent[0] = True
                    return {"type": "http.request", "body": body, "more_body": False}

            fast = None
            if too_big is None and endpoint == "/v1/retrieve" and body and _declares_json(scope):
                fast = await retrieve_fast(body, stages)
            await (too_big or fast or inner)(scope, receive, sending)
        except Exception as exc:  # never a bare 500 page, never an uncounted one
            if status[0]:
                raise  # the answer has started: it cannot become an error page (counted below)
            await _error(500, f"internal error: {type(exc).__name__}")(scope, receive, sending)
        finally:
            requests.labels(endpoint, str(status[0])).inc()
            if status[0] >= 400:
                errors.labels(endpoint, str(status[0])).inc()
            t_end = time.perf_counter()  # one end for the latency and the last stage: they add up exactly
            latency.labels(endpoint).observe(t_end - t0)
            if stages is not None and status[0] == 200:
                stages.mark("encode", t_end)
                for name, seconds in stages.spent.items():
                    stage_seconds.labels(name).observe(seconds)

    app.add_middleware(_Observe, observe=observe)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError):
        return _error(422, _problems(exc))

    async def answer(req: RetrieveRequest, stages: Stages) -> Response:
        """POST /v1/retrieve once the body is a valid RetrieveRequest (both paths into it: the fast
        path in `observe` and the FastAPI route)."""
        stages.mark("parse")
        r = state["r"]  # this request keeps this Retriever even if a reload swaps it
        if not 1 <= req.k <= max_k:
            return _error(422, f"k must be between 1 and {max_k} (got {req.k})")
        try:  # auto: conditional auto, else the implicit embeddings (several when the bundle has them)
            mode = r.resolve_mode(req.mode)
        except ValueError as e:
            return _error(422, str(e))
        history = None if req.history is None else [h if isinstance(h, str) else h.model_dump() for h in req.history]
        call = functools.partial(
            r.retrieve, req.user_id, req.k, req.exclude, history, req.features, True, req.interests or None,
            req.followed_interests, mode, req.explain, stages,
        )
        try:
            res = await asyncio.wait_for(asyncio.get_running_loop().run_in_executor(pool, call), timeout=timeout_s)
        except TimeoutError:
            return _error(504, f"retrieval exceeded the time limit of {timeout_s:.3f}s")
        except ValueError as e:
            return _error(422, str(e))
        out = {
            "items": [
                {"pin_id": p, "score": s, "source": src} for p, s, src in zip(res.pin_ids, res.scores, res.sources)
            ],
            "version": r.version,
            "mode": mode,
            "cold_start": res.cold_start,
        }
        if req.explain and mode != "single":
            out["embeddings"] = res.embeddings
        stages.mark("results")
        # encoded here, not validated again against RetrieveResponse (built from typed values above;
        # the schema stays the documented one): pydantic's pass over k items cost more than the search
        return Response(_encode(out), media_type="application/json")

    async def retrieve_fast(body: bytes, stages: Stages) -> Response | None:
        """POST /v1/retrieve with a JSON body, validated by pydantic straight from the bytes, without
        FastAPI's routing and request parsing (about 0.3 ms a request); the same model, checks and
        error format as the route. None where the body is not JSON pydantic parses (e.g. a lone
        surrogate escape): the route answers those, with its messages."""
        try:
            req = RetrieveRequest.model_validate_json(body)
        except ValidationError as e:
            if any(x.get("type") == "json_invalid" for x in e.errors()):
                return None
            return _error(422, _problems(e, skip=0))
        return await answer(req, stages)

    @app.post(
        "/v1/retrieve", response_model=RetrieveResponse, response_model_exclude_none=True,
        responses={422: {"model": Problem}, 504: {"model": Problem}},
    )
    async def retrieve(req: RetrieveRequest, request: Request):
        """Requests whose body `observe` does not take (not declared as JSON, or empty) come here."""
        return await answer(req, request.state.stages)

    @app.get("/explore", response_class=HTMLResponse)
    async def explore_page():
        """The explorer page; /explore?user=ID opens one user (the page's script reads the URL and
        reports a bad id itself)."""
        return HTMLResponse(ex.page())

    @app.get("/explore/assets/{name}")
    async def explore_asset(name: str):
        found = ex.asset(name)
        if found is None:
            return _error(404, f"no asset {name[:64]!r}; the page ships {', '.join(ex.ASSETS)}")
        return Response(found[0], media_type=found[1])

    @app.get("/v1/users")
    async def users(q: Text = Query(default="", max_length=256), limit: int = Query(default=50, ge=1, le=500)):
        """User ids containing q (users with history first): the explorer's search list."""
        return {"users": ex.search_users(state["r"], q, limit)}

    @app.get("/v1/users/{user_id}")
    async def user(user_id: Text):
        """A user's stored history (newest first) and followed interests as of the bundle; `known`
        is false for a user the bundle does not have (the cold-start path serves them)."""
        if not 1 <= len(user_id) <= 256:
            return _error(422, "user_id must be 1..256 characters")
        return ex.user_view(state["r"], user_id, truth)

    @app.post("/v1/pins", responses={422: {"model": Problem}})
    async def pins(req: PinsRequest):
        """Colour and interests per pin id (the explorer's tiles); unknown ids are left out."""
        return {"pins": ex.colours_of(state["r"], req.pin_ids)}

    @app.get("/healthz")
    async def healthz():
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz():
        r = state.get("r")
        if r is None:
            return _error(503, "no bundle loaded")
        return {"status": "ready", "version": r.version, "backend": r.backend, "modes": r.manifest["modes"]}

    @app.get("/metrics", response_class=PlainTextResponse)
    async def metrics():
        return PlainTextResponse(generate_latest(reg).decode(), media_type=CONTENT_TYPE_LATEST)

    reload_schema = {"content": {"application/json": {"schema": ReloadRequest.model_json_schema()}}, "required": True}

    @app.post(
        "/v1/admin/reload",
        openapi_extra={"requestBody": reload_schema},
        responses={
            401: {"model": Problem},
            403: {"model": Problem},
            413: {"model": Problem},
            422: {"model": Problem},
            504: {"model": Problem},
        },
    )
    async def reload(request: Request):
        """Swap to another bundle after it passed every check; the token is checked before the body is read."""
        if token is None:
            return _error(403, "admin calls are disabled: start the server with EBR_ADMIN_TOKEN set")
        given = request.headers.get("authorization", "")
        if not hmac.compare_digest(given.encode("utf-8", "replace"), f"Bearer {token}".encode()):
            return _error(401, "missing or wrong bearer token (Authorization: Bearer $EBR_ADMIN_TOKEN)")
        too_big = await bounded_body(request)
        if too_big is not None:
            return too_big
        try:
            req = ReloadRequest.model_validate_json(await request.body())
        except ValidationError as e:
            return _error(422, _problems(e, skip=0))
        current = state["r"].version
        try:  # load and verify before the swap; a slow or hanging load does not block serving
            new = await asyncio.wait_for(
                run_in_threadpool(Retriever, req.bundle, req.expect_version), timeout=reload_timeout_s
            )
        except TimeoutError:
            reloads.labels("timeout").inc()
            return _error(504, f"bundle load exceeded {reload_timeout_s:.0f}s; still serving {current}")
        except BundleError as e:
            reloads.labels("refused").inc()
            return _error(422, f"still serving {current}: {e}")
        except Exception as e:  # anything else a bundle can provoke is still the bundle's fault
            reloads.labels("refused").inc()
            return _error(422, f"bundle refused, still serving {current}: {type(e).__name__}")
        with reload_lock:
            old = state["r"].version
            state["r"] = new
        reloads.labels("ok").inc()
        return {"status": "reloaded", "previous": old, "version": new.version}

    return app


def serve(
    bundle: str,
    host: str = "127.0.0.1",
    port: int = 8000,
    max_k: int = 1000,
    timeout_ms: int = 2000,
    threads: int = 1,
    expect_version: str | None = None,
    workspace: str | None = None,
    retrieval_threads: int = 2,
) -> None:
    import uvicorn

    app = create_app(bundle, max_k=max_k, timeout_s=timeout_ms / 1000, threads=threads, expect_version=expect_version,
                     workspace=workspace, retrieval_threads=retrieval_threads)
    uvicorn.run(app, host=host, port=port, log_level="warning", loop="uvloop", http="httptools")
