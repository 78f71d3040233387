"""Serving: a continuous-batching generation engine and an OpenAI-compatible HTTP server (``moekit serve``).

    sampling.py     per-request sampling parameters (validated) and the batched sampler (temperature, top-k,
                    top-p, penalties, a generator per request)
    metrics.py      counters and histograms of the engine (tokens, latency, batch size, expert load), and their
                    Prometheus text
    slots.py        the KV slots: one preallocated KVCache, a row per running sequence, kept compact
    engine.py       Engine: requests join and leave the running batch at every step; chunked prefill; a KV cache
                    of per-sequence slots preallocated under a memory budget; stop strings and token ids
    protocol.py     the OpenAI request bodies, validated, and the OpenAI-shaped error JSON
    chat.py         chat templates: the checkpoint's own (jinja2, as transformers renders it) or moekit's default
    choices.py      one HTTP request's engine requests: their events onto the event loop (one wake-up per engine
                    step), their end, and the server-sent-events body of a stream
    server.py       the FastAPI app (completions, chat completions, models, health, metrics; SSE streaming) and
                    ``serve(checkpoint, ...)``, the function behind the CLI verb

Imports: ``moekit.config``, ``moekit.host``, ``moekit.layer``, ``moekit.model``, ``moekit.formats``,
``moekit.offload``, ``moekit.train`` (loading a checkpoint for inference) and ``moekit.compress`` (compressed
checkpoints load through ``moekit.formats``); the ``[serve]`` extra only in protocol.py (pydantic, at module level:
its request models), chat.py (jinja2) and server.py (FastAPI, uvicorn), each failing with the extra's install line
where it is absent. Nothing below imports this."""
