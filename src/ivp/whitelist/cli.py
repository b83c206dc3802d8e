"""`ivp keys …` and `ivp whitelist …`: inspector keys, quorum policy, manifests, whitelists.

The inspectors' workflow, one command per step:

    ivp keys new --out keys --name us-1 --party US          # each inspector, once
    ivp keys policy --threshold 2 --require US --require CN keys/*.pub.json --out policy.json
    ivp whitelist manifest models/tiny --model-id tiny --out tiny.manifest.json
    ivp whitelist build --manifest tiny.manifest.json --version 1 --expires-days 30 \\
        --key keys/us-1.key --out whitelist.json              # first signature
    ivp whitelist sign whitelist.json --key keys/cn-1.key     # countersign, in place
    ivp whitelist verify whitelist.json --policy policy.json  # what a gateway will decide

Files: private keys are OpenSSH private keys (mode 0600), encrypted under a passphrase
(``$IVP_KEY_PASSPHRASE_FILE``, ``$IVP_KEY_PASSPHRASE`` or a prompt; see
``ivp.whitelist.keyfiles``) unless made with ``--insecure-plaintext``; public keys are
``InspectorKey`` JSON;
the policy is ``QuorumPolicy`` JSON; a manifest is ``Manifest`` JSON; a whitelist is a
DSSE envelope (canonical JSON) of a ``Whitelist``. Every command is a thin shell over
``ivp.protocol`` and ``ivp.whitelist``; bad input ends in one line ``error: …`` and exit
status 2, never a traceback.
"""

from __future__ import annotations

import contextlib
import os
import re
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, NoReturn

import msgspec
import typer
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ivp.errors import IvpError
from ivp.protocol.encoding import canonical, convert, decode, to_builtins
from ivp.protocol.envelope import WHITELIST, Envelope, add_signature
from ivp.protocol.keys import SCHEMES, Signer, SigningKey, VerifyKey
from ivp.protocol.messages import Manifest, NoiseBound, Whitelist, manifest_digest
from ivp.protocol.quorum import InspectorKey, QuorumPolicy
from ivp.whitelist.keyfiles import load_signing_key, new_key_passphrase
from ivp.whitelist.manifest import make_manifest
from ivp.whitelist.trusted import TrustedWhitelist, sign_whitelist

EXIT_FAILED = 1  # `whitelist verify`: the document is not acceptable
EXIT_BAD_INPUT = 2  # a file is missing, unreadable or malformed; a bad option value

keys_app = typer.Typer(
    name="keys",
    help="Inspector signing keys and the quorum policy that every signed document "
    "(whitelist, admin request) must satisfy.",
    no_args_is_help=True,
)
whitelist_app = typer.Typer(
    name="whitelist",
    help="Model manifests and the quorum-signed, versioned, expiring whitelist that "
    "gateways boot from. Workflow: `manifest` each model, `build` the whitelist with the "
    "first inspector's key, `sign` it with the others' keys, `verify` it against the "
    "policy.",
    no_args_is_help=True,
)

_SAFE_NAME = re.compile(r"^[A-Za-z0-9._-]{1,64}$")


def register(app: typer.Typer) -> None:
    app.add_typer(keys_app)
    app.add_typer(whitelist_app)


# --- plumbing -----------------------------------------------------------------------------
def _out() -> Console:
    """Plain output: markup only where a call asks for it (file names may hold '[')."""
    return Console(highlight=False, markup=False, soft_wrap=True)


def _fail(message: str, code: int = EXIT_BAD_INPUT) -> NoReturn:
    Console(stderr=True, highlight=False, markup=False, soft_wrap=True).print(
        f"[bold red]error:[/bold red] {escape(message)}", markup=True)
    raise typer.Exit(code)


@contextlib.contextmanager
def _errors() -> Iterator[None]:
    """Turn the errors a bad file can cause into one clear line and exit status 2."""
    try:
        yield
    except IvpError as exc:
        _fail(str(exc))
    except FileNotFoundError as exc:
        _fail(f"{exc.filename}: no such file")
    except IsADirectoryError as exc:
        _fail(f"{exc.filename}: is a directory, not a file")
    except PermissionError as exc:
        _fail(f"{exc.filename}: permission denied")
    except OSError as exc:
        _fail(f"{exc.filename or ''}: {exc.strerror or exc}")


def _read(path: Path) -> bytes:
    return Path(path).read_bytes()


def _load(path: Path, type_: type[Any], what: str) -> Any:
    try:
        return decode(_read(path), type_)
    except IvpError as exc:
        raise type(exc)(f"{path}: not a valid {what}: {exc}") from None


def _write(path: Path, data: bytes) -> None:
    """Write atomically (a crash never leaves half a file where a good one was)."""
    path = Path(path)
    if path.parent and not path.parent.is_dir():
        _fail(f"{path.parent}: no such directory")
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _pretty(obj: Any) -> bytes:
    return msgspec.json.format(canonical(obj), indent=2) + b"\n"


def _load_keys(paths: list[Path]) -> list[Signer]:
    keys = [load_signing_key(Path(p)) for p in paths]
    ids = [k.keyid for k in keys]
    if len(set(ids)) != len(ids):
        _fail("the same key was given twice")
    return keys


def _size(n: int) -> str:
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024 or unit == "GiB":
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    raise AssertionError  # pragma: no cover


def _when(t: float) -> str:
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _read_envelope(path: Path) -> tuple[Envelope, Whitelist]:
    env = _load(path, Envelope, "DSSE envelope")
    if env.payloadType != WHITELIST:
        _fail(f"{path}: payload type {env.payloadType!r} is not a whitelist ({WHITELIST!r})")
    try:
        wl = decode(env.payload_bytes(), Whitelist)
    except IvpError as exc:
        _fail(f"{path}: the signed payload is not a valid whitelist: {exc}")
    return env, wl


def _warn_outside(keys: list[Signer], policy_file: Path | None) -> None:
    """Warn (stderr) about each signing key the policy does not list: its signature
    would be ignored by every gateway, and the whitelist may then lack its quorum."""
    if policy_file is None:
        return
    policy = _load(policy_file, QuorumPolicy, "quorum policy")
    listed = {k.keyid for k in policy.keys}
    for key in keys:
        if key.keyid not in listed:
            Console(stderr=True, highlight=False, markup=False, soft_wrap=True).print(
                f"warning: key {key.keyid} is not an inspector key of {policy_file}: its "
                "signature will not count towards the quorum")


# --- ivp keys -------------------------------------------------------------------------------
@keys_app.command("new")
def keys_new(
    out: Path = typer.Option(..., "--out", help="Directory for the two files (created if "
                             "missing)."),
    name: str = typer.Option(..., "--name", help="Key name, e.g. 'us-1': the files are "
                             "NAME.key and NAME.pub.json."),
    party: str = typer.Option(..., "--party", help="The inspecting party this key signs "
                              "for, e.g. 'US' or 'CN' (what --require names in a policy)."),
    force: bool = typer.Option(False, "--force", help="Overwrite existing files of that name."),
    scheme: str = typer.Option("ed25519", "--type", help="Key type: ed25519 (default) or "
                               "ecdsa-p256 (e.g. to match an HSM)."),
    passphrase_file: Path | None = typer.Option(
        None, "--passphrase-file", help="Read the passphrase that encrypts the key from "
        "this file's first line (else $IVP_KEY_PASSPHRASE_FILE, $IVP_KEY_PASSPHRASE, or a "
        "prompt on a terminal)."),
    insecure_plaintext: bool = typer.Option(
        False, "--insecure-plaintext", help="Write the private key unencrypted: anyone who "
        "copies the file can then sign for your party. For throw-away test keys only."),
    pkcs11_module: str | None = typer.Option(
        None, "--pkcs11", help="Make the key inside a PKCS#11 token (an HSM) through this "
        "module, e.g. /usr/lib/softhsm/libsofthsm2.so: NAME.key is then a reference that "
        "holds no secret (Ed25519 only; the token's PIN is read like a passphrase)."),
    token: str | None = typer.Option(
        None, "--token", help="With --pkcs11: the token's label."),
) -> None:
    """Create an inspector's signing key, encrypted at rest under a passphrase.

    Writes NAME.key (private, OpenSSH format, mode 0600, passphrase-encrypted with
    bcrypt-pbkdf: keep it offline, never share it) and NAME.pub.json (the public
    InspectorKey: keyid, party, public key, name) to hand to whoever writes the quorum
    policy. The passphrase is asked when the key signs (or read from
    $IVP_KEY_PASSPHRASE_FILE / $IVP_KEY_PASSPHRASE).
    """
    with _errors():
        if not _SAFE_NAME.match(name):
            _fail(f"--name {name!r}: use 1-64 letters, digits, '.', '_' or '-'")
        if not 1 <= len(party) <= 64:
            _fail("--party must be 1 to 64 characters")
        if scheme not in SCHEMES:
            _fail(f"--type {scheme!r}: use one of {', '.join(SCHEMES)}")
        out.mkdir(parents=True, exist_ok=True)
        key_path, pub_path = out / f"{name}.key", out / f"{name}.pub.json"
        for p in (key_path, pub_path):
            if p.exists() and not force:
                _fail(f"{p} exists (use --force to overwrite; the old key is then lost)")
        if pkcs11_module is not None:
            verify = _new_pkcs11_key(pkcs11_module, token, name, scheme, passphrase_file,
                                     insecure_plaintext, key_path)
            at_rest = f"a reference to token {token!r}: the private key never leaves it"
        else:
            secret = new_key_passphrase(passphrase_file, insecure_plaintext)
            key = SigningKey.generate(scheme)  # type: ignore[arg-type]
            key.save(key_path, passphrase=secret)
            verify = key.verify_key
            at_rest = "0600, " + ("UNENCRYPTED" if secret is None else "passphrase-encrypted") \
                + "; keep it secret"
        pub = InspectorKey(keyid=verify.keyid, party=party, public_key=verify.hex,
                           name=name)
        _write(pub_path, _pretty(pub))
    _out().print(f"key {name} ({party}, {verify.scheme}): keyid {verify.keyid}\n"
                 f"  private: {key_path} ({at_rest})\n"
                 f"  public:  {pub_path}")


def _new_pkcs11_key(module: str, token: str | None, name: str, scheme: str,
                    passphrase_file: Path | None, insecure_plaintext: bool,
                    key_path: Path) -> VerifyKey:
    """``ivp keys new --pkcs11``: the key pair made in the token, its reference written."""
    from ivp.whitelist import pkcs11
    from ivp.whitelist.keyfiles import passphrase

    if token is None:
        _fail("--pkcs11 needs --token (the token's label)")
    if insecure_plaintext:
        _fail("--pkcs11 and --insecure-plaintext contradict (the key stays in the token)")
    if scheme != "ed25519":
        _fail("--pkcs11 makes Ed25519 keys only (--type ed25519)")
    pin = passphrase(passphrase_file, prompt=f"PIN of token {token!r}: ")
    if pin is None:
        _fail(f"the PIN of token {token!r}: pass --passphrase-file, set "
              "$IVP_KEY_PASSPHRASE_FILE or $IVP_KEY_PASSPHRASE, or run on a terminal")
    verify = pkcs11.generate(module, token, name, pin)
    _write(key_path, pkcs11.Reference(module, token, name, verify.hex).to_bytes())
    return verify


@keys_app.command("policy")
def keys_policy(
    pubfiles: list[Path] = typer.Argument(..., help="Public key files (NAME.pub.json) of "
                                          "every inspector allowed to sign."),
    threshold: int = typer.Option(..., "--threshold", min=1, help="Least number of "
                                  "distinct valid inspector signatures a document needs."),
    require: list[str] = typer.Option([], "--require", help="A party that must be among "
                                      "the signers (repeat for each, e.g. --require US "
                                      "--require CN). Default: every party that has a key."),
    any_party: bool = typer.Option(False, "--any-party", help="Require no party at all: "
                                   "THRESHOLD keys of ONE party then make a quorum. Only "
                                   "for a single inspecting party."),
    out: Path = typer.Option(..., "--out", help="Where to write the policy JSON."),
) -> None:
    """Write the quorum policy that every whitelist and admin request must meet.

    At least THRESHOLD distinct inspector keys must sign, including one from each
    required party — by default every party that has a key in the policy, so two keys
    of one party never make a quorum on their own. Gateways and the recomputer are
    configured with this file: it is the root of trust.
    """
    with _errors():
        keys = [_load(p, InspectorKey, "public key file (InspectorKey JSON)")
                for p in pubfiles]
        parties = sorted({k.party for k in keys})
        if any_party and require:
            _fail("--any-party and --require contradict each other")
        required = [] if any_party else sorted(set(require) or set(parties))
        if threshold < len(required):
            _fail(f"--threshold {threshold} is below the {len(required)} required parties "
                  f"({', '.join(required)}): one signature per party needs at least "
                  f"{len(required)}")
        policy = convert({"threshold": threshold, "keys": [to_builtins(k) for k in keys],
                          "required_parties": required}, QuorumPolicy)
        _write(out, _pretty(policy))
    _out().print(
        f"policy: {threshold} of {len(policy.keys)} key(s) from {', '.join(parties)}"
        + (f", including {', '.join(policy.required_parties)}" if policy.required_parties
           else "; WARNING: no party required (--any-party): keys of one party alone can "
                "make a quorum") + f"\n  written to {out}")


# --- ivp whitelist --------------------------------------------------------------------------
@whitelist_app.command("manifest")
def whitelist_manifest(
    model_dir: Path = typer.Argument(..., help="Model directory: config.json, tokenizer "
                                     "files and .safetensors shards."),
    model_id: str = typer.Option(..., "--model-id", help="The name clients use in "
                                 "`model` (letters, digits and ._:/@+-)."),
    algo: str = typer.Option("blake3", "--algo", help="Digest algorithm: blake3 (default) "
                             "or sha256 (for interop)."),
    out: Path = typer.Option(..., "--out", help="Where to write the manifest JSON."),
    delta: float | None = typer.Option(None, "--delta", min=0.0, help="Calibrated noise "
                                       "bound δ on honest logit differences, if measured."),
    delta_method: str = typer.Option("", "--delta-method", help="How δ was measured "
                                     "(required with --delta)."),
    delta_samples: int = typer.Option(0, "--delta-samples", min=0, help="How many "
                                      "samples δ was measured over."),
) -> None:
    """Hash a model directory into a manifest (files in upload order, sizes, digests).

    Upload order is config, then tokenizer files, then the safetensors shards by name;
    the manifest also gives the total size S the gateway expects to stream.

    Pickle checkpoints (.bin, .pt) are refused: convert the model to safetensors first.
    """
    with _errors():
        if algo not in ("blake3", "sha256"):
            _fail(f"--algo {algo!r}: use blake3 or sha256")
        if not model_dir.is_dir():
            _fail(f"{model_dir}: not a directory")
        bound = None
        if delta is not None:
            if not delta_method:
                _fail("--delta needs --delta-method (how δ was measured)")
            bound = NoiseBound(delta=delta, method=delta_method, samples=delta_samples)
        manifest = make_manifest(model_dir, model_id, algo=algo, noise_bound=bound)
        _write(out, _pretty(manifest))
    con = _out()
    table = Table(title=f"manifest {manifest.model_id}", show_lines=False)
    for col in ("#", "file", "role", "size", f"{algo} digest"):
        table.add_column(col)
    for i, f in enumerate(manifest.files):
        table.add_row(str(i), f.name, f.role, _size(f.size), f.digest[:16] + "…")
    con.print(table)
    con.print(f"total {manifest.total_size} bytes ({_size(manifest.total_size)}), "
              f"{manifest.architecture}, {manifest.dtype}; manifest digest "
              f"{manifest_digest(manifest)}\nwritten to {out}")


@whitelist_app.command("build")
def whitelist_build(
    manifests: list[Path] = typer.Option(..., "--manifest", help="A manifest file (repeat "
                                         "for each model the whitelist allows)."),
    version: int = typer.Option(..., "--version", min=1, help="Whitelist version; must be "
                                "above the one the gateways hold (no rollback)."),
    expires_days: float = typer.Option(..., "--expires-days", help="Days from now until "
                                       "the whitelist expires and gateways refuse it."),
    keys: list[Path] = typer.Option(..., "--key", help="Private key file of a signing "
                                    "inspector (repeat; others can add theirs with `sign`)."),
    out: Path = typer.Option(..., "--out", help="Where to write the signed whitelist."),
    policy_file: Path | None = typer.Option(None, "--policy", help="The quorum policy: "
                                            "warns about a key that is not one of its "
                                            "inspectors' (its signature would not count)."),
) -> None:
    """Build a whitelist of the given manifests and sign it (a DSSE envelope).

    The result usually still lacks a quorum: pass it to the other inspectors for
    `ivp whitelist sign`, then check it with `ivp whitelist verify`.
    """
    with _errors():
        if not expires_days > 0:
            _fail("--expires-days must be positive")
        loaded = [_load(p, Manifest, "manifest") for p in manifests]
        signing = _load_keys(keys)
        _warn_outside(signing, policy_file)
        wl = convert({"version": version, "expires": time.time() + expires_days * 86400,
                      "manifests": [to_builtins(m) for m in loaded]}, Whitelist)
        env = sign_whitelist(wl, signing)
        _write(out, env.to_bytes() + b"\n")
    _out().print(
        f"whitelist version {wl.version}, {len(wl.manifests)} model(s) "
        f"({', '.join(m.model_id for m in wl.manifests)}), expires {_when(wl.expires)}\n"
        f"signed by {len(signing)} key(s); written to {out}")


@whitelist_app.command("sign")
def whitelist_sign(
    file: Path = typer.Argument(..., help="The whitelist envelope to countersign (changed "
                                "in place)."),
    keys: list[Path] = typer.Option(..., "--key", help="Private key file of a signing "
                                    "inspector (repeat for several)."),
    policy_file: Path | None = typer.Option(None, "--policy", help="The quorum policy: "
                                            "warns about a key that is not one of its "
                                            "inspectors' (its signature would not count)."),
) -> None:
    """Add your signature to a whitelist, in place.

    Prints what you are signing first. The payload is never re-encoded: the bytes the
    earlier signers signed are the bytes you sign. Signing again with the same key
    replaces that key's signature.
    """
    with _errors():
        env, wl = _read_envelope(file)
        signing = _load_keys(keys)
        _warn_outside(signing, policy_file)
        for key in signing:
            env = add_signature(env, key)
        _write(file, env.to_bytes() + b"\n")
    _out().print(
        f"signed whitelist version {wl.version} "
        f"({', '.join(m.model_id for m in wl.manifests)}) with "
        f"{', '.join(k.keyid for k in signing)}; it now has {len(env.signatures)} "
        f"signature(s)")


@whitelist_app.command("verify")
def whitelist_verify(
    file: Path = typer.Argument(..., help="The whitelist envelope to check."),
    policy_file: Path = typer.Option(..., "--policy", help="The quorum policy JSON "
                                     "(from `ivp keys policy`)."),
) -> None:
    """Check a whitelist exactly as a gateway would, and show what it allows.

    A gateway installs it only with a quorum of valid inspector signatures under the
    policy and before it expires; it also refuses a version not above the one it holds,
    which this command cannot know. Prints who signed and which models it allows.

    Exit status 0 if a gateway would install it, 1 if it would refuse it, 2 if a file
    is unreadable or malformed.
    """
    con = _out()
    with _errors():
        policy = _load(policy_file, QuorumPolicy, "quorum policy")
        env, wl = _read_envelope(file)
        result = policy.check(env)
        by_id = {k.keyid: k for k in policy.keys}
        for sig in env.signatures:
            k = by_id.get(sig.keyid)
            if sig.keyid in result.signers and k is not None:
                con.print(f"  valid   {sig.keyid}  {k.party} {k.name}")
            elif k is None:
                con.print(f"  ignored {sig.keyid}  (not a key of this policy)")
            else:
                con.print(f"  INVALID {sig.keyid}  {k.party} {k.name} (bad signature)")
        con.print(f"quorum: {'OK' if result else 'FAILED'}: {result.explain()} "
                  f"(policy: {policy.threshold} of {len(policy.keys)}"
                  + (f", parties {', '.join(sorted(policy.required_parties))}"
                     if policy.required_parties else "") + ")")
        expired = wl.expires <= time.time()
        con.print(f"version {wl.version}, expires {_when(wl.expires)}"
                  + (" (EXPIRED)" if expired else "") + f", {len(wl.manifests)} model(s):")
        for m in wl.manifests:
            delta = f"δ {m.noise_bound.delta:g}" if m.noise_bound else "no δ"
            con.print(f"  {m.model_id}: {len(m.files)} files, {_size(m.total_size)}, "
                      f"{m.architecture}, {delta}, manifest digest {manifest_digest(m)}")
        try:  # the gateway's own decision, by the same state machine
            TrustedWhitelist(policy).update(_read(file))
        except IvpError as exc:
            con.print(f"[bold red]REFUSED[/bold red]: {escape(str(exc))}", markup=True)
            raise typer.Exit(EXIT_FAILED) from None
    con.print("[bold green]ACCEPTED[/bold green]: a gateway with this policy would "
              "install it", markup=True)
