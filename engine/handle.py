"""A request's output stream, readable from threads or from asyncio."""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import AsyncIterator, Iterator

from meshserve.engine.outputs import StreamChunk


class RequestHandle:
    """Chunks arrive from the engine thread; read them by iterating (blocking) or with
    `async for chunk in handle.stream()`. Iteration ends after the finished chunk."""

    def __init__(self, request_id: str, engine):
        self.request_id = request_id
        self._engine = engine
        self._lock = threading.Lock()
        self._queue: queue.SimpleQueue[StreamChunk] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._async_queue: asyncio.Queue[StreamChunk] | None = None
        self._closed = False

    def put(self, chunk: StreamChunk) -> None:
        """Called by the engine (any chunk after the finished one is dropped: a stream a
        failure ended from another thread stays ended)."""
        with self._lock:
            if self._closed:
                return
            self._closed = chunk.finished
            if self._loop is None:
                self._queue.put(chunk)
                return
            loop, aq = self._loop, self._async_queue
        try:
            loop.call_soon_threadsafe(aq.put_nowait, chunk)
        except RuntimeError:
            pass  # the reader's event loop is closed: nobody is listening any more

    def __iter__(self) -> Iterator[StreamChunk]:
        while True:
            chunk = self._queue.get()
            yield chunk
            if chunk.finished:
                return

    async def stream(self) -> AsyncIterator[StreamChunk]:
        with self._lock:
            self._loop = asyncio.get_running_loop()
            self._async_queue = asyncio.Queue()
            while True:
                try:
                    self._async_queue.put_nowait(self._queue.get_nowait())
                except queue.Empty:
                    break
        while True:
            chunk = await self._async_queue.get()
            yield chunk
            if chunk.finished:
                return

    def cancel(self) -> None:
        self._engine.abort(self.request_id)
