"""Secure hardware behind one interface: the UID, TRNG, sealed storage, tamper = brick.

The note's gateway and recomputer are built around a hardware UID that the
manufacturer never learns, a TRNG, and a tamper mesh that destroys the UID. Here one
small interface, :class:`Device`, stands for that hardware. :class:`SoftDevice` fills it
in software (HKDF from a UID secret *kept in a file*, the OS CSPRNG, AES-GCM sealing):
the development default. ``TpmDevice`` (:mod:`ivp.device.tpm`) fills it with a TPM 2.0:
the keys are made inside the TPM and never leave it.
"""

from __future__ import annotations

from pathlib import Path

from ivp.device.soft import Device, SoftDevice
from ivp.errors import MisuseError

#: What ``--device`` accepts.
KINDS = ("soft", "tpm")


def open_device(kind: str, state_dir: Path, tcti: str | None = None) -> Device:
    """The device of ``kind`` whose (non-secret, for a TPM) state is in ``state_dir``.

    Raises:
        MisuseError: unknown kind, or a TPM device without its Python bindings.
        TransportError: the TPM named by ``tcti`` does not answer.
    """
    if kind == "soft":
        return SoftDevice(state_dir)
    if kind == "tpm":
        from ivp.device.tpm import DEFAULT_TCTI, TpmDevice

        return TpmDevice(state_dir, tcti or DEFAULT_TCTI)
    raise MisuseError(f"unknown device {kind!r}: use one of {', '.join(KINDS)}")


__all__ = ["KINDS", "Device", "SoftDevice", "open_device"]
