"""One asyncio event loop on a daemon thread, for running user coroutines (async reward functions, async tools) from
synchronous trainer code, whether or not the caller is itself inside a running loop."""

from __future__ import annotations

import asyncio
import threading

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            _loop = asyncio.new_event_loop()
            threading.Thread(target=_loop.run_forever, daemon=True, name="llm-trainer-async").start()
    return _loop
