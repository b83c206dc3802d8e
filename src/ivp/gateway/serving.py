"""SERVING's pure core (SNG property 3): tags, pair records, chain links, the draw for
each settled tag in tag order, audit records and checkpoints. No asyncio, no sockets,
no SQLite, no clock: values in, values (or an error) out.

What each piece decides, and the attack or fault its check blocks:

* :class:`ServingBoot` — one boot as SERVING knows it (volatile: gone on restart).
  :meth:`~ServingBoot.check_model` refuses a request for another model than the one
  booted; :meth:`~ServingBoot.open_tag` hands out the tags ``(gateway_id, boot_id,
  seq)``, seq counting up from 0; :meth:`~ServingBoot.pair` is the pair record the log
  keeps; :meth:`~ServingBoot.settle` is the **reorder buffer**: a seq is settled once
  its response was released or never will be, and draws are due for settled seqs in
  tag order only, so audit records hold pairs in increasing tag seq (the recomputer
  refuses a record whose pair comes before the previous record's) even when answers
  overtake each other. Settling a seq twice, or one never handed out, is a misuse
  (``StateError``) and changes nothing.
* :class:`Draws` — the keep/delete decision of each TRNG draw: kept with the
  probability ε its boot's BOOT record declared (so the recomputer's audit-rate test
  uses the ε a boot really sampled with, also for draws made after a restart).
* :func:`link_pairs`, :func:`open_link`, :func:`audit_record`, :func:`checkpoint` —
  the hash chain over a boot's pairs (``protocol.chain``) and the signed records that
  carry its heads; the durable log (``log.PairLog``) reads the stored head, calls
  these and writes what they return, so what is chained is decided here and nowhere
  else.

The shell around this core (``datapath``) does the waiting: the server call, the
group commit (``commit``), the release, the TRNG. A streamed answer
(``streaming_shell``) fits the same shape: its tag stays open while its chunks are
committed and released, and it is settled once, when its last chunk was released (or
the client left), so later tags' draws wait for it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Generic, TypeVar

from ivp.errors import ChainError, StateError
from ivp.gateway.errors import UnknownModelError
from ivp.gateway.proxy import ClientRequest, ModelLimits, ServerOutput, Tokenizer
from ivp.protocol.chain import genesis, link_bytes
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.messages import (
    AuditRecord,
    BootClose,
    BootRecord,
    Checkpoint,
    Manifest,
    PairRecord,
    Tag,
    manifest_digest,
)

W = TypeVar("W")


@dataclass(frozen=True)
class Link:
    """Where a pair sits in its boot's chain."""

    boot_id: str
    pos: int  # 1-based chain position
    prev: str
    head: str


def threshold(epsilon: float) -> int:
    """TRNG draws (u64) below this are kept: probability ``epsilon``."""
    return min(int(epsilon * 2**64), 2**64)


class Draws:
    """The sampling decision of every draw: a u64 from the TRNG below the threshold of
    the ε its boot declared is kept as an audit record, any other is deleted.

    Args:
        epsilon: the ε of a boot that declared none (a log older than declared ε).
    """

    def __init__(self, epsilon: float) -> None:
        self.default = threshold(epsilon)
        self.thresholds: dict[str, int] = {}  # boot_id -> from the ε its BOOT declared

    def declare(self, boot_id: str, epsilon: float) -> None:
        """``boot_id``'s BOOT record declared ``epsilon``: its draws use it."""
        self.thresholds[boot_id] = threshold(epsilon)

    def recovered(self, boot_id: str, epsilon: float) -> None:
        """As :meth:`declare`, for a boot read back from the log (a declared one wins)."""
        self.thresholds.setdefault(boot_id, threshold(epsilon))

    def keep(self, boot_id: str, word: int) -> bool:
        """Whether the draw ``word`` (a TRNG u64) keeps a pair of ``boot_id``."""
        return word < self.thresholds.get(boot_id, self.default)


@dataclass
class ServingBoot(Generic[W]):
    """What SERVING knows about the current boot (volatile: gone on restart).

    ``W`` is whatever the shell wants back with a due draw (the datapath: the future
    its response's ``after_release`` returns); the core only carries it.
    """

    gateway_id: str
    boot_id: str
    manifest: Manifest
    tokenizer: Tokenizer
    limits: ModelLimits
    started: float
    epsilon: float = 1.0  # the ε its BOOT record declared: every draw of this boot uses it
    next_seq: int = 0
    pairs: int = 0
    audits: int = 0
    open_tags: set[int] = field(default_factory=set)
    # settled seqs from next_draw up, each with its pair's link (None: no pair)
    next_draw: int = 0
    settled: dict[int, tuple[Link | None, W]] = field(default_factory=dict)
    # streams the end of this boot chained as they stood (log.PairLog.end_boot), by seq
    chained: dict[int, Link] = field(default_factory=dict)

    @property
    def model_id(self) -> str:
        return self.manifest.model_id

    @property
    def unsettled(self) -> int:
        """Seqs handed out whose response is neither released nor abandoned yet."""
        return self.next_seq - self.next_draw - len(self.settled)

    def check_model(self, request: ClientRequest) -> None:
        """Raises UnknownModelError: ``request`` names another model than the one booted
        (no tag is used)."""
        if request.model != self.manifest.model_id:
            raise UnknownModelError(
                f"this gateway serves only {self.manifest.model_id!r}, not {request.model!r}")

    def next_tag(self) -> Tag:
        """Hand out the next tag (seq counts up from 0, never reused within the boot)."""
        seq = self.next_seq
        self.next_seq = seq + 1
        return Tag(gateway_id=self.gateway_id, boot_id=self.boot_id, seq=seq)

    def open_tag(self, seq: int) -> None:
        """The request under ``seq`` went to the server: its answer may come."""
        self.open_tags.add(seq)

    def close_tag(self, seq: int) -> None:
        """The server's answer under ``seq`` came (or never will)."""
        self.open_tags.discard(seq)

    def pair(self, tag: Tag, request: ClientRequest, prompt_ids: list[int],
             out: ServerOutput, text: str, seed: int, t_request: float,
             t_response: float) -> PairRecord:
        """The pair record of one answered request (what the log chains and keeps)."""
        return PairRecord(
            tag=tag, model_id=self.manifest.model_id, endpoint=request.endpoint,
            input=request.input_text, prompt_token_ids=prompt_ids,
            output_token_ids=out.token_ids, output_text=text,
            finish_reason=out.finish_reason,  # type: ignore[arg-type]
            seed=seed, params=request.params, t_request=t_request, t_response=t_response,
            stop=list(request.stop),
        )

    def committed(self) -> None:
        """A pair of this boot is durable in the log (its response may be released)."""
        self.pairs += 1

    def settle(self, seq: int, where: Link | None, waiter: W) -> list[tuple[Link | None, W]]:
        """``seq``'s response was released, or never will be (``where``: its pair's
        link, None: no pair). Returns the draws now due, in tag order: every settled
        seq from ``next_draw`` on, each with its waiter.

        Raises:
            StateError: ``seq`` was never handed out or is settled already (a misuse:
                the shell settles each seq exactly once); nothing changes.
        """
        if not self.next_draw <= seq < self.next_seq or seq in self.settled:
            raise StateError(f"tag seq {seq} of boot {self.boot_id} is not waiting to be "
                             "settled")
        self.settled[seq] = (where, waiter)
        due: list[tuple[Link | None, W]] = []
        while self.next_draw in self.settled:
            due.append(self.settled.pop(self.next_draw))
            self.next_draw += 1
        return due

    def counted(self, record: AuditRecord) -> None:
        """An audit record of this boot was committed (its number is the boot's count)."""
        self.audits = record.audit_seq


# --- the chain and the records that carry it -----------------------------------------
def link_pairs(boot_id: str, head: str, count: int,
               pairs: list[PairRecord]) -> list[tuple[bytes, Link]]:
    """Chain ``pairs`` (in order) after a boot's ``head`` at position ``count``: each
    pair's canonical bytes (what is both chained and stored) and its link.

    Raises:
        StateError: a pair tagged for another boot (nothing is chained).
    """
    out = []
    for pair in pairs:
        if pair.tag.boot_id != boot_id:
            raise StateError("pair tagged for another boot")
        data = canonical(pair)
        prev, head, count = head, link_bytes(head, data), count + 1
        out.append((data, Link(boot_id, count, prev, head)))
    return out


def open_link(boot_id: str, pos: int, prev: str, head: str, raw: bytes) -> Link:
    """The link of a stored pair, checked against the pair's bytes.

    Raises:
        ChainError: the bytes do not hash to the recorded link (a pair altered on disk,
            or moved from another place in the chain).
    """
    if link_bytes(prev, raw) != head:
        raise ChainError(f"pair {boot_id}/{pos} does not match its chain link")
    return Link(boot_id, pos, prev, head)


def audit_record(gateway_id: str, where: Link, raw: bytes, audit_seq: int) -> AuditRecord:
    """Audit record ``audit_seq`` of a kept pair: the pair with the chain heads around it.

    Raises:
        ValidationError: the stored bytes are not a pair record.
        ChainError: the pair does not re-encode to its bytes (the recomputer re-links
            the decoded pair, so such a record could never check).
    """
    pair = decode(raw, PairRecord)
    if canonical(pair) != raw:
        raise ChainError(f"pair {where.boot_id}/{where.pos} does not re-encode to its bytes")
    return AuditRecord(gateway_id=gateway_id, boot_id=where.boot_id, audit_seq=audit_seq,
                       chain_prev=where.prev, chain_head=where.head, pair=pair,
                       chain_pos=where.pos)


def checkpoint(gateway_id: str, boot_id: str, pairs: int, head: str, audits: int,
               now: float, counter: int = 0, undecided: int = 0) -> Checkpoint:
    """A checkpoint of one boot's counters: pairs served, their chain head, audits made,
    the pairs whose draw is still pending, and the device counter of its commit."""
    return Checkpoint(gateway_id=gateway_id, boot_id=boot_id, pairs_served=pairs,
                      chain_head=head, audits=audits, time=now, counter=counter,
                      undecided=undecided)


def boot_record(gateway_id: str, boot_id: str, manifest: Manifest, epsilon: float,
                now: float, url: str, counter: int = 0,
                previous: BootClose | None = None) -> tuple[BootRecord, str]:
    """The BOOT record that opens a boot (it declares the boot's ε, states the device
    counter of its commit and names the previous boot's closing state) and the chain's
    genesis head."""
    record = BootRecord(gateway_id=gateway_id, boot_id=boot_id, model_id=manifest.model_id,
                        manifest_digest=manifest_digest(manifest), epsilon=epsilon,
                        time=now, url=url, counter=counter, previous=previous)
    return record, genesis(gateway_id, boot_id)


__all__ = ["Draws", "Link", "ServingBoot", "audit_record", "boot_record", "checkpoint",
           "link_pairs", "open_link", "threshold"]
