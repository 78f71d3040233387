"""The events of one HTTP request's engine requests, from the engine thread to the response: :class:`Inbox` (one
event-loop wake-up per engine step), :class:`Choices` (the ``n`` engine requests behind a request, their queue,
their end) and :func:`sse_chunks` (the server-sent-events body of a stream, OpenAI's chunk shapes).

A stream that falls behind the engine sends what has piled up for a choice as one chunk (several tokens' text), as
OpenAI's streams may, and ``stream_interval`` holds a choice's tokens until that many have come.
"""

import asyncio
import dataclasses
import json
import threading
from collections import deque
from collections.abc import AsyncIterator
from typing import Any

from moekit.serve.engine import Engine, EngineStopped, PromptTooLong, QueueFull, RequestOutput
from moekit.serve.protocol import RequestError
from moekit.serve.sampling import SamplingParams

DISCONNECT_POLL_S = 0.25  # how often a waiting request checks that its client is still there


class Inbox:
    """Events from the engine thread to the event loop's queues. The engine's sinks run on its thread, one call per
    request per step; waking the loop for each (``call_soon_threadsafe`` writes its self-pipe and takes its lock)
    costs more than the event. So events wait in a deque, and a wake-up is scheduled only when none is pending: one
    per engine step, however many requests it served."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.items: deque[tuple[asyncio.Queue, Any]] = deque()
        self.lock = threading.Lock()
        self.scheduled = False

    def put(self, queue: asyncio.Queue, item: Any) -> None:
        """(any thread) Deliver ``item`` to ``queue`` on the loop."""
        with self.lock:
            self.items.append((queue, item))
            if self.scheduled:
                return
            self.scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._flush)
        except RuntimeError:  # the event loop is closed: the server has stopped, nobody is waiting
            pass

    def _flush(self) -> None:
        with self.lock:
            items = list(self.items)
            self.items.clear()
            self.scheduled = False
        for queue, item in items:
            queue.put_nowait(item)


class Choices:
    """The engine requests behind one HTTP request (``n`` per prompt, choice index = prompt * n + k), their events
    on one asyncio queue, and what has finished."""

    def __init__(self, engine: Engine, http_id: str, n: int, inbox: Inbox) -> None:
        self.engine, self.http_id, self.n, self.inbox = engine, http_id, n, inbox
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()
        self.request_ids: list[str] = []
        self.prompts: list[list[int]] = []
        self.finals: dict[int, RequestOutput] = {}
        self.disconnected = False

    def submit(self, prompts: list[list[int]], params: SamplingParams, where: str) -> None:
        """Submit every choice (choice k of a prompt gets ``seed + k``); on any refusal cancel those already in."""
        self.prompts = prompts
        try:
            for ids in prompts:
                for k in range(self.n):
                    p = params if params.seed is None or k == 0 else dataclasses.replace(params, seed=params.seed + k)
                    rid = f"{self.http_id}-{len(self.request_ids)}"
                    self.engine.submit(ids, p, sink=self._sink(len(self.request_ids)), request_id=rid)
                    self.request_ids.append(rid)
        except PromptTooLong as e:
            self.cancel()
            raise RequestError(str(e), field_of(e, where), code="context_length_exceeded") from None
        except QueueFull as e:
            self.cancel()
            raise RequestError(str(e), None, 429, "queue_full", "rate_limit_error") from None
        except EngineStopped as e:
            self.cancel()
            raise RequestError(str(e), None, 503, "shutting_down", "server_error") from None
        except ValueError as e:
            self.cancel()
            raise RequestError(str(e).replace("prompt:", f"{where}:", 1), field_of(e, where)) from None

    def _sink(self, index: int):
        def sink(out: RequestOutput) -> None:  # on the engine thread: hand the event over, nothing more
            self.inbox.put(self.queue, (index, out))
        return sink

    async def events(self, request=None) -> AsyncIterator[tuple[int, RequestOutput]]:
        """Every choice's events until all have finished, or until ``request``'s client has gone (then they are
        cancelled). A stream passes no request: Starlette listens for a stream's disconnect itself and cancels it
        (one listener on the ASGI ``receive``, not two)."""
        next_check = self.loop.time() + DISCONNECT_POLL_S
        while len(self.finals) < len(self.request_ids):
            if request is not None and self.loop.time() >= next_check:  # (tokens may never pause: check by time)
                next_check = self.loop.time() + DISCONNECT_POLL_S
                if await request.is_disconnected():
                    self.disconnected = True
                    self.cancel()
                    return
            try:
                index, out = self.queue.get_nowait()
            except asyncio.QueueEmpty:
                if request is None:  # (no timer to arm: a wait_for per token costs more than the token's chunk)
                    index, out = await self.queue.get()
                else:
                    try:
                        index, out = await asyncio.wait_for(self.queue.get(), DISCONNECT_POLL_S)
                    except TimeoutError:
                        continue
            if out.finished:
                self.finals[index] = out
            yield index, out

    async def batches(self) -> AsyncIterator[list[tuple[int, RequestOutput]]]:
        """The events of :meth:`events` in runs: each run holds one event and every other already waiting."""
        run: list[tuple[int, RequestOutput]] = []
        async for event in self.events():
            run.append(event)
            if self.queue.empty():
                yield run
                run = []
        if run:
            yield run

    def cancel(self) -> None:
        """Cancel the choices not finished yet (the engine frees their slots at its next step)."""
        for index, rid in enumerate(self.request_ids):
            if index not in self.finals:
                self.engine.cancel(rid)

    def failure(self) -> RequestError | None:
        """The error to answer with when a choice ended in an engine error (500) or was cut by shutdown (503)."""
        for out in self.finals.values():
            if out.finish_reason == "error":
                return RequestError(f"the engine failed on this request: {out.error}", None, 500, "engine_error",
                                    "server_error")
        if any(out.finish_reason == "cancelled" for out in self.finals.values()):
            return RequestError("the server is shutting down: the request was cancelled before it finished", None,
                                503, "shutting_down", "server_error")
        return None

    def usage(self) -> dict:
        prompt = sum(len(p) for p in self.prompts)
        completion = sum(out.completion_tokens for out in self.finals.values())
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def field_of(e: Exception, where: str) -> str:
    """The field an engine error names first (``"max_tokens: ..."``); the request's prompt field for ``prompt``."""
    field = str(e).split(":", 1)[0]
    return where if field == "prompt" or not field.isidentifier() else field


async def sse_chunks(choices: Choices, body, head: dict, chat: bool, interval: int = 1) -> AsyncIterator[str]:
    """The SSE body: OpenAI chunks as the engine's events come (a choice's tokens held until ``interval`` of them,
    or its end, have come), then the usage chunk (when asked) and [DONE]."""
    head = {**head, "object": "chat.completion.chunk" if chat else "text_completion"}
    usage = {"usage": None} if body.include_usage else {}

    def chunk(index: int, text: str | None, finish: str | None, token_ids: list[int] | None = None) -> str:
        c: dict[str, Any] = {"index": index}
        if chat:
            c["delta"] = {} if text is None else {"content": text}
        else:
            c["text"] = text or ""
        c.update({"logprobs": None, "finish_reason": finish})
        if token_ids is not None:
            c["token_ids"] = token_ids
        return sse({**head, "choices": [c], **usage})

    try:
        if chat:  # every choice opens with the assistant's role
            for i in range(len(choices.request_ids)):
                yield sse({**head, "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}], **usage})
        pending: dict[int, tuple[list[str], list[int]]] = {}  # per choice: the texts and token ids held back
        async for run in choices.batches():
            failed = next((out for _, out in run if out.finish_reason in ("error", "cancelled")), None)
            if failed is not None:
                yield sse(choices.failure().body())  # OpenAI's mid-stream error event; the other choices end too
                choices.cancel()
                break
            # what piled up for each choice goes out as one chunk (choices in the order their events came)
            sending: list[int] = []
            for index, out in run:
                texts, ids = pending.setdefault(index, ([], []))
                texts.append(out.text)
                ids.extend(out.token_ids)
                due = out.finished or len(ids) >= interval or (interval == 1 and out.text)
                if due and index not in sending:
                    sending.append(index)
            parts = []
            for index in sending:
                texts, ids = pending.pop(index)
                text = "".join(texts)
                token_ids = ids if body.return_token_ids else None
                if text or token_ids:  # (a final event carries no tokens: its tokens came in earlier events)
                    parts.append(chunk(index, text, None, token_ids))
                if index in choices.finals:  # (events() records a choice's final event before yielding it)
                    parts.append(chunk(index, None, choices.finals[index].finish_reason,
                                       [] if body.return_token_ids else None))
            if parts:
                yield "".join(parts)
        else:
            if body.include_usage:
                yield sse({**head, "choices": [], "usage": choices.usage()})
        yield "data: [DONE]\n\n"
    finally:
        choices.cancel()


def sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"
