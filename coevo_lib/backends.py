"""Where asynchronous rollouts get their replies: transformers in this process, or OpenAI-compatible servers.

Every backend answers one request at a time (``await backend.complete(request)``) for the episode
scheduler in coevo_lib.engine; how requests are batched is the backend's business:

- ``HFBatcher`` gathers whatever requests are waiting into one ``generate`` call (dynamic batching),
  so no episode waits for a lockstep batch. Each request samples with its own seeded generator, so
  its reply does not depend on which other requests shared its batch.
- ``HTTPBackend`` sends each request to an OpenAI-compatible ``/v1/completions`` endpoint (vLLM,
  SGLang, ...) with the prompt as token ids: coevo renders the chat template itself, so the tokens
  an agent is trained on are the tokens it was prompted with, whatever the server. Several endpoints
  are data parallelism; a request goes to the one with the fewest requests in flight.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
from transformers import LogitsProcessor, LogitsProcessorList

from coevo_lib.config import RolloutConfig

log = logging.getLogger(__name__)


class RolloutEngineError(RuntimeError):
    """A serving backend failed past its retries; episodes finished before it are on disk."""


@dataclass
class Request:
    prompt_ids: list[int]
    temperature: float
    seed: int


@dataclass
class Reply:
    text: str
    tokens: int  # generated tokens, the stop token included when one ended the reply
    token_ids: list[int] | None = None  # as the engine generated them (the stop token excluded)


@dataclass
class BackendStats:
    requests: int = 0
    retries: int = 0
    restarts: int = 0
    batches: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {"requests": self.requests, "request_retries": self.retries, "engine_restarts": self.restarts,
                **({"generate_batches": self.batches} if self.batches else {}), **self.extra}


# -- transformers in this process -----------------------------------------------------------------


class SeededSampling(LogitsProcessor):
    """Samples each row with its own ``torch.Generator`` and leaves only that token for greedy search.

    ``generate`` draws every row of a batch from one global RNG, so a reply would depend on its
    batch-mates; drawing here per row (and passing do_sample=False) makes a request's sample a
    function of its own seed and logits only.
    """

    def __init__(self, seeds: list[int], temperature: float, top_p: float):
        self.generators = [torch.Generator().manual_seed(seed) for seed in seeds]
        self.temperature, self.top_p = temperature, top_p

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        probs = torch.softmax(scores.float() / self.temperature, dim=-1)
        if self.top_p < 1.0:
            probs = top_p_filter(probs, self.top_p)
        chosen = torch.stack([torch.multinomial(row, 1, generator=g) for row, g in
                              zip(probs.cpu(), self.generators)]).to(scores.device)
        out = torch.full_like(scores, float("-inf"))
        return out.scatter_(1, chosen, 0.0)


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """Zero the tail beyond the smallest set of tokens whose probability reaches ``top_p``."""
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    outside = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
    sorted_probs[outside] = 0.0
    return torch.zeros_like(probs).scatter_(-1, order, sorted_probs)


class HFBatcher:
    """Dynamic batching over an in-process transformers model: one ``generate`` per gathered batch."""

    LINGER_S, POLL_S = 0.05, 0.002  # a batch's generate takes 0.1-1 s on CPU: a few ms of waiting is cheap

    def __init__(self, generator, max_batch: int):
        self.generator, self.max_batch = generator, max_batch  # coevo_lib.rollout.HFGenerator
        self.waiting: list[tuple[Request, asyncio.Future]] = []
        self.wake: asyncio.Event | None = None
        self.worker: asyncio.Task | None = None
        self.stats = BackendStats()

    async def complete(self, request: Request) -> Reply:
        if self.worker is None or self.worker.done():
            self.wake = asyncio.Event()
            self.worker = asyncio.get_running_loop().create_task(self.serve_batches())
        future = asyncio.get_running_loop().create_future()
        self.waiting.append((request, future))
        self.wake.set()
        return await future

    async def serve_batches(self) -> None:
        while True:
            await self.wake.wait()
            self.wake.clear()
            await self.linger()
            while self.waiting:
                batch, self.waiting = self.waiting[: self.max_batch], self.waiting[self.max_batch:]
                await self.run_batch(batch)

    async def linger(self) -> None:
        """Wait while requests keep arriving (episodes back from their env step), at most ``LINGER_S``.

        Without it the first episode back from its step would be generated alone while its
        batch-mates are still stepping, and batches would alternate between tiny and full.
        """
        deadline = time.perf_counter() + self.LINGER_S
        seen = -1
        while len(self.waiting) != seen and len(self.waiting) < self.max_batch and time.perf_counter() < deadline:
            seen = len(self.waiting)
            await asyncio.sleep(self.POLL_S)

    async def run_batch(self, batch: list[tuple[Request, asyncio.Future]]) -> None:
        requests = [request for request, _ in batch]
        try:
            replies = await asyncio.to_thread(self.generate, requests)
        except Exception as error:  # noqa: BLE001 - handed to every waiting episode
            for _, future in batch:
                future.set_exception(error)
            return
        for (_, future), reply in zip(batch, replies):
            future.set_result(reply)
        self.stats.requests += len(batch)
        self.stats.batches += 1

    def generate(self, requests: list[Request]) -> list[Reply]:
        # Greedy and sampled requests need different generate calls; a batch is usually one kind.
        replies: dict[int, Reply] = {}
        for sampled in (False, True):
            index = [i for i, r in enumerate(requests) if (r.temperature > 0) == sampled]
            if index:
                chunk = [requests[i] for i in index]
                replies.update(zip(index, self.generate_kind(chunk, sampled)))
        return [replies[i] for i in range(len(requests))]

    def generate_kind(self, requests: list[Request], sampled: bool) -> list[Reply]:
        processors = None
        if sampled:
            temperature = requests[0].temperature
            if any(r.temperature != temperature for r in requests):
                return [reply for r in requests for reply in self.generate_kind([r], sampled)]
            processors = LogitsProcessorList([SeededSampling([r.seed for r in requests], temperature,
                                                             self.generator.config.top_p)])
        rows = self.generator.generate_ids([r.prompt_ids for r in requests], processors)
        return [self.reply(row) for row in rows]

    def reply(self, row: list[int]) -> Reply:
        kept, stopped = self.generator.cut_at_stop(row)
        return Reply(self.generator.tokenizer.decode(kept, skip_special_tokens=True), len(kept) + stopped, kept)

    async def serve(self, checkpoint: str) -> None:
        """The model is loaded by whoever built the batcher; one batcher serves one checkpoint."""

    async def aclose(self) -> None:
        if self.worker is not None:
            self.worker.cancel()


# -- OpenAI-compatible servers ------------------------------------------------------------------


@dataclass
class Endpoint:
    url: str
    in_flight: int = 0
    failures: int = 0


class HTTPBackend:
    """``/v1/completions`` on one or more OpenAI-compatible endpoints, with retries and a recovery hook.

    ``recover(url)`` is called after a failed request (connection refused, timeout, 5xx): coevo's own
    vLLM server restarts there; for user endpoints it only waits. It returns the URLs to use from now.
    """

    def __init__(self, urls: list[str], model: str, rollout: RolloutConfig, stop_ids: list[int], *,
                 retries: int, api_key: str | None = None,
                 recover: Callable[[str], list[str]] | None = None,
                 decode: Callable[[list[int]], str] | None = None):
        import httpx  # local: the hf path never needs it

        self.endpoints = [Endpoint(url.rstrip("/")) for url in urls]
        self.model, self.rollout, self.stop_ids, self.retries = model, rollout, stop_ids, retries
        self.decode = decode
        self.recovering = asyncio.Lock()  # built inside the rollout's event loop (see engine.rollout_async)
        self.recover = recover or (lambda url: [e.url for e in self.endpoints])
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        limits = httpx.Limits(max_connections=rollout.max_concurrent + 8, max_keepalive_connections=rollout.max_concurrent)
        self.client = httpx.AsyncClient(timeout=rollout.request_timeout_s, headers=headers, limits=limits)
        self.transport_errors = (httpx.TransportError, httpx.HTTPStatusError)
        self.stats = BackendStats()

    def pick(self) -> Endpoint:
        return min(self.endpoints, key=lambda e: e.in_flight)

    def payload(self, request: Request) -> dict[str, Any]:
        return {
            "model": self.model, "prompt": request.prompt_ids, "max_tokens": self.rollout.max_new_tokens,
            "temperature": request.temperature, "top_p": self.rollout.top_p if request.temperature > 0 else 1.0,
            "seed": request.seed, "stop_token_ids": self.stop_ids, "skip_special_tokens": True,
            "include_stop_str_in_output": False, "return_token_ids": True,
        }

    async def complete(self, request: Request) -> Reply:
        for attempt in range(1, self.retries + 1):
            endpoint = self.pick()
            endpoint.in_flight += 1
            try:
                response = await self.client.post(f"{endpoint.url}/completions", json=self.payload(request))
                response.raise_for_status()
                self.stats.requests += 1
                return parse_completion(response.json(), self.decode)
            except self.transport_errors as error:
                if is_client_error(error):
                    raise RolloutEngineError(f"{endpoint.url} refused the request: {describe(error)}") from error
                endpoint.failures += 1
                self.stats.retries += 1
                log.warning("request to %s failed (attempt %d/%d): %s", endpoint.url, attempt, self.retries,
                            describe(error))
                if attempt == self.retries:
                    raise RolloutEngineError(f"{endpoint.url} failed {self.retries} times, last: "
                                             f"{describe(error)}") from error
                await self.recover_once(endpoint.url)
                # A dying engine can still answer /health for a moment: back off so the retries outlast it.
                await asyncio.sleep(min(2.0 ** attempt, 10.0))
            finally:
                endpoint.in_flight -= 1
        raise AssertionError("unreachable")

    async def recover_once(self, url: str) -> None:
        """Concurrent failures of one endpoint (every episode in flight) lead to one recovery, not many."""
        async with self.recovering:
            endpoint = next((e for e in self.endpoints if e.url == url), None)
            if endpoint is not None and endpoint.failures == 0:
                return  # recovered by the request that held the lock before us
            urls = await asyncio.to_thread(self.recover, url)
            self.endpoints = [Endpoint(u.rstrip("/")) for u in urls]

    async def serve(self, checkpoint: str) -> None:
        """Weights are the server manager's business (coevo_lib.serving); requests only name the model."""

    async def aclose(self) -> None:
        await self.client.aclose()


def parse_completion(body: dict[str, Any], decode: Callable[[list[int]], str] | None = None) -> Reply:
    """The reply's text, token count and ids; with ``decode``, the text is decoded here from the ids.

    Decoding here matters when a reply is cut inside a multi-byte character: vLLM's text drops the
    partial character where transformers writes U+FFFD, and the next prompt would differ by backend.
    """
    choice = body["choices"][0]
    usage = body.get("usage") or {}
    token_ids = choice.get("token_ids")
    tokens = usage.get("completion_tokens")
    if tokens is None:
        tokens = len(token_ids) if token_ids is not None else 0
    if token_ids is not None and tokens > len(token_ids) + 1:
        token_ids = None  # a server that reports ids differently: keep the count, not the ids
    # vLLM lists the stop token among the ids it generated; coevo's records keep it out of the text.
    if token_ids is not None and choice.get("finish_reason") == "stop" and len(token_ids) == tokens:
        token_ids = token_ids[:-1]
    text = decode(token_ids) if decode is not None and token_ids is not None else choice.get("text") or ""
    return Reply(text, int(tokens), token_ids)


def is_client_error(error: Exception) -> bool:
    response = getattr(error, "response", None)
    return response is not None and 400 <= response.status_code < 500


def describe(error: Exception) -> str:
    response = getattr(error, "response", None)
    if response is not None:
        return f"HTTP {response.status_code}: {response.text[:300]}"
    return f"{type(error).__name__}: {error}" if str(error) else type(error).__name__


def api_key(env_var: str | None) -> str | None:
    if env_var is None:
        return None
    if env_var not in os.environ:
        raise RolloutEngineError(f"rollout.openai.api_key_env names {env_var}, which is not set")
    return os.environ[env_var]

