"""A streamed request's I/O (SNG property 3 for ``"stream": true``): tokens leave as
the server makes them, each chunk durable before its bytes leave — around the pure
parts in ``streaming``.

With no release policy, a streamed request's server answer is read as it arrives
(``upstream.StreamAnswer``). Whatever arrived while the previous commit ran is the
next chunk: parsed (``streaming.ServerStream``), re-serialised from its token ids
(``streaming.ClientStream``), its tokens and text committed to the log in the group
commit every open stream and plain pair share (``commit.GroupCommit.progress``: a row
of its own, so a chunk's commit costs the same at the stream's start and its end), and
only then released. The end commits the whole pair into the hash chain (an ordinary
``append``, so the chain, the audit record and the recomputer's check are those of a
plain pair) before the finish event leaves; the tag is then settled and drawn like a
plain pair's, after release.

A stream that breaks ends as a pair with finish reason "cut" holding every token that
was made durable (all that was released, and maybe a chunk more): the client leaving,
the server dying, timing out or stepping outside the protocol (alarmed). If the power
goes, the last durable chunk is in the log and the next start chains it as cut
(``log.PairLog.cut_streams``); the end of a boot (power loss, reboot, shutdown) chains
its open streams the same way, in the commit that closes it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from typing import TYPE_CHECKING

from ivp.errors import IvpError, StateError, TransportError
from ivp.gateway import proxy
from ivp.gateway.errors import ServerProtocolError
from ivp.gateway.serving import Link
from ivp.gateway.streaming import ChunkWrite, ClientStream, ServerStream, StreamChunk
from ivp.gateway.upstream import StreamAnswer
from ivp.protocol.messages import PairRecord, Tag

if TYPE_CHECKING:
    from ivp.gateway.datapath import Boot, Datapath


class ServedStream:
    """One streamed request from its server call to its settled draw.

    Iterate it for the bytes to release (each piece is durable); ``close`` once the
    client got them all or left: it ends the stream (cut if it was still coming) and
    settles the tag; its future ends with the draw.
    """

    def __init__(self, dp: Datapath, boot: Boot, request: proxy.ClientRequest,
                 prompt_ids: list[int], tag: Tag, seed: int, t_request: float,
                 answer: StreamAnswer, drawn: asyncio.Future[None]) -> None:
        self.dp, self.gw = dp, dp.gw
        self.boot, self.request, self.prompt_ids = boot, request, prompt_ids
        self.tag, self.seed, self.t_request = tag, seed, t_request
        self.answer, self.drawn = answer, drawn
        self.server = ServerStream(tag, request.params, boot.limits)
        self.client = ClientStream(request.endpoint, model_id=boot.model_id, tag=tag,
                                   prompt_len=len(prompt_ids), decode=boot.tokenizer.decode,
                                   stops=request.stop, include_usage=request.include_usage)
        self._ready: list[bytes] = []  # durable, not released yet
        self._chunks = 0  # chunks sent to the log
        self._final: asyncio.Future[Link] | None = None  # the whole pair's append
        self._ended = False  # the end is queued: no more reads
        self._tail = b""  # the last events, released once the whole pair is durable
        self._error: IvpError | None = None  # why the stream broke (None: it did not)
        self._closing: asyncio.Future[None] | None = None

    # --- reading, committing, releasing -------------------------------------------------
    async def start(self) -> bytes:
        """The first bytes to release, once the first tokens are durable.

        Raises:
            ServerProtocolError, TransportError, StateError: the stream broke before any
                token (no pair is logged; the caller settles the tag).
        """
        while not self._ready and not self._ended:
            await self._step()
        await self._flush_end()
        if self._error is not None and not self.client.ids:
            raise self._error
        await self._on_grid()
        return self.client.begin() + self._take()

    def __aiter__(self) -> ServedStream:
        return self

    async def __anext__(self) -> bytes:
        while not self._ready:
            if self._ended:
                await self._flush_end()
                if not self._ready:
                    raise StopAsyncIteration
                break
            await self._step()
        await self._on_grid()
        return self._take()

    async def _on_grid(self) -> None:
        """With a release grid, durable chunks leave on its ticks only."""
        grid = self.gw.config.release_grid
        if grid > 0:
            await asyncio.sleep(grid - (time.monotonic() % grid))

    def _take(self) -> bytes:
        out, self._ready = b"".join(self._ready), []
        return out

    async def _step(self) -> None:
        """The next chunk: read all that arrived, commit it, queue its bytes — or end."""
        try:
            data = await self.answer.read()
            ids = self.server.feed(data) if data else []
            finish = self.server.end().finish_reason if not data else None
        except ServerProtocolError:
            await self._refuse()
            return
        except TransportError as exc:
            await self.gw.alarm("stream_cut", f"{self.tag.boot_id}/{self.tag.seq}: the "
                                f"server's stream broke after {len(self.client.ids)} tokens "
                                f"({exc}): logged cut")
            self._end("cut", TransportError("the server's stream broke; the tokens sent "
                                            "are logged as a cut pair"))
            return
        events, _kept = self.client.push(ids)
        if self.client.stopped:  # the client's stop string: the output ends here
            self._end("stop", events=events)
        elif finish is not None:
            self._end(finish, events=events)
        elif events:
            try:
                await asyncio.shield(self.gw.writer.progress(self.boot.boot_id,
                                                             self._chunk(ids)))
            except IvpError as exc:  # the boot ended (power loss, shutdown) or the disk
                self._end("cut", StateError(f"the stream could not be logged ({exc}): it "
                                            "ends here") if not isinstance(exc, StateError)
                          else exc, durable=len(self.client.ids) - len(ids))
            else:
                self.gw.writer.expect()  # the next chunk, or the end, needs a commit too
                self._ready.append(events)
        if self.server.refused is not None:  # a bad line after these tokens, in this read
            await self._refuse()

    async def _refuse(self) -> None:
        """The server stepped outside the protocol: alarmed, and the stream ends cut
        here (a no-op end if it already ended). Nothing of the offending bytes reaches
        the client or the alarm."""
        await self.gw.alarm("unpaired_output", f"{self.tag.boot_id}/{self.tag.seq}: a "
                            "streamed answer stepped outside the protocol after "
                            f"{len(self.client.ids)} tokens: dropped unread, logged cut")
        self._end("cut", ServerProtocolError(
            "the server's output was outside the protocol and was dropped; an alarm "
            "was raised"))

    def _chunk(self, ids: list[int]) -> ChunkWrite:
        """The log row of this chunk: only its tokens and text (the bytes and the work
        of a chunk's commit do not grow with the stream); the first also carries the
        pair without output, which the stream's cut pair is built on."""
        text, tail = self.client.logged_text()
        now = time.time()
        head = None if self._chunks else self.boot.pair(
            self.tag, self.request, self.prompt_ids, proxy.ServerOutput([], "cut"), "",
            self.seed, self.t_request, now)
        self._chunks += 1  # taken now: an index is never offered twice, even if cancelled
        return ChunkWrite(self.tag.seq, self._chunks - 1,
                          StreamChunk(list(ids), text, tail, now), head)

    def _pair(self, finish: str, count: int | None = None) -> PairRecord:
        ids = self.client.ids if count is None else self.client.ids[:count]
        text = self.client.output_text(finish) if count is None else \
            self.boot.tokenizer.decode(ids)
        return self.boot.pair(self.tag, self.request, self.prompt_ids,
                              proxy.ServerOutput(list(ids), finish), text, self.seed,
                              self.t_request, time.time())

    def _end(self, finish: str, error: IvpError | None = None, *, events: bytes = b"",
             durable: int | None = None) -> None:
        """Queue the end: the whole pair's append (None: no token, no pair) and the last
        events. ``durable``: only this many tokens were committed (a refused chunk: the
        rest is neither logged nor released)."""
        if self._ended:
            return
        self._ended = True
        self._error = error
        self.answer.close()  # the server stops generating: nobody reads it any more
        self.boot.close_tag(self.tag.seq)
        whole = durable is None or durable == len(self.client.ids)
        if whole and self.client.ids:
            self._final = self.gw.writer.append(self.boot.boot_id, self._pair(finish),
                                                stream=True)
        elif durable:  # only what was committed: the refused chunk is not logged
            self._final = self.gw.writer.append(self.boot.boot_id,
                                                self._pair("cut", durable), stream=True)
        note = None if error is None else str(error)
        self._tail = events + self.client.end(finish if error is None else "cut", note)

    async def _flush_end(self) -> None:
        """Once the end is queued: release its events after the whole pair is durable."""
        if not self._ended or not self._tail:
            return
        await self._where()
        self._ready.append(self._tail)
        self._tail = b""

    async def _where(self) -> Link | None:
        """The whole pair's link once durable (None: no pair). A boot that ended first
        chained the stream as it stood at its last durable chunk: that link."""
        if self._final is None:
            return self.boot.chained.get(self.tag.seq)
        try:
            return await asyncio.shield(self._final)
        except StateError:
            return self.boot.chained.get(self.tag.seq)

    # --- the end ------------------------------------------------------------------------
    def cut_now(self) -> asyncio.Future[Link | None]:
        """The request was cancelled before its first bytes left: end the stream cut
        (its tokens may already be durable); the future gives the pair's link (None: no
        pair). The caller settles the tag with it; ``close`` is not called."""
        self._end("cut")
        return asyncio.ensure_future(self._where())

    def close(self) -> asyncio.Future[None]:
        """The client has what it will get (all, or it left): end the stream (cut if it
        was still coming), settle the tag once its pair is durable. The future ends
        with the sampling draw."""
        if self._closing is None:
            self._closing = self.gw.spawn(self._close())
        return self.drawn

    async def _close(self) -> None:
        self._end("cut")  # a no-op when the stream already ended
        where = None
        with contextlib.suppress(IvpError):
            where = await self._where()
        self.dp._settle(self.boot, self.tag.seq, where, self.drawn)


__all__ = ["ServedStream"]
