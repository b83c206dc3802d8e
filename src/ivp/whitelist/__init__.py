"""Model manifests and the quorum-signed whitelist (secure boot's source of truth)."""

from ivp.whitelist.manifest import file_digest, make_manifest, read_model_files
from ivp.whitelist.trusted import TrustedWhitelist, sign_whitelist

__all__ = [
    "TrustedWhitelist", "file_digest", "make_manifest", "read_model_files", "sign_whitelist",
]
