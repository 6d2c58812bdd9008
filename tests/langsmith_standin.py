"""A local HTTP server that stands in for the LangSmith API, for tracing tests without the internet.

It answers ``GET /info`` (which tells the langsmith client which ingest path to use), accepts every
write the client makes (``POST /runs/multipart`` with or without zstd, ``POST /runs/batch``,
``POST /runs``, ``PATCH /runs/<id>``), decodes the bodies and keeps the decoded run operations so a
test can assert on what the client really sent. It binds 127.0.0.1 on a free port, serves from a
daemon thread, and shuts itself down after ``lifetime_s`` even if a test forgets to stop it.
"""

from __future__ import annotations

import gzip
import json
import threading
from dataclasses import dataclass, field
from email.parser import BytesParser
from email.policy import HTTP
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Literal

import zstandard

Mode = Literal["multipart-zstd", "multipart", "batch"]


@dataclass
class Received:
    """One HTTP request the stand-in got: raw facts plus the run operations decoded from it."""

    method: str
    path: str
    headers: dict[str, str]
    raw_size: int
    ops: list[dict[str, Any]] = field(default_factory=list)  # {"op": "post"|"patch", "run": {...}}


def _decompress(body: bytes, encoding: str | None) -> bytes:
    if encoding == "zstd":
        # the client streams frames without a content size, so decompress as a stream
        return zstandard.ZstdDecompressor().decompressobj().decompress(body)
    if encoding == "gzip":
        return gzip.decompress(body)
    return body


def _parse_multipart(body: bytes, content_type: str) -> list[dict[str, Any]]:
    """Runs from a LangSmith multipart body: parts ``post.<id>``, ``post.<id>.inputs``, ``patch.<id>.events``..."""
    message = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    runs: dict[tuple[str, str], dict[str, Any]] = {}
    order: list[tuple[str, str]] = []
    for part in message.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not isinstance(name, str):
            continue
        pieces = name.split(".")
        if pieces[0] not in ("post", "patch") or len(pieces) < 2:
            continue  # feedback, attachments
        key = (pieces[0], pieces[1])
        if key not in runs:
            runs[key] = {"id": pieces[1]}
            order.append(key)
        payload = part.get_payload(decode=True)
        value = json.loads(payload) if payload else None
        if len(pieces) == 2:
            runs[key].update(value or {})
        else:
            runs[key][pieces[2]] = value
    return [{"op": op, "run": runs[(op, run_id)]} for op, run_id in order]


class LangSmithStandIn:
    """``with LangSmithStandIn() as server: ... server.url ... server.runs()``."""

    def __init__(self, mode: Mode = "multipart-zstd", lifetime_s: float = 120.0) -> None:
        self.mode = mode
        self.lifetime_s = lifetime_s
        self.received: list[Received] = []
        self._lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self._timer: threading.Timer | None = None
        self._url: str | None = None
        self._stop_lock = threading.Lock()

    # ------------------------------------------------------------------------------------------

    @property
    def url(self) -> str:
        assert self._url is not None, "start the server first"
        return self._url

    def info(self) -> dict[str, Any]:
        return {
            "version": "0.0.0-standin",
            "batch_ingest_config": {
                "use_multipart_endpoint": self.mode != "batch",
                "scale_up_qsize_trigger": 1000,
                "scale_up_nthreads_limit": 1,
                "scale_down_nempty_trigger": 4,
                "size_limit": 100,
                "size_limit_bytes": 20_971_520,
            },
            "instance_flags": {"zstd_compression_enabled": self.mode == "multipart-zstd"},
        }

    def _record(self, handler: BaseHTTPRequestHandler, method: str) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        item = Received(method, handler.path, headers, len(raw))
        body = _decompress(raw, headers.get("content-encoding"))
        path = handler.path.split("?")[0].rstrip("/")
        content_type = headers.get("content-type", "")
        if path.endswith("/runs/multipart"):
            item.ops = _parse_multipart(body, content_type)
        elif path.endswith("/runs/batch"):
            data = json.loads(body)
            item.ops = [{"op": "post", "run": r} for r in data.get("post", [])]
            item.ops += [{"op": "patch", "run": r} for r in data.get("patch", [])]
        elif path.endswith("/runs") and method == "POST":
            item.ops = [{"op": "post", "run": json.loads(body)}]
        elif "/runs/" in path and method == "PATCH":
            item.ops = [{"op": "patch", "run": {"id": path.rsplit("/", 1)[-1], **json.loads(body)}}]
        with self._lock:
            self.received.append(item)

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        standin = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def _reply(self, status: int, payload: Any) -> None:
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

            def do_GET(self) -> None:
                if self.path.split("?")[0].rstrip("/").endswith("/info"):
                    self._reply(200, standin.info())
                else:
                    self._reply(404, {"detail": "not served by the stand-in"})

            def do_POST(self) -> None:
                standin._record(self, "POST")
                self._reply(202, {})

            def do_PATCH(self) -> None:
                standin._record(self, "PATCH")
                self._reply(202, {})

            def log_message(self, format: str, *args: Any) -> None:  # quiet
                return

        return Handler

    def start(self) -> LangSmithStandIn:
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        host, port = self._server.server_address[:2]
        self._url = f"http://{host!s}:{port}"
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, name="langsmith-standin", daemon=True)
        self._thread.start()
        self._timer = threading.Timer(self.lifetime_s, self.stop)  # bounded even if a test never stops it
        self._timer.daemon = True
        self._timer.start()
        return self

    def stop(self) -> None:
        """Stop serving (idempotent; also called by the lifetime timer)."""
        with self._stop_lock:
            server, self._server = self._server, None
        if self._timer is not None and self._timer is not threading.current_thread():
            self._timer.cancel()
        if server is not None:
            server.shutdown()
            server.server_close()

    def __enter__(self) -> LangSmithStandIn:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # ------------------------------------------------------------------------------------------

    def ops(self) -> list[dict[str, Any]]:
        with self._lock:
            return [op for item in self.received for op in item.ops]

    def runs(self) -> dict[str, dict[str, Any]]:
        """Each run as the server would store it: its post merged with its later patches."""
        merged: dict[str, dict[str, Any]] = {}
        for op in self.ops():
            run = op["run"]
            merged.setdefault(str(run["id"]), {}).update({k: v for k, v in run.items() if v is not None})
        return merged


# --------------------------------------------------------------------------------------------------
# a readable excerpt of a posted run, for docs and fixtures

_KEEP = ("id", "name", "run_type", "parent_run_id", "trace_id", "start_time", "end_time", "tags", "session_name")
_KEEP_METADATA_PREFIXES = ("ls_", "specguard_")
_KEEP_METADATA = (
    "acceptance_threshold",
    "signal_source",
    "n_candidates",
    "decision",
    "grounding_method",
    "trace_steps",
)


def trim_run(run: dict[str, Any], steps: int = 2) -> dict[str, Any]:
    """A chat-model run as posted, cut down: the first ``steps`` step events, the summary, the pair metadata."""
    trimmed: dict[str, Any] = {k: run[k] for k in _KEEP if k in run}
    events: list[dict[str, Any]] = []
    shown = 0
    for event in run.get("events", []):
        if event["name"] == "specguard_step":
            shown += 1
            if shown > steps:
                continue
        events.append(event)
    if shown > steps:
        events.insert(-2, {"name": "...", "kwargs": {"omitted_specguard_step_events": shown - steps}})
    trimmed["events"] = events
    metadata = run.get("extra", {}).get("metadata", {})
    trimmed["extra"] = {
        "metadata": {k: v for k, v in metadata.items() if k.startswith(_KEEP_METADATA_PREFIXES) or k in _KEEP_METADATA}
    }
    message = run.get("outputs", {}).get("generations", [[{}]])[0][0].get("message", {}).get("kwargs", {})
    trimmed["outputs"] = {
        "generations[0][0].message": {k: message[k] for k in ("content", "response_metadata", "usage_metadata")}
    }
    return trimmed


def main() -> None:
    """Run a traced chain on the tiny pair against the stand-in and print the chat-model run, trimmed.

    ``PYTHONPATH=. python -m tests.langsmith_standin > tests/fixtures/langsmith_chat_model_run.json``
    """
    import os
    import sys

    with LangSmithStandIn() as server:
        os.environ.update(
            LANGSMITH_TRACING="true",
            LANGSMITH_ENDPOINT=server.url,
            LANGSMITH_API_KEY="fake",
            LANGSMITH_PROJECT="specguard-standin",
        )
        from langchain_core.output_parsers import StrOutputParser
        from langchain_core.prompts import ChatPromptTemplate
        from langchain_core.tracers.langchain import wait_for_all_tracers

        from langchain_specguard import ChatSpecGuard
        from tests.tiny_models import llama_pair

        target, draft = llama_pair()
        llm = ChatSpecGuard(
            target_model=target,
            draft_model=draft,
            max_tokens=16,
            max_step_tokens=4,
            torch_dtype="float64",
            step_delimiters=["\n"],
            seed=0,
            decision="weighted",
            grounding_weight=0.8,
            acceptance_threshold=0.7515,
            confidence_method="mean",
        )
        chain = ChatPromptTemplate.from_messages([("human", "{question}")]) | llm | StrOutputParser()
        chain.invoke({"question": "Hello"})
        wait_for_all_tracers()
        (run,) = (r for r in server.runs().values() if r.get("name") == "ChatSpecGuard")
        json.dump(trim_run(run), sys.stdout, indent=1)
        sys.stdout.write("\n")


if __name__ == "__main__":
    main()
