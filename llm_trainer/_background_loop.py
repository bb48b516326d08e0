"""Asyncio event loops on daemon threads, for running user coroutines (async reward functions, async tools) from
synchronous trainer code, whether or not the caller is itself inside a running loop.

`start_event_loop_in_daemon` / `shutdown_event_loop_in_daemon` are TRL's helpers of the same names (re-exported by
`llm_trainer.trainer.utils`); `background_loop` is the one shared loop the library runs coroutines on.
"""

from __future__ import annotations

import asyncio
import threading

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def start_event_loop_in_daemon(
    name: str | None = None,
) -> tuple[threading.Thread, asyncio.AbstractEventLoop, threading.Event]:
    """Run a new event loop forever on a new daemon thread (named `name`).

    Returns `(thread, loop, ready)`; `ready` is set once the loop is the thread's current loop, so callers that need
    it running can `ready.wait()` before scheduling work with `asyncio.run_coroutine_threadsafe`.
    """
    loop = asyncio.new_event_loop()
    ready = threading.Event()

    def serve() -> None:
        asyncio.set_event_loop(loop)
        ready.set()
        loop.run_forever()

    thread = threading.Thread(target=serve, name=name, daemon=True)
    thread.start()
    return thread, loop, ready


def shutdown_event_loop_in_daemon(thread: threading.Thread | None, loop: asyncio.AbstractEventLoop | None) -> None:
    """Stop `loop` from any thread and wait (at most 5 s) for `thread` to end; a no-op when either is None."""
    if thread is None or loop is None:
        return
    loop.call_soon_threadsafe(loop.stop)
    thread.join(timeout=5)


def background_loop() -> asyncio.AbstractEventLoop:
    """The shared loop, started on first use."""
    global _loop
    with _lock:
        if _loop is None:
            _, _loop, _ = start_event_loop_in_daemon(name="llm-trainer-async")
    return _loop
