"""The serving shell (SNG property 3's I/O): HTTP body in, server call, commit, release,
draw — around the pure core in ``serving``.

Every request in SERVING: validate (``proxy``) → tokenise with the whitelisted
tokenizer → tag + TRNG seed (``serving.ServingBoot``) → server → check the tag,
re-serialise from token ids → commit the pair durably (``commit.GroupCommit``) →
release → TRNG draw: keep with probability ε as a signed audit record, else delete the
pair. The draw happens after release, so the server cannot know which outputs will be
checked; draws are made in tag order (``ServingBoot.settle``).

The hot path makes no task per request: the release settles the tag at once and the
draw's commit ends the future the HTTP shell waits on through callbacks. A streamed
request with no release policy goes chunk by chunk instead (``streaming_shell``: each
chunk durable before it leaves); with a release policy it is served whole, at the
policy's fixed time, like any other.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from ivp.errors import BrickedError, IvpError, StateError, TransportError
from ivp.gateway import proxy
from ivp.gateway.commit import Write
from ivp.gateway.errors import BodyTooLargeError, ServerProtocolError
from ivp.gateway.serving import Link, ServingBoot
from ivp.gateway.shared import Reply
from ivp.gateway.streaming import client_stream, parse_server_stream
from ivp.gateway.streaming_shell import ServedStream
from ivp.protocol.messages import AuditRecord, Tag

if TYPE_CHECKING:
    from ivp.gateway.core import Gateway

Boot = ServingBoot[asyncio.Future[None]]  # the waiter of each seq: its draw's future


class Datapath:
    """Serves inference requests for one :class:`~ivp.gateway.core.Gateway`."""

    def __init__(self, gw: Gateway) -> None:
        self.gw = gw
        self._ok = {e: gw.metrics.requests.labels(e, "200")
                    for e in ("completions", "chat.completions")}  # hot path: no label lookup
        self._late_count, self._late_alarmed = 0, -1e9

    async def complete(self, endpoint: proxy.Endpoint, body: bytes,
                       head: Callable[[], Awaitable[None]] | None = None) -> Reply:
        """See :meth:`ivp.gateway.core.Gateway.complete`."""
        gw = self.gw
        t0 = time.monotonic()
        boot: Boot = gw._require_serving()
        if len(body) > gw.config.max_body:
            raise BodyTooLargeError(f"request body is over the {gw.config.max_body}-byte "
                                    "limit")
        request = proxy.parse_request(endpoint, body)
        boot.check_model(request)
        prompt_ids = proxy.tokenize(request, boot.tokenizer, boot.limits)
        tag = boot.next_tag()
        seq = tag.seq
        drawn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        committing: asyncio.Future[Link] | None = None
        cutting: asyncio.Future[Link | None] | None = None  # a stream cancelled mid-start
        try:
            seed = gw.device.random_u64()  # TRNG: the client never chooses it
            t_request = time.time()
            boot.open_tag(seq)
            if request.stream and gw.config.release is None:
                served: list[ServedStream] = []
                try:
                    return await self._stream(boot, request, prompt_ids, tag, seed,
                                              t_request, drawn, served, head)
                except BaseException:
                    boot.close_tag(seq)
                    if served and served[0].client.ids:
                        # cancelled while its first chunk was being logged: that chunk
                        # may be durable, so the pair ends cut and seq is settled with
                        # it (never as "no pair", which would let later tags be drawn
                        # before a pair chained under an earlier one)
                        cutting = served[0].cut_now()
                    raise
            try:
                budget = self._budget(prompt_ids, request)
                try:
                    out, t_server = await self._ask_server(boot, request, prompt_ids, tag,
                                                           seed, self._timeout(budget, t0))
                except TransportError:
                    if budget is not None and gw.config.release is not None and \
                            time.monotonic() - t0 >= gw.config.release.deadline(budget):
                        gw.metrics.late.labels("dropped").inc()
                        await self._late(tag, time.monotonic() - t0, budget, True)
                    raise
            finally:
                boot.close_tag(seq)
            if gw._boot is not boot:  # boot ended (power kill, shutdown) meanwhile
                gw._check_alive()
                raise StateError("the server was power-cycled during this request: output "
                                 "dropped")
            out, text = proxy.finish_output(out, request.stop, boot.tokenizer.decode)
            pair = boot.pair(tag, request, prompt_ids, out, text, seed, t_request, time.time())
            committing = gw.writer.append(boot.boot_id, pair)
            where = await asyncio.shield(committing)  # durable before release
            boot.committed()
            if request.stream:  # held by the release policy: the whole stream at once
                payload = client_stream(
                    request.endpoint, model_id=pair.model_id, tag=tag,
                    prompt_len=len(prompt_ids), token_ids=out.token_ids,
                    decode=boot.tokenizer.decode, finish_reason=out.finish_reason,
                    stops=request.stop, include_usage=request.include_usage)
                content_type = "text/event-stream"
            else:
                payload = proxy.client_response(
                    request.endpoint, model_id=pair.model_id, tag=tag,
                    prompt_len=len(prompt_ids), token_ids=out.token_ids, text=text,
                    finish_reason=out.finish_reason)
                content_type = "application/json"
            await self._release(t0, budget, tag)
        except BaseException:
            # no release will come: a committed pair gets its draw once its commit ends
            self._settle_unreleased(boot, seq, committing if cutting is None else cutting,
                                    drawn)
            raise
        gw.metrics.overhead_seconds.observe(max(0.0, time.monotonic() - t0 - t_server))
        self._ok[request.endpoint].inc()
        released = False

        def after_release() -> asyncio.Future[None]:
            # releases at once (no task per request); the future ends with the draw
            nonlocal released
            if not released:
                released = True
                self._settle(boot, seq, where, drawn)
            return drawn

        return Reply(payload, content_type, after_release=after_release)

    async def _ask_server(self, boot: Boot, request: proxy.ClientRequest,
                          prompt_ids: list[int], tag: Tag, seed: int,
                          timeout: float) -> tuple[proxy.ServerOutput, float]:
        gw = self.gw
        body = proxy.server_request(boot.manifest.model_id, prompt_ids, request.params, seed,
                                    tag, request.stream)
        t = time.monotonic()
        status, raw = await gw.upstream.post("/v1/completions", body, timeout=timeout)
        elapsed = time.monotonic() - t
        gw.metrics.server_seconds.observe(elapsed)
        try:
            if status != 200:
                raise ServerProtocolError(f"server answered HTTP {status}: {raw[:300]!r}")
            parse = parse_server_stream if request.stream else proxy.parse_server_response
            return parse(raw, tag, request.params, boot.limits), elapsed
        except ServerProtocolError:
            # Neither the client nor the alarm gets any of the answer (not even the parse
            # error, which quotes it): the alarm log is served by GET /alarms and the
            # alarm is uplinked, so server-chosen text there would be a channel out.
            what = "an HTTP 200 answer" if status == 200 else "an HTTP error answer"
            await gw.alarm("unpaired_output", f"{tag.boot_id}/{tag.seq}: {what} outside the "
                           "protocol (no open tag, or not token ids): dropped unread")
            raise ServerProtocolError(
                "the server's output was outside the protocol and was dropped; an alarm was "
                "raised") from None

    async def _stream(self, boot: Boot, request: proxy.ClientRequest, prompt_ids: list[int],
                      tag: Tag, seed: int, t_request: float, drawn: asyncio.Future[None],
                      served: list[ServedStream],
                      head: Callable[[], Awaitable[None]] | None) -> Reply:
        """A streamed request with no release policy (``streaming_shell``): the reply
        starts once the first tokens are durable (its head may leave before: ``head``);
        the rest follows chunk by chunk."""
        gw = self.gw
        body = proxy.server_request(boot.manifest.model_id, prompt_ids, request.params, seed,
                                    tag, True)
        answer = await gw.upstream.stream("/v1/completions", body,
                                          timeout=gw.config.server_timeout)
        gw.writer.expect(first=True)  # the log readies the first chunk's commit meanwhile
        try:
            status = await answer.status()
        except BaseException:
            answer.close()
            raise
        if status != 200:
            answer.close()
            await gw.alarm("unpaired_output", f"{tag.boot_id}/{tag.seq}: an HTTP error answer "
                           "outside the protocol (no open tag, or not token ids): dropped "
                           "unread")
            raise ServerProtocolError("the server's output was outside the protocol and was "
                                      "dropped; an alarm was raised")
        if head is not None and gw.config.release_grid <= 0:
            # the server said 200: the response head leaves while it generates (a break
            # before the first token is then told in-stream, not as an HTTP status)
            await head()
        stream = ServedStream(self, boot, request, prompt_ids, tag, seed, t_request, answer,
                              drawn)
        served.append(stream)
        try:
            first = await stream.start()
        except BaseException:
            answer.close()
            raise
        boot.committed()
        self._ok[request.endpoint].inc()
        return Reply(first, "text/event-stream", after_release=stream.close, chunks=stream)

    # --- release: the timing channel ----------------------------------------------------
    def _budget(self, prompt_ids: list[int], request: proxy.ClientRequest) -> float | None:
        policy = self.gw.config.release
        if policy is None:
            return None
        return policy.budget(len(prompt_ids), request.params.max_tokens)

    def _timeout(self, budget: float | None, t0: float) -> float:
        """How long the server may take: to the release policy's last point (a held
        request must not keep later draws undecided longer), else the server timeout."""
        limit = self.gw.config.server_timeout
        if budget is None or self.gw.config.release is None:
            return limit
        return max(0.001, min(limit, self.gw.config.release.deadline(budget)
                              - (time.monotonic() - t0)))

    async def _release(self, t0: float, budget: float | None, tag: Tag) -> None:
        """Wait until the response may leave (``release.ReleasePolicy``; else the fixed
        grid, else at once). A late one is counted and alarmed (``release_late``); one
        later than the policy's last point is dropped (the request fails)."""
        gw = self.gw
        policy = gw.config.release
        if policy is not None and budget is not None:
            ready = time.monotonic() - t0
            r = policy.release(budget, ready)
            if r.late_step:
                gw.metrics.late.labels("dropped" if r.dropped else str(r.late_step)).inc()
                await self._late(tag, ready, budget, r.dropped)
                if r.dropped:
                    raise ServerProtocolError(
                        "the server did not answer within its release budget; the "
                        "response was dropped and an alarm was raised")
            await asyncio.sleep(max(0.0, t0 + r.at - time.monotonic()))
            return
        grid = gw.config.release_grid
        if grid > 0:
            now = time.monotonic()
            await asyncio.sleep(grid - (now % grid))

    async def _late(self, tag: Tag, ready: float, budget: float, dropped: bool) -> None:
        """Alarm a late response, at most once per ten seconds (each one is counted in
        /metrics): a server late on purpose is signalling, one late by accident is slow."""
        now = time.monotonic()
        self._late_count += 1
        if now - self._late_alarmed < 10.0:
            return
        count, self._late_count, self._late_alarmed = self._late_count, 0, now
        await self.gw.alarm("release_late", f"{tag.boot_id}/{tag.seq}: ready after "
                            f"{ready:.3f} s, budget {budget:.3f} s"
                            f"{' (dropped)' if dropped else ''}; {count} late response(s) "
                            "since the last alarm")

    # --- settling and drawing -------------------------------------------------------------
    def _settle(self, boot: Boot, seq: int, where: Link | None,
                drawn: asyncio.Future[None]) -> None:
        """``seq``'s response was released, or never will be (``where``: its pair's link,
        None: no pair). Draws for every seq the core says is due, in tag order; each
        ``drawn`` ends once that seq's draw is committed and counted."""
        for link, done in boot.settle(seq, where, drawn):
            op = self.draw(link.boot_id, link.pos) if link is not None else None
            if op is None:
                if not done.done():
                    done.set_result(None)
            else:
                op.future.add_done_callback(functools.partial(self._draw_committed, op, done))

    def _settle_unreleased(self, boot: Boot, seq: int,
                           committing: asyncio.Future[Link] | asyncio.Future[Link | None]
                           | None,
                           drawn: asyncio.Future[None]) -> None:
        """The request failed or was cancelled: settle ``seq`` once its commit (if it was
        handed one) has ended; a committed pair still gets its draw."""
        if committing is None:
            self._settle(boot, seq, None, drawn)
            return

        def committed(fut: asyncio.Future[Any]) -> None:
            ok = not fut.cancelled() and fut.exception() is None
            self._settle(boot, seq, fut.result() if ok else None, drawn)

        committing.add_done_callback(committed)

    def _draw_committed(self, op: Write, drawn: asyncio.Future[None],
                        fut: asyncio.Future[Any]) -> None:
        """A queued draw's write ended: count it (the common case, with no task), or
        leave a refused or failed one to :meth:`drawn` (alarm, or re-raise)."""
        if fut.cancelled() or fut.exception() is not None:
            _chain(self.gw.spawn(self.drawn(op)), drawn)
            return
        self._count_draw(op, fut.result())
        if not drawn.done():
            drawn.set_result(None)

    def draw(self, boot_id: str, pos: int) -> Write | None:
        """The TRNG draw, after release: queue the decision (keep as an audit record with
        probability ε); None when the device is bricked."""
        gw = self.gw
        try:
            keep = gw.draws.keep(boot_id, gw.device.random_u64())
        except BrickedError:
            return None
        return gw.writer.decide(boot_id, pos, keep)

    async def drawn(self, op: Write | None) -> None:
        """Wait for a queued draw to be committed; count it, wake the uplink."""
        if op is None:
            return
        try:
            record = await op.future
        except BrickedError:
            return
        except IvpError as exc:  # a sealed row that does not open or chain: tampered disk
            await self.gw.alarm("log_corrupt", f"pair {op.boot_id}/{op.pos}: {exc}")
            return
        self._count_draw(op, record)

    def _count_draw(self, op: Write, record: AuditRecord | None) -> None:
        gw = self.gw
        gw.metrics.draws.inc()  # kept or not: /metrics says nothing of the decision
        if record is not None:
            if gw._boot is not None and gw._boot.boot_id == op.boot_id:
                gw._boot.counted(record)
            gw._wake_uplink()


def _chain(source: asyncio.Future[Any], target: asyncio.Future[None]) -> None:
    """End ``target`` as ``source`` ends (result dropped)."""
    def copy(fut: asyncio.Future[Any]) -> None:
        if target.done():
            return
        if fut.cancelled():
            target.cancel()
        elif fut.exception() is not None:
            target.set_exception(fut.exception())  # type: ignore[arg-type]
        else:
            target.set_result(None)
    source.add_done_callback(copy)


__all__ = ["Datapath"]
