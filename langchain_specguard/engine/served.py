"""A target served over HTTP: one request judges a proposed step, another writes where the target disagrees.

A target too large for the draft's host runs in an inference server. The OpenAI-compatible completions
endpoint carries everything the verification needs: with ``echo`` and ``logprobs=1`` it returns, for every
prompt token, its log-probability and the server's first choice there, and with ``max_tokens=1`` the
target's own next token. So one request per step judges the step (:meth:`ServedTarget.judge`), and one
ordinary completion that stops at the step boundary writes the rest of a rejected step
(:meth:`ServedTarget.write`). Token ids travel both ways: the prompt goes as a list of ids, and
``return_tokens_as_token_ids`` makes the server name tokens ``token_id:N`` instead of by their text (text
is ambiguous: byte fragments of one character decode to the same replacement text). vLLM speaks exactly
this. SGLang's completions endpoint names echoed tokens by text only; its native ``/generate`` endpoint
carries ids (``api="sglang"``). llama.cpp's servers cannot judge: ``llama-server`` returns no prompt
log-probabilities, and llama-cpp-python's are shifted by one position (``docs/served.md``).

Every answer is checked, not trusted: the echoed ids must be the ids sent, and there must be exactly one
entry per token. Every failure is a :class:`ServedError` naming the server and what went wrong. Requests
are bounded in time (``timeout`` per request, never retried after it passed) and retried a bounded number
of times where retrying is safe. An API key is read from an environment variable and appears in no repr,
message or trace.
"""

from __future__ import annotations

import json
import math
import os
import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal
from urllib.parse import urlsplit

import httpx
import torch
from pydantic import BaseModel, ConfigDict, Field, field_validator

from .accept import Accepted, accept

API_KEY_ENV = "SPECGUARD_TARGET_API_KEY"
"""Where the served target's API key is read from by default (sent as ``Authorization: Bearer``)."""

DEFAULT_PROBE = "Hello, world! 3.14159 naïve café 你好世界 😀\n\tdef f(x):\n        return x ** 2  # done\n"
"""Text whose tokenization shows a different tokenizer: spaces, digits, accents, CJK, an emoji, code."""

_TOKEN_ID = re.compile(r"token_id:(\d+)")
_RETRY_STATUS = frozenset({408, 429, 500, 502, 503, 504})  # the server may answer the same request later


class ServedError(RuntimeError):
    """A served target failed; the message names the server (never its key) and what went wrong."""

    def __init__(self, url: str, problem: str) -> None:
        self.url, self.problem = url, problem
        super().__init__(f"served target {url}: {problem}")


class ServedConnectionError(ServedError):
    """No connection could be made, or the server closed it before answering (it may have died)."""


class ServedTimeoutError(ServedError):
    """The server did not answer within the request's timeout."""


class ServedHTTPError(ServedError):
    """The server answered with an HTTP error status."""

    def __init__(self, url: str, problem: str, status: int) -> None:
        self.status = status
        super().__init__(url, problem)


class ServedProtocolError(ServedError):
    """The server answered, but not with what the request asked for (no prompt log-probabilities, too few...)."""


class ServedTokenizerError(ServedError):
    """The served model tokenizes differently from the local tokenizer, so ids would mean different text."""


class ServedConfig(BaseModel):
    """Where the target is served and how patiently to talk to it."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    url: str = Field(description="the server's OpenAI-compatible base URL, e.g. http://host:8000/v1")
    model: str | None = Field(None, description="the served model's name; None: the server's only model")
    api: Literal["openai", "sglang"] = Field(
        "openai", description="'openai': /v1/completions with token ids (vLLM); 'sglang': SGLang's native /generate"
    )
    api_key_env: str | None = Field(API_KEY_ENV, description="environment variable holding the API key, if any")
    timeout: float = Field(60.0, gt=0, description="seconds one request may take in all; never retried after")
    connect_timeout: float = Field(5.0, gt=0, description="seconds to wait for a connection")
    retries: int = Field(2, ge=0, le=10, description="further tries of a request that is safe to repeat")
    backoff: float = Field(0.25, ge=0, le=30, description="seconds before the first retry, doubling after")
    max_connections: int = Field(8, ge=1, le=1024, description="the connection pool shared by concurrent calls")

    @field_validator("url")
    @classmethod
    def _plain_http_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"the served target's url must be http(s)://host[:port][/path], got {url!r}")
        if parts.username or parts.password or parts.query or parts.fragment:
            # a key in the URL would show in every message; it belongs in the environment variable
            raise ValueError(
                "the served target's url must carry no user, password, query or fragment; "
                f"put an API key in the environment variable named by api_key_env (default {API_KEY_ENV})"
            )
        return url.rstrip("/")


@dataclass(frozen=True)
class ServedJudgement:
    """What the target thinks of a proposed step, as the engine's accept and confidence rules take it.

    ``logp[i]`` is proposal ``i``'s log-probability under the target (raw, before any temperature) and
    ``top_logp[i]`` that of the target's first choice there, so ``logp - top_logp`` are the "ratio" scores
    (:func:`.signals.confidence_score`). ``choices`` has one row more than there are proposals: the target's
    first choice at each proposed position, then its own next token after the whole step, so
    ``accept(proposed[None], [k], [k + 1], choices=choices[None])`` returns both the kept prefix and the token the
    target writes next (:meth:`accepted`). Where a proposal ties the best log-probability it counts as the
    target's choice.
    """

    proposed: torch.Tensor  # [k] long
    logp: torch.Tensor  # [k] float64
    top_logp: torch.Tensor  # [k] float64
    choices: torch.Tensor  # [k + 1] long
    next_logp: float  # the log-probability of choices[k], the target's token after the step

    def ratio_scores(self) -> torch.Tensor:
        """Each proposal's log-probability over the target's first choice's: 0 where it is that choice."""
        return self.logp - self.top_logp

    def accepted(self, passed: torch.Tensor | None = None, *, bonus: bool = True) -> Accepted:
        """The greedy accept rule: proposals kept up to the first the target would not write (or not ``passed``),
        and the target's token there. After a fully kept step that token is its next one, or None with
        ``bonus=False`` (a verification, whose next step starts after the step, as the local engine's does)."""
        k = len(self.proposed)
        rows = passed[None] if passed is not None else None
        return accept(self.proposed[None], [k], [k + int(bonus)], choices=self.choices[None], passed=rows)[0]


@dataclass(frozen=True)
class ServedWrite:
    """Tokens the server wrote, with each one's log-probability under the target."""

    tokens: list[int]
    logprobs: list[float]
    finish_reason: str | None  # "stop" (EOS or a stop string), "length" (max_tokens), or the server's word


class ServedTarget:
    """A client for one served model: a connection pool shared by every call and thread, bounded in time.

    ``ServedTarget("http://host:8000/v1", model="Qwen/Qwen2.5-72B-Instruct")``; options as in
    :class:`ServedConfig`. Close it (or use it as a context manager) to release the connections.
    """

    def __init__(self, url: str, **options: Any) -> None:
        self.config = ServedConfig(url=url, **options)
        cfg = self.config
        self.url = cfg.url  # shown in messages: validated to carry no credentials
        self._root = cfg.url[: -len("/v1")] if cfg.url.endswith("/v1") else cfg.url
        self._key_env = cfg.api_key_env
        key = os.environ.get(cfg.api_key_env) if cfg.api_key_env else None
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(
            headers=headers,
            timeout=httpx.Timeout(cfg.timeout, connect=cfg.connect_timeout),
            limits=httpx.Limits(max_connections=cfg.max_connections, max_keepalive_connections=cfg.max_connections),
        )
        self._model = cfg.model
        self.context_window: int | None = None  # the server's max_model_len, where it says (learned with the model)
        self._count = threading.Lock()
        self.round_trips = 0  # HTTP exchanges so far, retries included (what a step event can report)

    def __repr__(self) -> str:
        key = f", api key from ${self._key_env}" if self._client.headers.get("Authorization") else ""
        return f"ServedTarget({self.url!r}, model={self._model!r}, api={self.config.api!r}{key})"

    def close(self) -> None:
        self._client.close()

    def __enter__(self) -> ServedTarget:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the model -------------------------------------------------------------------------------------------

    @property
    def model(self) -> str:
        """The served model's name: the one configured, else the server's only model (asked once)."""
        if self._model is None:
            models = self._models()
            names = [m.get("id") for m in models]
            if len(names) != 1 or not isinstance(names[0], str):
                raise ServedProtocolError(self.url, f"serves {names or 'no models'}; name one with model=...")
            self._model = names[0]
            self.context_window = _max_model_len(models[0])
        return self._model

    def learn_context_window(self) -> int | None:
        """The served model's context window as the server states it (vLLM's ``max_model_len`` in ``/models``),
        kept in :attr:`context_window`; None where the server does not say (a server without ``/models`` too).
        A server that lists its models but not this one is an error that names the ones it serves."""
        name = self.model
        try:
            models = self._models()
        except ServedHTTPError as exc:
            if exc.status in (404, 405):
                return None
            raise
        entry = next((m for m in models if m.get("id") == name), None)
        if entry is None and models:
            served = [m.get("id") for m in models]
            raise ServedProtocolError(self.url, f"serves {served}, not {name!r}: name one of them")
        self.context_window = _max_model_len(entry) if entry is not None else None
        return self.context_window

    def _models(self) -> list[dict[str, Any]]:
        answer = self._get("/models")
        listed = answer.get("data") if isinstance(answer, dict) else None
        return [m for m in listed if isinstance(m, dict)] if isinstance(listed, list) else []

    # --- judging a step --------------------------------------------------------------------------------------

    def judge(self, ids: Sequence[int], proposed: Sequence[int], *, timeout: float | None = None) -> ServedJudgement:
        """One request: the target's log-probabilities and first choices over ``proposed`` after ``ids``, and its
        own next token after them (greedy).

        ``ids`` are the committed tokens (at least one: the first position has no log-probability), ``proposed``
        the step. The server scores the whole prompt (vLLM reads no prefix cache for a request with prompt
        log-probabilities), so a request costs a prefill of ``ids + proposed``. ``timeout``: seconds this request
        may take, when less than the configured ``timeout`` (a call's own deadline).
        """
        ids, proposed = _ids(ids, "ids"), _ids(proposed, "proposed")
        if not ids:
            raise ValueError("judge needs at least one committed token before the step (the prompt)")
        prompt = ids + proposed
        if self.config.api == "sglang":
            rows = self._judge_sglang(prompt, len(ids), timeout)
        else:
            rows = self._judge_openai(prompt, len(ids), timeout)
        return _judgement(self.url, proposed, rows)

    def _judge_openai(
        self, prompt: list[int], start: int, timeout: float | None
    ) -> list[tuple[int, float, dict[int, float]]]:
        body = {
            "model": self.model,
            "prompt": prompt,
            "echo": True,
            "logprobs": 1,
            "max_tokens": 1,
            "temperature": 0.0,
            "return_tokens_as_token_ids": True,
        }
        choice = self._choice(self._post("/completions", body, idempotent=True, timeout=timeout))
        tokens, token_logprobs, tops = _openai_logprobs(self.url, choice, len(prompt) + 1)
        if tokens[: len(prompt)] != prompt:
            at = next(i for i, (a, b) in enumerate(zip(tokens, prompt, strict=False)) if a != b)
            raise ServedProtocolError(
                self.url,
                f"echoed token {tokens[at]} at position {at} where {prompt[at]} was sent: it re-tokenized the prompt "
                "or added a token to it, so its log-probabilities are not the step's",
            )
        return [(tokens[p], _logprob(self.url, token_logprobs[p], p), tops[p]) for p in range(start, len(prompt) + 1)]

    def _judge_sglang(
        self, prompt: list[int], start: int, timeout: float | None
    ) -> list[tuple[int, float, dict[int, float]]]:
        """SGLang's native ``/generate``: scored from ``logprob_start_len``, whose own entry has no log-probability
        (SGLang puts None first: the logits before it are not computed), so it starts at the last committed token."""
        body = {
            "input_ids": prompt,
            "sampling_params": {"max_new_tokens": 1, "temperature": 0.0},
            "return_logprob": True,
            "logprob_start_len": start - 1,
            "top_logprobs_num": 1,
            "return_text_in_logprobs": False,
        }
        answer = self._post_root("/generate", body, idempotent=True, timeout=timeout)
        meta = answer.get("meta_info") if isinstance(answer, dict) else None
        if not isinstance(meta, dict):
            raise ServedProtocolError(self.url, "answered /generate without meta_info")
        fed = _sglang_rows(self.url, meta, "input", prompt[start - 1 :])
        return fed + _sglang_rows(self.url, meta, "output", None)[:1]

    # --- writing ---------------------------------------------------------------------------------------------

    def write(
        self,
        ids: Sequence[int],
        max_tokens: int,
        *,
        stop: Sequence[str] = (),
        stop_token_ids: Sequence[int] = (),
        temperature: float = 0.0,
        seed: int | None = None,
        timeout: float | None = None,
    ) -> ServedWrite:
        """An ordinary completion after ``ids``: up to ``max_tokens`` tokens, ending at a stop string (the step's
        delimiters) or stop token. Greedy or seeded, the request is retried where safe; unseeded sampling only
        when it never reached the server. The tokens come back as ids, up to and including the one that
        completed a stop string: the engine's own step rule decides where the step ends. ``timeout`` as for
        :meth:`judge`."""
        ids = _ids(ids, "ids")
        if not ids:
            raise ValueError("write needs at least one token to continue")
        if max_tokens < 1:
            raise ValueError(f"max_tokens must be at least 1, got {max_tokens}")
        if temperature < 0 or not math.isfinite(temperature):
            raise ValueError(f"temperature must be a finite number >= 0, got {temperature}")
        deterministic = temperature == 0 or seed is not None
        if self.config.api == "sglang":
            return self._write_sglang(ids, max_tokens, list(stop), list(stop_token_ids), temperature, seed, timeout)
        body: dict[str, Any] = {
            "model": self.model,
            "prompt": ids,
            "max_tokens": max_tokens,
            "temperature": temperature,
            "logprobs": 0,
            "return_tokens_as_token_ids": True,
        }
        if stop:
            body["stop"] = list(stop)
            body["include_stop_str_in_output"] = True
        if stop_token_ids:
            body["stop_token_ids"] = list(stop_token_ids)
        if seed is not None:
            body["seed"] = seed
        choice = self._choice(self._post("/completions", body, idempotent=deterministic, timeout=timeout))
        tokens, token_logprobs, _ = _openai_logprobs(self.url, choice, None)
        logprobs = [_logprob(self.url, lp, i) for i, lp in enumerate(token_logprobs)]
        reason = choice.get("finish_reason")
        return ServedWrite(tokens, logprobs, reason if isinstance(reason, str) else None)

    def _write_sglang(
        self,
        ids: list[int],
        max_tokens: int,
        stop: list[str],
        stop_ids: list[int],
        temperature: float,
        seed: int | None,
        timeout: float | None,
    ) -> ServedWrite:
        params: dict[str, Any] = {"max_new_tokens": max_tokens, "temperature": temperature}
        if stop:
            params["stop"] = stop
        if stop_ids:
            params["stop_token_ids"] = stop_ids
        if seed is not None:
            params["sampling_seed"] = seed
        body = {"input_ids": ids, "sampling_params": params, "return_logprob": True, "return_text_in_logprobs": False}
        answer = self._post_root("/generate", body, idempotent=temperature == 0 or seed is not None, timeout=timeout)
        meta = answer.get("meta_info") if isinstance(answer, dict) else None
        if not isinstance(meta, dict):
            raise ServedProtocolError(self.url, "answered /generate without meta_info")
        rows = _sglang_rows(self.url, meta, "output", None)
        reason = meta.get("finish_reason")
        kind = reason.get("type") if isinstance(reason, dict) else None
        return ServedWrite([r[0] for r in rows], [r[1] for r in rows], kind if isinstance(kind, str) else None)

    # --- the tokenizer ---------------------------------------------------------------------------------------

    def check_tokenizer(self, tokenizer: Any, probe: str | None = None) -> None:
        """Refuse a local tokenizer that tokenizes otherwise than the served model: ids would mean other text.

        Compares the ids of ``probe`` (default: :data:`DEFAULT_PROBE` and the tokenizer's special tokens) from
        the server's ``/tokenize`` with the local ones, and checks that the server decodes the local
        vocabulary's last id as the local tokenizer does (a smaller served vocabulary fails there).
        """
        text = probe if probe is not None else DEFAULT_PROBE + "".join(getattr(tokenizer, "all_special_tokens", []))
        local = list(tokenizer(text, add_special_tokens=False)["input_ids"])
        answer = self._post_root(
            "/tokenize", {"model": self.model, "prompt": text, "add_special_tokens": False}, idempotent=True
        )
        served = answer.get("tokens") if isinstance(answer, dict) else None
        if not isinstance(served, list):
            raise ServedProtocolError(self.url, "answered /tokenize without a list of tokens")
        if served != local:
            at = next(
                (i for i, (a, b) in enumerate(zip(served, local, strict=False)) if a != b), min(len(served), len(local))
            )
            raise ServedTokenizerError(
                self.url,
                f"the served model {self.model!r} tokenizes the probe {text!r} otherwise than the local tokenizer "
                f"(from position {at}: served {served[at : at + 5]}, local {local[at : at + 5]}); the draft must "
                "use the target's tokenizer",
            )
        last = len(tokenizer) - 1
        try:
            decoded = self._post_root("/detokenize", {"model": self.model, "tokens": [last]}, idempotent=True)
        except ServedHTTPError as exc:
            raise ServedTokenizerError(
                self.url, f"cannot decode token {last}, the local vocabulary's last ({exc.problem})"
            ) from None
        text_last = decoded.get("prompt") if isinstance(decoded, dict) else None
        if text_last != tokenizer.decode([last]):
            raise ServedTokenizerError(
                self.url,
                f"decodes token {last} as {text_last!r}, the local tokenizer as {tokenizer.decode([last])!r}",
            )

    # --- HTTP ------------------------------------------------------------------------------------------------

    def _choice(self, answer: Any) -> dict[str, Any]:
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise ServedProtocolError(self.url, "answered without exactly one choice")
        return choices[0]

    def _get(self, path: str) -> Any:
        return self._request("GET", self.url + path, None, idempotent=True)

    def _post(self, path: str, body: dict[str, Any], *, idempotent: bool, timeout: float | None = None) -> Any:
        return self._request("POST", self.url + path, body, idempotent=idempotent, timeout=timeout)

    def _post_root(self, path: str, body: dict[str, Any], *, idempotent: bool, timeout: float | None = None) -> Any:
        return self._request("POST", self._root + path, body, idempotent=idempotent, timeout=timeout)

    def _request(
        self, method: str, url: str, body: dict[str, Any] | None, *, idempotent: bool, timeout: float | None = None
    ) -> Any:
        """Send, retrying (with doubling backoff) what is safe to retry: a connection never made, and for an
        idempotent request a dropped connection or a status the server may not repeat. A timeout is final.
        Each try may take the configured ``timeout``; ``timeout`` here bounds every try together (a call's own
        deadline), and no retry starts past it."""
        where = url[len(self._root) :] or "/"
        tries = self.config.retries + 1
        overall = time.monotonic() + timeout if timeout is not None else math.inf
        for attempt in range(tries):
            limit = max(min(self.config.timeout, overall - time.monotonic()), 0.001)
            try:
                status, data = self._send(method, url, body, limit)
            except httpx.ConnectError as exc:
                failure: ServedError = ServedConnectionError(self.url, f"cannot connect ({_reason(exc)})")
                retry = True  # nothing reached the server
            except httpx.ConnectTimeout:
                failure = ServedConnectionError(self.url, f"no connection within {self.config.connect_timeout:g}s")
                retry = True
            except httpx.TimeoutException:
                raise ServedTimeoutError(self.url, f"no answer to {where} within {limit:.3g}s") from None
            except (httpx.RemoteProtocolError, httpx.ReadError, httpx.WriteError) as exc:
                failure = ServedConnectionError(
                    self.url, f"the connection closed during {where}, the server may have died ({_reason(exc)})"
                )
                retry = idempotent
            else:
                if status < 400:
                    return _json(self.url, where, data)
                failure = ServedHTTPError(self.url, f"{where} answered HTTP {status}: {_message(data)}", status)
                retry = idempotent and status in _RETRY_STATUS
            pause = self.config.backoff * 2**attempt
            if not retry or attempt == tries - 1 or time.monotonic() + pause >= overall:
                if attempt:
                    failure.args = (f"{failure.args[0]} (after {attempt + 1} tries)",)
                raise failure
            time.sleep(pause)
        raise AssertionError("unreachable")

    def _send(self, method: str, url: str, body: dict[str, Any] | None, limit: float) -> tuple[int, bytes]:
        """One exchange, bounded by ``limit`` seconds in all: a server that answers slowly, byte by byte, is cut off
        too."""
        deadline = time.monotonic() + limit
        with self._count:
            self.round_trips += 1
        timeout = httpx.Timeout(limit, connect=min(limit, self.config.connect_timeout))
        with self._client.stream(method, url, json=body, timeout=timeout) as response:
            chunks = []
            for chunk in response.iter_bytes():
                chunks.append(chunk)
                if time.monotonic() > deadline:
                    raise httpx.ReadTimeout("the answer took longer than the timeout")
            return response.status_code, b"".join(chunks)


# --- parsing answers -----------------------------------------------------------------------------------------


def _max_model_len(entry: Mapping[str, Any]) -> int | None:
    length = entry.get("max_model_len")
    return length if isinstance(length, int) and not isinstance(length, bool) and length > 0 else None


def _ids(tokens: Sequence[int], name: str) -> list[int]:
    out = [int(t) for t in tokens]
    if any(t < 0 for t in out):
        raise ValueError(f"{name} holds a negative token id")
    return out


def _reason(exc: Exception) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _json(url: str, where: str, data: bytes) -> Any:
    try:
        return json.loads(data)
    except ValueError:
        raise ServedProtocolError(url, f"{where} answered with a body that is not JSON: {data[:200]!r}") from None


def _message(data: bytes) -> str:
    """The server's own words about an error, short: vLLM's ``error.message``, FastAPI's ``detail``, or the body."""
    try:
        answer = json.loads(data)
    except ValueError:
        return data[:300].decode("utf-8", "replace") or "(empty body)"
    if isinstance(answer, dict):
        error = answer.get("error")
        for found in (error.get("message") if isinstance(error, dict) else error, answer.get("detail")):
            if found:
                return str(found)[:300]
    return str(answer)[:300]


def _token(url: str, text: object) -> int:
    match = _TOKEN_ID.fullmatch(text) if isinstance(text, str) else None
    if match is None:
        raise ServedProtocolError(
            url,
            f"named a token {text!r}, not 'token_id:N': it must support return_tokens_as_token_ids (vLLM does); "
            "token text is ambiguous",
        )
    return int(match.group(1))


def _logprob(url: str, value: object, position: int) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or math.isnan(value):
        raise ServedProtocolError(url, f"returned no log-probability for the token at position {position}")
    return float(value)


def _openai_logprobs(
    url: str, choice: Mapping[str, Any], expected: int | None
) -> tuple[list[int], list[object], list[dict[int, float]]]:
    """The ids, log-probabilities and top log-probabilities (by id) of a completions choice's ``logprobs``."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict) or not isinstance(lp.get("tokens"), list):
        raise ServedProtocolError(
            url, "returned no log-probabilities: it must return prompt log-probabilities with echo (vLLM does)"
        )
    tokens, values, tops = lp["tokens"], lp.get("token_logprobs"), lp.get("top_logprobs")
    if not isinstance(values, list) or not isinstance(tops, list) or not len(tokens) == len(values) == len(tops):
        raise ServedProtocolError(url, "returned log-probabilities whose lists differ in length")
    if expected is not None and len(tokens) != expected:
        raise ServedProtocolError(
            url, f"returned {len(tokens)} log-probabilities where {expected} were asked for (the prompt and one token)"
        )
    by_id = [{_token(url, k): float(v) for k, v in top.items()} if isinstance(top, dict) else {} for top in tops]
    return [_token(url, t) for t in tokens], values, by_id


def _sglang_rows(
    url: str, meta: Mapping[str, Any], side: str, fed: list[int] | None
) -> list[tuple[int, float, dict[int, float]]]:
    """``(id, logprob, {id: logprob} of the top)`` rows from SGLang's ``{side}_token_logprobs`` triples.

    For the prompt (``fed``: the ids from ``logprob_start_len`` on), the entries must name exactly those ids,
    and the first, which SGLang leaves without a log-probability, is dropped."""
    values, tops = meta.get(f"{side}_token_logprobs"), meta.get(f"{side}_top_logprobs")
    if not isinstance(values, list) or not values or (fed is not None and len(values) != len(fed)):
        got = len(values) if isinstance(values, list) else "no"
        wanted = len(fed) if fed is not None else "some"
        raise ServedProtocolError(url, f"returned {got} {side} log-probabilities where {wanted} were asked for")
    if not isinstance(tops, list) or len(tops) != len(values):
        tops = [None] * len(values)
    if any(not isinstance(entry, (list, tuple)) or len(entry) < 2 for entry in values):
        raise ServedProtocolError(url, f"returned a malformed {side} log-probability entry")
    ids = [int(entry[1]) for entry in values]
    if fed is not None and ids != fed:
        raise ServedProtocolError(url, f"scored tokens {ids} where {fed} were sent (from logprob_start_len)")
    skip = 1 if fed is not None else 0
    rows = []
    for i, (entry, top) in enumerate(zip(values, tops, strict=True)):
        if i < skip:
            continue
        best = {int(t[1]): _logprob(url, t[0], i) for t in top} if isinstance(top, list) else {}
        rows.append((int(entry[1]), _logprob(url, entry[0], i), best))
    return rows


def _judgement(url: str, proposed: list[int], rows: list[tuple[int, float, dict[int, float]]]) -> ServedJudgement:
    """Proposals' rows (id, log-probability, top entries) then the new token's row, as tensors."""
    k = len(proposed)
    logp, top_logp, choices = [], [], []
    for i, (token, value, top) in enumerate(rows[:k]):
        if token != proposed[i]:
            raise ServedProtocolError(url, f"scored token {token} where proposal {i} is {proposed[i]}")
        best_id, best = max(top.items(), key=lambda item: item[1], default=(token, value))
        if value >= best:  # the proposal is (or ties) the first choice
            best_id, best = token, value
        logp.append(value)
        top_logp.append(best)
        choices.append(best_id)
    next_token, next_logp, _ = rows[k]
    choices.append(next_token)
    return ServedJudgement(
        proposed=torch.tensor(proposed, dtype=torch.long),
        logp=torch.tensor(logp, dtype=torch.float64),
        top_logp=torch.tensor(top_logp, dtype=torch.float64),
        choices=torch.tensor(choices, dtype=torch.long),
        next_logp=next_logp,
    )
