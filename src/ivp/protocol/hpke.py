"""Encrypted streams to a device: HPKE (RFC 9180) base mode, in frames.

The note asks for asymmetric encryption on the input path: the weights travel
encrypted to the gateway's device key and only the gateway decrypts (and then hashes)
them. The suite is DHKEM(X25519, HKDF-SHA256), HKDF-SHA256, AES-128-GCM, from
``pyhpke`` (never hand-made crypto). A device's KEM key is derived from its secrets
(:func:`device_kem_key`: ``derive_key("kem/x25519/v1")``, so with ``--device tpm`` it
exists only while that TPM answers); its public half travels beside the signing key.

Wire form of a stream: ``MAGIC`` (8 bytes) || ``enc`` (32 bytes, the sender's
ephemeral key) || frames, each a 4-byte big-endian word (the ciphertext's length; its
top bit marks the last frame) and one HPKE ciphertext of at most ``FRAME`` plaintext
bytes. The context's sequence numbers make every frame's nonce unique and bind the
order; the last frame is sealed with ``AAD_LAST`` (flipping the mark makes it fail to
open), so a cut stream is refused rather than read as shorter. ``info`` binds the stream to its use.

Single messages (:func:`seal_message`) use the same suite, single shot: the gateway
seals each uplink body (its signed audit records carry prompts and outputs) to the
recomputer's KEM key, so the operator's network sees only sizes and timing.
"""

from __future__ import annotations

import struct
from collections.abc import AsyncIterator, Iterable, Iterator
from typing import Any

from ivp.errors import ValidationError

MAGIC = b"IVPHPKE1"
ENC_SIZE = 32
FRAME = 1 << 20  # plaintext bytes per frame
TAG = 16
AAD_MORE, AAD_LAST = b"ivp/frame", b"ivp/frame/last"


def _suite() -> Any:
    from pyhpke import AEADId, CipherSuite, KDFId, KEMId

    return CipherSuite.new(KEMId.DHKEM_X25519_HKDF_SHA256, KDFId.HKDF_SHA256,
                           AEADId.AES128_GCM)


#: the uplink body sealed to the recomputer (``seal_message``), and its ``info``
SEALED_MAGIC = b"IVPSEAL1"
SEALED_UPLINK = "application/vnd.ivp.sealed-uplink"
UPLINK_INFO = b"ivp/uplink/v1"


def upload_info(model_id: str) -> bytes:
    """``info`` of a weight upload: the stream opens only as an upload of that model."""
    return b"ivp/upload/v1/" + model_id.encode()


def device_kem_key(device: Any) -> Any:
    """The device's X25519 KEM key pair (pyhpke), derived from its secrets."""
    return _suite().kem.derive_key_pair(device.derive_key("kem/x25519/v1"))


def kem_public_hex(device: Any) -> str:
    return bytes(device_kem_key(device).public_key.to_public_bytes()).hex()


def seal_message(recipient_public: bytes, info: bytes, plaintext: bytes) -> bytes:
    """One message sealed to ``recipient_public`` (HPKE base mode, single shot):
    ``SEALED_MAGIC`` || ``enc`` (32 bytes) || ciphertext (the plaintext + 16-byte tag).

    Raises:
        ValidationError: not a 32-byte X25519 public key.
    """
    suite = _suite()
    try:
        key = suite.kem.deserialize_public_key(recipient_public)
    except Exception:  # pyhpke raises its own errors for a bad key
        raise ValidationError("not an X25519 public key (32 bytes)") from None
    enc, ctx = suite.create_sender_context(key, info)
    return SEALED_MAGIC + bytes(enc) + bytes(ctx.seal(plaintext, b""))


def open_message(key_pair: Any, info: bytes, data: bytes) -> bytes:
    """The plaintext of :func:`seal_message`'s output.

    Raises:
        ValidationError: not a sealed ivp message, or it does not open (altered, sealed
            to another key or for another ``info``).
    """
    head = len(SEALED_MAGIC) + ENC_SIZE
    if len(data) < head + TAG or not data.startswith(SEALED_MAGIC):
        raise ValidationError("not a sealed ivp message (IVPSEAL1 || enc || ciphertext)")
    suite = _suite()
    try:
        ctx = suite.create_recipient_context(data[len(SEALED_MAGIC):head],
                                             key_pair.private_key, info)
        return bytes(ctx.open(data[head:], b""))
    except Exception:  # pyhpke's OpenError or a bad encapsulated key
        raise ValidationError("sealed message does not open (altered, or not sealed to "
                              "this device for this use)") from None


class StreamSealer:
    """Incremental encryption to the X25519 key ``recipient_public``: :attr:`header`
    first, then what :meth:`push` and :meth:`close` return.

    Raises:
        ValidationError: not a 32-byte X25519 public key.
    """

    def __init__(self, recipient_public: bytes, info: bytes) -> None:
        suite = _suite()
        try:
            key = suite.kem.deserialize_public_key(recipient_public)
        except Exception:  # pyhpke raises its own errors for a bad key
            raise ValidationError("not an X25519 public key (32 bytes)") from None
        enc, self._ctx = suite.create_sender_context(key, info)
        self.header = MAGIC + bytes(enc)
        self._pending = bytearray()

    def push(self, chunk: bytes) -> list[bytes]:
        """Frames for every full ``FRAME`` of plaintext so far (one copy per frame)."""
        out: list[bytes] = []
        view = memoryview(chunk)
        if self._pending:
            take = FRAME - len(self._pending)
            self._pending += view[:take]
            view = view[take:]
            if len(self._pending) < FRAME:
                return out
            out.append(_frame(self._ctx.seal(bytes(self._pending), AAD_MORE), False))
            self._pending = bytearray()
        while len(view) >= FRAME:
            out.append(_frame(self._ctx.seal(bytes(view[:FRAME]), AAD_MORE), False))
            view = view[FRAME:]
        self._pending += view
        return out

    def close(self) -> bytes:
        """The last frame: whatever plaintext is left, maybe none."""
        last = _frame(self._ctx.seal(bytes(self._pending), AAD_LAST), True)
        self._pending = bytearray()
        return last


def seal_stream(chunks: Iterable[bytes], recipient_public: bytes, info: bytes
                ) -> Iterator[bytes]:
    """The encrypted stream of ``chunks`` (any sizes), all at once."""
    sealer = StreamSealer(recipient_public, info)
    yield sealer.header
    for chunk in chunks:
        yield from sealer.push(chunk)
    yield sealer.close()


_LAST_BIT = 1 << 31


def _frame(ciphertext: bytes, last: bool) -> bytes:
    return struct.pack(">I", len(ciphertext) | (_LAST_BIT if last else 0)) + ciphertext


class StreamOpener:
    """Incremental decryption of :func:`seal_stream`'s output: bytes in, plaintext out.

    Pure (no I/O); every malformed or altered input raises
    :class:`~ivp.errors.ValidationError` naming what is wrong.
    """

    def __init__(self, key_pair: Any, info: bytes) -> None:
        self._suite, self._key, self._info = _suite(), key_pair, info
        self._ctx: Any = None
        self._buf = bytearray()
        self.done = False

    def feed(self, data: bytes) -> list[bytes]:
        """Raises ValidationError: not an ivp HPKE stream, a frame too long, a frame
        that does not open (altered, reordered, another key or another ``info``), or
        bytes after the last frame."""
        if self.done and data:
            raise ValidationError("encrypted upload: bytes after the last frame")
        self._buf += data
        out: list[bytes] = []
        if self._ctx is None:
            if len(self._buf) < len(MAGIC) + ENC_SIZE:
                return out
            if not self._buf.startswith(MAGIC):
                raise ValidationError("encrypted upload: not an ivp HPKE stream")
            enc = bytes(self._buf[len(MAGIC):len(MAGIC) + ENC_SIZE])
            try:
                self._ctx = self._suite.create_recipient_context(
                    enc, self._key.private_key, self._info)
            except Exception:
                raise ValidationError("encrypted upload: bad encapsulated key") from None
            del self._buf[:len(MAGIC) + ENC_SIZE]
        while len(self._buf) >= 4 and not self.done:
            (word,) = struct.unpack(">I", self._buf[:4])
            last, size = bool(word & _LAST_BIT), word & ~_LAST_BIT
            if size > FRAME + TAG or size < TAG:
                raise ValidationError(f"encrypted upload: frame of {size} bytes")
            if len(self._buf) < 4 + size:
                break
            ciphertext = bytes(memoryview(self._buf)[4:4 + size])
            del self._buf[:4 + size]
            out.append(self._open(ciphertext, last))
        if self.done and self._buf:
            raise ValidationError("encrypted upload: bytes after the last frame")
        return out

    def _open(self, ciphertext: bytes, last: bool) -> bytes:
        try:
            plaintext = bytes(self._ctx.open(ciphertext, AAD_LAST if last else AAD_MORE))
        except Exception:  # pyhpke's OpenError, or a context spent by an earlier failure
            raise ValidationError("encrypted upload: a frame does not open (altered, "
                                  "reordered, or not sealed to this device for this "
                                  "model)") from None
        self.done = last
        return plaintext

    def finish(self) -> None:
        """Raises ValidationError: the stream ended before its last frame (cut)."""
        if not self.done:
            raise ValidationError("encrypted upload: the stream ended before its last "
                                  "frame (cut short)")


async def open_stream(chunks: AsyncIterator[bytes], key_pair: Any, info: bytes
                      ) -> AsyncIterator[bytes]:
    """The plaintext of an encrypted upload, as it arrives."""
    opener = StreamOpener(key_pair, info)
    async for chunk in chunks:
        for plaintext in opener.feed(chunk):
            if plaintext:
                yield plaintext
    opener.finish()


__all__ = ["FRAME", "MAGIC", "SEALED_MAGIC", "SEALED_UPLINK", "UPLINK_INFO", "StreamOpener",
           "StreamSealer", "device_kem_key", "kem_public_hex", "open_message", "open_stream",
           "seal_message", "seal_stream", "upload_info"]
