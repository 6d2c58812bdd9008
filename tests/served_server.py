"""A real OpenAI-compatible server on 127.0.0.1 for the served-target tests and benchmark: vLLM's CPU build.

Why vLLM and not llama.cpp (docs/served.md): judging a step needs the log-probability of every prompt token
and the target's first choice there, named by token id. vLLM's completions endpoint gives both (``echo`` with
``logprobs`` and ``return_tokens_as_token_ids``) and takes the prompt as ids. llama.cpp's ``llama-server``
returns no prompt log-probabilities, and llama-cpp-python's server returns them one position off, keyed by
token text, for a prompt it takes only as text.

vLLM serves Hugging Face checkpoints, not these GGUFs (its GGUF loader left the core), so :func:`exported`
dequantizes the project's packaged Qwen2.5-Coder GGUFs once with transformers, as the local engine loads
them, and saves them with the packaged tokenizer next to the GGUF cache. The server runs from its own
virtual environment (vLLM pins torch and transformers versions the project does not), which
``.ci/install-served`` makes; ``$SPECGUARD_SERVER_PYTHON`` names another interpreter.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import httpx

SERVER_PYTHON_ENV = "SPECGUARD_SERVER_PYTHON"
STARTUP_TIMEOUT = float(os.environ.get("SPECGUARD_SERVER_STARTUP_TIMEOUT", "600"))


def server_python() -> Path | None:
    """The interpreter that has vLLM: ``$SPECGUARD_SERVER_PYTHON``, else the venv ``.ci/install-served`` makes."""
    named = os.environ.get(SERVER_PYTHON_ENV)
    if named:
        return Path(named) if Path(named).exists() else None
    venv = os.environ.get("SPECGUARD_SERVED_VENV")
    found = [Path(venv)] if venv else sorted(Path.home().glob(".cache/langchain_specguard/venv-vllm-cpu-*"))
    pythons = [folder / "bin" / "python" for folder in found if (folder / "bin" / "python").exists()]
    return pythons[-1] if pythons else None


def exported(which: str, dtype: str = "bfloat16") -> Path:
    """A Hugging Face checkpoint of the packaged ``"target"`` (1.5B) or ``"draft"`` (0.5B), made once from its GGUF.

    Written under a temporary name and renamed when complete, so an interrupted export leaves nothing half-made.
    """
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GgufConfig

    from langchain_specguard.engine.packaged import QWEN_CODER, assemble, cache_dir, packaged_tokenizer

    folder = cache_dir(QWEN_CODER)
    model = QWEN_CODER.target if which == "target" else QWEN_CODER.draft
    out = folder / "served" / f"{Path(model.filename).stem}-{dtype}"
    if (out / "config.json").exists():
        return out
    gguf = assemble(model, folder, QWEN_CODER.extra)
    tokenizer = packaged_tokenizer(QWEN_CODER, folder, assemble(QWEN_CODER.target, folder, QWEN_CODER.extra))
    partial = out.with_name(f".{out.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        loaded = AutoModelForCausalLM.from_pretrained(
            folder, gguf_file=gguf.name, dtype=getattr(torch, dtype), quantization_config=GgufConfig(dequantize=True)
        )
        # transformers will not save a model it loaded from GGUF; the dense weights are a plain checkpoint
        config = loaded.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        state = {name: tensor.contiguous() for name, tensor in loaded.state_dict().items()}
        if config.tie_word_embeddings:
            state.pop("lm_head.weight", None)
        partial.mkdir(parents=True)
        config.save_pretrained(partial)
        save_file(state, partial / "model.safetensors", metadata={"format": "pt"})
        tokenizer.save_pretrained(partial)
        with contextlib.suppress(OSError):  # another process finished first: its export is the same
            os.rename(partial, out)
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return out


class JSONHandler(BaseHTTPRequestHandler):
    """A quiet request handler for the tests' stand-in peers, answering JSON."""

    def reply(self, status: int, body: object) -> None:
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args: object) -> None:
        pass


@contextlib.contextmanager
def peer(handler: type[BaseHTTPRequestHandler]) -> Iterator[str]:
    """An HTTP server on 127.0.0.1 running ``handler`` in a thread; yields its ``/v1`` base URL."""
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1"
    finally:
        server.shutdown()
        server.server_close()


class ModelServer:
    """vLLM's completions dialect answered by a local Hugging Face model, exactly and greedily, for tests that need a
    served target whose every answer is known (its own ``generate()`` says what it writes).

    What it answers, as vLLM 0.32 does (checked against the real server in tests/integration_tests/test_served.py):
    ``POST /v1/completions`` with the prompt as ids; ``echo`` with ``logprobs`` gives every prompt token's
    log-probability and, per position, the top ``logprobs`` entries plus the token itself, named ``token_id:N``;
    ``stop`` strings (kept in the output with ``include_stop_str_in_output``), ``stop_token_ids`` and the model's
    end-of-sequence tokens stop a completion after the token that completed them. ``GET /v1/models`` (with
    ``max_model_len``), ``POST /tokenize`` and ``POST /detokenize`` as vLLM's. Greedy only (temperature 0); one
    request at a time runs the model (a lock), any number wait. ``delay`` seconds pass before each completion;
    ``fail`` makes completions answer that HTTP status; ``requests`` records each one's path and body, and
    ``most_at_once`` how many completions were in flight together.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str, *, max_model_len: int = 512) -> None:
        self.model, self.tokenizer, self.name, self.max_model_len = model, tokenizer, name, max_model_len
        eos = model.generation_config.eos_token_id
        self.eos = {eos} if isinstance(eos, int) else set(eos or [])
        if tokenizer.eos_token_id is not None:
            self.eos.add(tokenizer.eos_token_id)
        self.lock = threading.Lock()
        self.count = threading.Lock()
        self.delay = 0.0
        self.fail: int | None = None
        self.requests: list[tuple[str, dict[str, Any]]] = []
        self.in_flight = 0
        self.most_at_once = 0

    def completions(self, body: dict[str, Any]) -> tuple[int, dict[str, Any]]:
        import torch

        if body.get("model") != self.name:
            return 404, {"error": {"message": f"The model `{body.get('model')}` does not exist."}}
        prompt, echo, top = list(body["prompt"]), bool(body.get("echo")), body.get("logprobs")
        if body.get("temperature", 1.0) != 0:
            return 400, {"error": {"message": "this stand-in server decodes greedily only"}}
        stops, stop_ids = list(body.get("stop") or []), set(body.get("stop_token_ids") or []) | self.eos
        tokens, values, tops = ([prompt[0]], [None], [None]) if echo else ([], [], [])
        with self.lock, torch.no_grad():
            if echo:
                logp = self._logprobs(prompt)
                for p in range(1, len(prompt)):
                    tokens.append(prompt[p])
                    values.append(logp[p - 1, prompt[p]].item())
                    tops.append(self._top(logp[p - 1], prompt[p], top))
            sequence, written, finish = list(prompt), [], "length"
            for _ in range(int(body.get("max_tokens", 16))):
                logp = self._logprobs(sequence)[-1]
                token = int(logp.argmax())
                sequence.append(token)
                written.append(token)
                tokens.append(token)
                values.append(logp[token].item())
                tops.append(self._top(logp, token, top))
                text = self.tokenizer.decode(written)
                if token in stop_ids or any(stop in text for stop in stops):
                    finish = "stop"
                    break
        named = [{f"token_id:{t}": v for t, v in entry.items()} if entry is not None else None for entry in tops]
        logprobs = {"tokens": [f"token_id:{t}" for t in tokens], "token_logprobs": values, "top_logprobs": named}
        choice = {"index": 0, "text": self.tokenizer.decode(written), "finish_reason": finish}
        choice["logprobs"] = logprobs if top is not None else None
        return 200, {"object": "text_completion", "model": self.name, "choices": [choice]}

    def _logprobs(self, ids: list[int]) -> Any:
        import torch

        positions = torch.arange(len(ids))[None]
        logits = self.model(input_ids=torch.tensor([ids]), position_ids=positions).logits[0]
        return torch.log_softmax(logits.double(), dim=-1)

    @staticmethod
    def _top(logp: Any, token: int, n: int | None) -> dict[int, float]:
        best = logp.topk(max(n or 0, 1))
        entries = {int(i): float(v) for v, i in zip(best.values.tolist(), best.indices.tolist(), strict=True)}
        return {**entries, token: float(logp[token])}

    def handler(self) -> type[BaseHTTPRequestHandler]:
        server = self

        class Handler(JSONHandler):
            def do_GET(self) -> None:
                if self.path == "/v1/models":
                    entry = {"id": server.name, "object": "model", "max_model_len": server.max_model_len}
                    self.reply(200, {"object": "list", "data": [entry]})
                else:
                    self.reply(404, {"detail": "Not Found"})

            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers.get("content-length", 0))) or b"{}")
                with server.count:
                    server.requests.append((self.path, body))
                if self.path == "/tokenize":
                    ids = server.tokenizer(body["prompt"], add_special_tokens=body.get("add_special_tokens", True))
                    self.reply(200, {"tokens": ids["input_ids"], "max_model_len": server.max_model_len})
                elif self.path == "/detokenize":
                    self.reply(200, {"prompt": server.tokenizer.decode(body["tokens"])})
                elif self.path == "/v1/completions":
                    with server.count:
                        server.in_flight += 1
                        server.most_at_once = max(server.most_at_once, server.in_flight)
                    try:
                        time.sleep(server.delay)
                        if server.fail is not None:
                            self.reply(server.fail, {"error": {"message": "the stand-in server was told to fail"}})
                        else:
                            self.reply(*server.completions(body))
                    finally:
                        with server.count:
                            server.in_flight -= 1
                else:
                    self.reply(404, {"detail": "Not Found"})

        return Handler

    def completion_requests(self) -> list[dict[str, Any]]:
        return [body for path, body in self.requests if path == "/v1/completions"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class VLLMServer:
    """``vllm serve`` on 127.0.0.1 as a child process: started, waited for, and stopped (killed if it must be).

    float32 by default: on a CPU without AVX512-BF16 (CI's and the developers' are AVX2) vLLM's oneDNN
    bfloat16 matmul fails over to a slower plain-torch one.
    """

    def __init__(self, model_dir: Path, name: str, *, dtype: str = "float32", max_model_len: int = 4096) -> None:
        python = server_python()
        if python is None:
            raise RuntimeError(f"no vLLM interpreter: run .ci/install-served, or set {SERVER_PYTHON_ENV}")
        self.name, self.port = name, free_port()
        self.url = f"http://127.0.0.1:{self.port}/v1"
        self.log = model_dir.parent / f"vllm-{name}-{self.port}.log"
        env = {
            **os.environ,
            "VLLM_CPU_OMP_THREADS_BIND": "nobind",  # share the cores with the test process instead of pinning them
            "VLLM_LOGGING_LEVEL": "WARNING",
            "VLLM_NO_USAGE_STATS": "1",
            "HF_HUB_OFFLINE": "1",
        }
        self.command = [
            str(python), "-m", "vllm.entrypoints.openai.api_server",
            "--model", str(model_dir), "--served-model-name", name,
            "--host", "127.0.0.1", "--port", str(self.port),
            "--dtype", dtype, "--max-model-len", str(max_model_len),
            "--max-num-seqs", "4", "--kv-cache-memory-bytes", str(512 << 20),  # room for the tests' contexts
            "--enforce-eager", "--disable-log-stats",
        ]  # fmt: skip
        self.env = env
        self.process: subprocess.Popen[bytes] | None = None

    def start(self) -> VLLMServer:
        with self.log.open("wb") as log:
            self.process = subprocess.Popen(
                self.command, stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True
            )
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"vLLM exited with {self.process.returncode} while starting:\n{self.tail()}")
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(f"http://127.0.0.1:{self.port}/health", timeout=2).status_code == 200:
                    return self
            time.sleep(1)
        self.stop()
        raise RuntimeError(f"vLLM did not answer /health within {STARTUP_TIMEOUT:g}s:\n{self.tail()}")

    def tail(self, lines: int = 40) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def kill(self) -> None:
        """Kill the server's whole process group at once (the engine core is a child process)."""
        if self.process is not None and self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, 9)
            self.process.wait(timeout=30)

    def stop(self) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, 15)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.kill()

    def __enter__(self) -> VLLMServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


@contextlib.contextmanager
def serving(which: str, name: str, **options: object) -> Iterator[VLLMServer]:
    with VLLMServer(exported(which), name, **options) as server:  # type: ignore[arg-type]
        yield server


if __name__ == "__main__":  # python -m tests.served_server target|draft: export (e.g. before CI's tests)
    for which in sys.argv[1:] or ["draft", "target"]:
        print(exported(which))
