"""Emulated secure hardware: the UID, TRNG, sealed storage and tamper = brick.

The note's gateway and recomputer are built around a hardware UID that the
manufacturer never learns, a TRNG, and a tamper mesh that destroys the UID. Here one
small interface, :class:`Device`, stands for that hardware; :class:`SoftDevice` fills it
in software (HKDF from a UID secret, the OS CSPRNG, AES-GCM sealing). A TPM 2.0 or HSM
backend would fill the same interface.
"""

from ivp.device.soft import Device, SoftDevice

__all__ = ["Device", "SoftDevice"]
