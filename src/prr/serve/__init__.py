"""``prr serve``: an OpenAI-compatible HTTP server with continuous batching over prr's paged KV cache.

Layers, bottom up: :mod:`prr.model.runner` (batch slots over one page pool; how a step runs),
:mod:`.scheduler` (the engine loop: what runs), :mod:`.protocol` (OpenAI's shapes and validation),
:mod:`.app` (the ASGI app), :mod:`.server` (uvicorn). Needs the ``serve`` extra (starlette, uvicorn); nothing
here is imported by the layers below.
"""
