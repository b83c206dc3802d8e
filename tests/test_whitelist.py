"""Model manifests and the trusted whitelist (ivp.whitelist)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import blake3
import numpy as np
import pytest
from safetensors.numpy import save_file
from typer.testing import CliRunner, Result

from ivp.cli import app
from ivp.errors import DigestError, ExpiredError, QuorumError, ValidationError
from ivp.protocol import envelope as dsse
from ivp.protocol.encoding import canonical, decode
from ivp.protocol.envelope import Envelope
from ivp.protocol.keys import SigningKey
from ivp.protocol.messages import Manifest, NoiseBound, Whitelist
from ivp.protocol.quorum import InspectorKey, QuorumPolicy
from ivp.whitelist import (
    TrustedWhitelist,
    file_digest,
    make_manifest,
    read_model_files,
    sign_whitelist,
)

NOW = 1_700_000_000.0


def make_model(d: Path) -> Path:
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(
        {"architectures": ["LlamaForCausalLM"], "torch_dtype": "bfloat16"}))
    (d / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (d / "tokenizer_config.json").write_text("{}")
    (d / "generation_config.json").write_text("{}")
    # names chosen so that plain name order would interleave the roles
    save_file({"w": np.arange(12, dtype=np.float32).reshape(3, 4)},
              str(d / "a-00001.safetensors"))
    save_file({"b": np.ones(5, dtype=np.float32)}, str(d / "model-00002.safetensors"))
    (d / "README.md").write_text("not part of the model")
    (d / "sub").mkdir(exist_ok=True)
    return d


ORDER = ["config.json", "generation_config.json", "tokenizer.json", "tokenizer_config.json",
         "a-00001.safetensors", "model-00002.safetensors"]


# --- manifests ------------------------------------------------------------------------------
@pytest.mark.parametrize("algo", ["blake3", "sha256"])
def test_make_manifest(tmp_path: Path, algo: str) -> None:
    d = make_model(tmp_path / "m")
    m = make_manifest(d, "tiny-llama", algo=algo)
    assert [f.name for f in m.files] == ORDER  # config -> tokenizer -> weights
    assert [f.role for f in m.files] == ["config"] * 2 + ["tokenizer"] * 2 + ["weights"] * 2
    for f in m.files:
        data = (d / f.name).read_bytes()
        want = (blake3.blake3(data) if algo == "blake3" else hashlib.sha256(data)).hexdigest()
        assert (f.size, f.digest, f.algo) == (len(data), want, algo)
        assert file_digest(d / f.name, algo) == want
    assert m.total_size == sum((d / n).stat().st_size for n in ORDER)
    assert (m.model_id, m.architecture, m.dtype, m.sampler_spec) == (
        "tiny-llama", "LlamaForCausalLM", "bfloat16", "v1")
    assert decode(canonical(m), Manifest) == m


def test_make_manifest_is_deterministic_and_carries_delta(tmp_path: Path) -> None:
    d = make_model(tmp_path / "m")
    nb = NoiseBound(delta=0.02, method="batch sizes 1..8", samples=100)
    assert make_manifest(d, "x", noise_bound=nb) == make_manifest(d, "x", noise_bound=nb)
    assert make_manifest(d, "x", noise_bound=nb).noise_bound == nb


def test_make_manifest_refusals(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match=r"config\.json"):
        make_manifest(tmp_path, "x")
    d = tmp_path / "m"
    d.mkdir()
    (d / "config.json").write_text("{}")
    with pytest.raises(ValidationError, match="safetensors"):
        make_manifest(d, "x")
    (d / "pytorch_model.bin").write_bytes(b"pickle")
    with pytest.raises(ValidationError, match="pickle"):
        make_manifest(d, "x")
    save_file({"w": np.zeros(2, dtype=np.float32)}, str(d / "model.safetensors"))
    with pytest.raises(ValidationError, match="model_id"):
        make_manifest(d, "bad id with spaces")
    with pytest.raises(ValidationError, match="algorithm"):
        make_manifest(d, "x", algo="md5")
    (d / "config.json").write_text("{not json")
    with pytest.raises(ValidationError, match=r"config\.json: not JSON"):
        make_manifest(d, "x")


def test_read_model_files(tmp_path: Path) -> None:
    d = make_model(tmp_path / "m")
    for algo in ("blake3", "sha256"):
        m = make_manifest(d, "tiny", algo=algo)
        files = read_model_files(d, m)
        assert list(files) == ORDER
        assert all(files[n] == (d / n).read_bytes() for n in ORDER)


@pytest.mark.parametrize("name", ORDER)
def test_read_model_files_rejects_changed_byte(tmp_path: Path, name: str) -> None:
    d = make_model(tmp_path / "m")
    m = make_manifest(d, "tiny")
    path = d / name
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    with pytest.raises(DigestError, match=name):
        read_model_files(d, m)


def test_read_model_files_rejects_missing_and_resized(tmp_path: Path) -> None:
    d = make_model(tmp_path / "m")
    m = make_manifest(d, "tiny", algo="sha256")
    with (d / "tokenizer.json").open("ab") as f:
        f.write(b" ")
    with pytest.raises(DigestError, match=r"tokenizer\.json"):
        read_model_files(d, m)
    (d / "tokenizer.json").unlink()
    with pytest.raises(DigestError, match="missing"):
        read_model_files(d, m)


# --- the trusted whitelist -------------------------------------------------------------------
US = SigningKey.from_seed(b"u" * 32)
CN = SigningKey.from_seed(b"c" * 32)
POLICY = QuorumPolicy(
    threshold=2,
    keys=[InspectorKey(keyid=k.keyid, party=p, public_key=k.verify_key.hex)
          for k, p in ((US, "US"), (CN, "CN"))],
    required_parties=["US", "CN"],
)


@pytest.fixture(scope="module")
def manifest(tmp_path_factory: pytest.TempPathFactory) -> Manifest:
    return make_manifest(make_model(tmp_path_factory.mktemp("model")), "tiny")


def whitelist_bytes(manifest: Manifest, version: int, expires: float = NOW + 3600,
                    keys: tuple[SigningKey, ...] = (US, CN)) -> bytes:
    wl = Whitelist(version=version, expires=expires, manifests=[manifest])
    return sign_whitelist(wl, keys).to_bytes()


def state(t: TrustedWhitelist) -> tuple[object, object]:
    return t.current, t.envelope


def installed(manifest: Manifest, version: int = 2) -> TrustedWhitelist:
    t = TrustedWhitelist(POLICY)
    t.update(whitelist_bytes(manifest, version), now=NOW)
    return t


def test_update_with_quorum(manifest: Manifest) -> None:
    t = TrustedWhitelist(POLICY)
    assert t.manifest("tiny", now=NOW) is None
    wl = t.update(whitelist_bytes(manifest, 1), now=NOW)
    assert wl.version == 1 and t.current == wl
    assert t.manifest("tiny", now=NOW) == manifest
    assert t.manifest("other", now=NOW) is None
    assert t.manifest("tiny", now=NOW + 7200) is None  # lapses when it expires
    t.update(whitelist_bytes(manifest, 5), now=NOW)  # versions may skip
    assert t.current is not None and t.current.version == 5


@pytest.mark.parametrize("keys", [(US,), (CN,), ()])
def test_under_signed_refused_state_unchanged(manifest: Manifest,
                                              keys: tuple[SigningKey, ...]) -> None:
    """One party alone cannot whitelist a model."""
    for t in (TrustedWhitelist(POLICY), installed(manifest)):
        before = state(t)
        with pytest.raises(QuorumError):
            t.update(whitelist_bytes(manifest, 9, keys=keys), now=NOW)
        assert state(t) == before


def test_expired_refused_state_unchanged(manifest: Manifest) -> None:
    """Replay of an old, expired list."""
    for t in (TrustedWhitelist(POLICY), installed(manifest)):
        before = state(t)
        for expires in (NOW, NOW - 1):
            with pytest.raises(ExpiredError, match="expired"):
                t.update(whitelist_bytes(manifest, 9, expires=expires), now=NOW)
        assert state(t) == before


@pytest.mark.parametrize("version", [1, 2])
def test_rollback_refused_state_unchanged(manifest: Manifest, version: int) -> None:
    """Rollback to an older (or the same) version, even validly signed and unexpired."""
    t = installed(manifest, version=2)
    before = state(t)
    with pytest.raises(ExpiredError, match="rollback"):
        t.update(whitelist_bytes(manifest, version), now=NOW)
    assert state(t) == before


def test_tampered_whitelist_refused(manifest: Manifest) -> None:
    t = installed(manifest)
    before = state(t)
    env = Envelope.from_bytes(whitelist_bytes(manifest, 3))
    evil = Whitelist(version=3, expires=NOW + 3600,
                     manifests=[manifest, make_evil(manifest)])
    forged = Envelope(env.payloadType, dsse.sign(dsse.WHITELIST, canonical(evil), []).payload,
                      env.signatures)
    with pytest.raises(QuorumError):
        t.update(forged.to_bytes(), now=NOW)
    assert state(t) == before


def make_evil(m: Manifest) -> Manifest:
    return decode(canonical(m).replace(b'"tiny"', b'"evil"'), Manifest)


@pytest.mark.parametrize("data", [
    b"", b"not json", b"{}", b'{"payloadType":"x","payload":"","signatures":[]}',
])
def test_malformed_refused_state_unchanged(manifest: Manifest, data: bytes) -> None:
    t = installed(manifest)
    before = state(t)
    with pytest.raises((ValidationError, QuorumError)):
        t.update(data, now=NOW)
    assert state(t) == before


def test_wrong_payload_type_refused(manifest: Manifest) -> None:
    """A quorum-signed admin request is not a whitelist."""
    t = installed(manifest)
    before = state(t)
    wl = Whitelist(version=3, expires=NOW + 3600, manifests=[manifest])
    env = dsse.sign(dsse.ADMIN, canonical(wl), [US, CN])
    with pytest.raises(ValidationError, match="payload type"):
        t.update(env.to_bytes(), now=NOW)
    assert state(t) == before


def test_quorum_signed_garbage_payload_refused(manifest: Manifest) -> None:
    t = installed(manifest)
    before = state(t)
    env = dsse.sign(dsse.WHITELIST, b'{"version": 3}', [US, CN])
    with pytest.raises(ValidationError):
        t.update(env.to_bytes(), now=NOW)
    assert state(t) == before


def test_installed_envelope_is_the_received_one(manifest: Manifest) -> None:
    data = whitelist_bytes(manifest, 4)
    t = TrustedWhitelist(POLICY)
    t.update(data, now=NOW)
    assert t.envelope == Envelope.from_bytes(data)


# --- the CLI: ivp keys / ivp whitelist ------------------------------------------------------
PASSPHRASE = "inspector passphrase"
NO_PASSPHRASE: dict[str, str | None] = {"IVP_KEY_PASSPHRASE": None,
                                        "IVP_KEY_PASSPHRASE_FILE": None}


def run(*args: str | Path, env: dict[str, str | None] | None = None) -> Result:
    env = {"IVP_KEY_PASSPHRASE": PASSPHRASE} if env is None else env
    result = CliRunner(env=env).invoke(app, [str(a) for a in args])
    assert result.exception is None or isinstance(result.exception, SystemExit), (
        result.output, result.exception)
    return result


@pytest.fixture
def inspectors(tmp_path: Path) -> Path:
    """Three inspector keys (two US, one CN) and a 2-of-3 policy requiring both parties."""
    keys = tmp_path / "keys"
    for name, party in (("us-1", "US"), ("us-2", "US"), ("cn-1", "CN")):
        r = run("keys", "new", "--out", keys, "--name", name, "--party", party)
        assert r.exit_code == 0, r.output
    r = run("keys", "policy", "--threshold", "2", "--require", "US", "--require", "CN",
            *sorted(keys.glob("*.pub.json")), "--out", tmp_path / "policy.json")
    assert r.exit_code == 0, r.output
    assert "2 of 3" in r.stdout
    return tmp_path


def test_cli_help_texts() -> None:
    for args in (["keys"], ["whitelist"], ["keys", "new"], ["keys", "policy"],
                 ["whitelist", "manifest"], ["whitelist", "build"], ["whitelist", "sign"],
                 ["whitelist", "verify"]):
        r = run(*args, "--help")
        assert r.exit_code == 0 and "Usage:" in r.stdout
        assert len(r.stdout) > 300, args
    top = run("--help").stdout
    assert "keys" in top and "whitelist" in top


def test_cli_keys_new(tmp_path: Path) -> None:
    r = run("keys", "new", "--out", tmp_path, "--name", "us-1", "--party", "US")
    assert r.exit_code == 0
    assert "passphrase-encrypted" in r.stdout
    key_path, pub_path = tmp_path / "us-1.key", tmp_path / "us-1.pub.json"
    assert oct(key_path.stat().st_mode & 0o777) == "0o600"
    assert SigningKey.is_encrypted(key_path)
    key = SigningKey.load(key_path, PASSPHRASE.encode())
    pub = decode(pub_path.read_bytes(), InspectorKey)
    assert (pub.keyid, pub.party, pub.public_key, pub.name) == (
        key.keyid, "US", key.verify_key.hex, "us-1")
    assert key.keyid in r.stdout
    again = run("keys", "new", "--out", tmp_path, "--name", "us-1", "--party", "US")
    assert again.exit_code == 2 and "exists" in again.stderr
    assert SigningKey.load(key_path, PASSPHRASE.encode()).keyid == key.keyid  # kept
    forced = run("keys", "new", "--out", tmp_path, "--name", "us-1", "--party", "US",
                 "--force")
    assert forced.exit_code == 0
    assert SigningKey.load(key_path, PASSPHRASE.encode()).keyid != key.keyid
    bad = run("keys", "new", "--out", tmp_path, "--name", "../evil", "--party", "US")
    assert bad.exit_code == 2 and "--name" in bad.stderr


def test_cli_keys_new_never_writes_plaintext_unasked(tmp_path: Path) -> None:
    """Without a passphrase (none in the environment, no terminal) and without
    --insecure-plaintext, no key file is written at all."""
    r = run("keys", "new", "--out", tmp_path, "--name", "us-1", "--party", "US", env=NO_PASSPHRASE)
    assert r.exit_code == 2 and "--insecure-plaintext" in r.stderr
    assert not (tmp_path / "us-1.key").exists() and not (tmp_path / "us-1.pub.json").exists()
    r = run("keys", "new", "--out", tmp_path, "--name", "us-1", "--party", "US",
            "--insecure-plaintext")
    assert r.exit_code == 0 and "UNENCRYPTED" in r.stdout
    assert not SigningKey.is_encrypted(tmp_path / "us-1.key")
    r = run("keys", "new", "--out", tmp_path, "--name", "us-2", "--party", "US",
            "--insecure-plaintext", "--passphrase-file", tmp_path / "us-1.pub.json")
    assert r.exit_code == 2 and "contradict" in r.stderr


def test_cli_keys_new_passphrase_file_and_p256(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("from a file\n")
    r = run("keys", "new", "--out", tmp_path, "--name", "cn-1", "--party", "CN",
            "--type", "ecdsa-p256", "--passphrase-file", secret, env=NO_PASSPHRASE)
    assert r.exit_code == 0, r.output
    key = SigningKey.load(tmp_path / "cn-1.key", b"from a file")
    pub = decode((tmp_path / "cn-1.pub.json").read_bytes(), InspectorKey)
    assert key.scheme == "ecdsa-p256" and pub.public_key.startswith("ecdsa-p256:")
    r = run("keys", "new", "--out", tmp_path, "--name", "x", "--party", "CN",
            "--type", "rsa", env=NO_PASSPHRASE)
    assert r.exit_code == 2 and "--type" in r.stderr
    empty = tmp_path / "empty"
    empty.write_text("")
    r = run("keys", "new", "--out", tmp_path, "--name", "y", "--party", "CN",
            "--passphrase-file", empty, env=NO_PASSPHRASE)
    assert r.exit_code == 2 and "empty" in r.stderr


def test_cli_keys_policy(inspectors: Path) -> None:
    policy = decode((inspectors / "policy.json").read_bytes(), QuorumPolicy)
    assert policy.threshold == 2 and sorted(policy.required_parties) == ["CN", "US"]
    assert sorted(k.name for k in policy.keys) == ["cn-1", "us-1", "us-2"]
    keys = inspectors / "keys"
    for args, text in [
        (["--threshold", "4"], "threshold exceeds"),
        (["--threshold", "1", "--require", "EU"], "required party has no key"),
    ]:
        r = run("keys", "policy", *args, *keys.glob("*.pub.json"), "--out", inspectors / "p")
        assert r.exit_code == 2 and text in r.stderr, r.output
    dup = run("keys", "policy", "--threshold", "1", keys / "us-1.pub.json",
              keys / "us-1.pub.json", "--out", inspectors / "p")
    assert dup.exit_code == 2 and "more than once" in dup.stderr
    junk = inspectors / "junk.json"
    junk.write_text("[1, 2]")
    r = run("keys", "policy", "--threshold", "1", junk, "--out", inspectors / "p")
    assert r.exit_code == 2 and "junk.json" in r.stderr and "InspectorKey" in r.stderr
    assert not (inspectors / "p").exists()


def test_cli_keys_policy_requires_every_party_by_default(inspectors: Path) -> None:
    """Attack: a policy written without --require let two keys of ONE party make a
    quorum (the other government is never asked). By default every party with a key
    is required; dropping that needs an explicit --any-party."""
    from ivp.protocol.envelope import sign

    keys = inspectors / "keys"
    r = run("keys", "policy", "--threshold", "2", *sorted(keys.glob("*.pub.json")),
            "--out", inspectors / "default.json")
    assert r.exit_code == 0, r.output
    policy = decode((inspectors / "default.json").read_bytes(), QuorumPolicy)
    assert sorted(policy.required_parties) == ["CN", "US"]
    us = [SigningKey.load(keys / f"us-{i}.key", PASSPHRASE.encode()) for i in (1, 2)]
    result = policy.check(sign("t", b"x", us))
    assert not result and result.explain() == "no signature from party CN"
    cn = SigningKey.load(keys / "cn-1.key", PASSPHRASE.encode())
    assert policy.check(sign("t", b"x", [us[0], cn]))
    r = run("keys", "policy", "--threshold", "1", *sorted(keys.glob("*.pub.json")),
            "--out", inspectors / "low.json")
    assert r.exit_code == 2 and "below the 2 required parties" in r.stderr
    r = run("keys", "policy", "--threshold", "2", "--any-party",
            *sorted(keys.glob("*.pub.json")), "--out", inspectors / "any.json")
    assert r.exit_code == 0 and "WARNING: no party required" in r.stdout
    assert decode((inspectors / "any.json").read_bytes(), QuorumPolicy).required_parties == []


def test_cli_manifest(tmp_path: Path) -> None:
    d = make_model(tmp_path / "m")
    out = tmp_path / "tiny.json"
    r = run("whitelist", "manifest", d, "--model-id", "tiny", "--algo", "sha256", "--out", out,
            "--delta", "0.01", "--delta-method", "batch sweep", "--delta-samples", "8")
    assert r.exit_code == 0, r.output
    m = decode(out.read_bytes(), Manifest)
    assert m == make_manifest(d, "tiny", algo="sha256",
                              noise_bound=NoiseBound(delta=0.01, method="batch sweep",
                                                     samples=8))
    assert "tiny" in r.stdout and str(m.total_size) in r.stdout
    for args, text in [
        (["--algo", "md5"], "--algo"),
        (["--delta", "0.1"], "--delta-method"),
        (["--model-id", "bad id"], "model_id"),
    ]:
        base = {"--model-id": "tiny", **dict(zip(args[::2], args[1::2], strict=True))}
        flat = [x for kv in base.items() for x in kv]
        r = run("whitelist", "manifest", d, *flat, "--out", tmp_path / "x.json")
        assert r.exit_code == 2 and text in r.stderr, (args, r.output)
    r = run("whitelist", "manifest", tmp_path / "nope", "--model-id", "x", "--out", out)
    assert r.exit_code == 2 and "not a directory" in r.stderr
    r = run("whitelist", "manifest", tmp_path, "--model-id", "x", "--out", out)
    assert r.exit_code == 2 and "config.json" in r.stderr


def build(tmp: Path, *keys: str, version: int = 1, days: str = "30") -> Result:
    d = tmp / "model"
    if not d.exists():
        make_model(d)
        assert run("whitelist", "manifest", d, "--model-id", "tiny", "--out",
                   tmp / "tiny.json").exit_code == 0
    args: list[str | Path] = ["whitelist", "build", "--manifest", tmp / "tiny.json",
                              "--version", str(version), "--expires-days", days,
                              "--out", tmp / "wl.json"]
    for k in keys:
        args += ["--key", tmp / "keys" / f"{k}.key"]
    return run(*args)


def verify(tmp: Path) -> Result:
    return run("whitelist", "verify", tmp / "wl.json", "--policy", tmp / "policy.json")


def test_cli_build_sign_verify(inspectors: Path) -> None:
    tmp = inspectors
    r = build(tmp, "us-1")
    assert r.exit_code == 0, r.output
    assert "version 1" in r.stdout and "tiny" in r.stdout
    r = verify(tmp)
    assert r.exit_code == 1
    assert "quorum: FAILED" in r.stdout and "no signature from party CN" in r.stdout
    assert "REFUSED" in r.stdout and "tiny" in r.stdout
    before = Envelope.from_bytes((tmp / "wl.json").read_bytes())

    r = run("whitelist", "sign", tmp / "wl.json", "--key", tmp / "keys" / "cn-1.key")
    assert r.exit_code == 0, r.output
    assert "2 signature(s)" in r.stdout
    after = Envelope.from_bytes((tmp / "wl.json").read_bytes())
    assert after.payload == before.payload  # countersigning never re-encodes the payload
    r = verify(tmp)
    assert r.exit_code == 0, r.output
    assert "quorum: OK" in r.stdout and "ACCEPTED" in r.stdout
    assert "us-1" in r.stdout and "cn-1" in r.stdout

    # what the CLI wrote is exactly what a gateway's TrustedWhitelist installs
    policy = decode((tmp / "policy.json").read_bytes(), QuorumPolicy)
    wl = TrustedWhitelist(policy).update((tmp / "wl.json").read_bytes())
    assert wl.version == 1 and [m.model_id for m in wl.manifests] == ["tiny"]
    assert wl.manifests[0] == decode((tmp / "tiny.json").read_bytes(), Manifest)


def test_cli_build_with_quorum_at_once(inspectors: Path) -> None:
    assert build(inspectors, "us-2", "cn-1", version=7).exit_code == 0
    r = verify(inspectors)
    assert r.exit_code == 0 and "version 7" in r.stdout


def test_cli_sign_again_does_not_double_count(inspectors: Path) -> None:
    assert build(inspectors, "us-1").exit_code == 0
    r = run("whitelist", "sign", inspectors / "wl.json", "--key",
            inspectors / "keys" / "us-1.key")
    assert r.exit_code == 0 and "1 signature(s)" in r.stdout
    assert verify(inspectors).exit_code == 1
    r = run("whitelist", "sign", inspectors / "wl.json", "--key",
            inspectors / "keys" / "us-2.key")
    assert verify(inspectors).exit_code == 1  # two US keys: CN still missing


def test_cli_verify_unknown_signer_and_tampering(inspectors: Path, tmp_path: Path) -> None:
    outsider = tmp_path / "outsider"
    assert run("keys", "new", "--out", outsider, "--name", "x", "--party", "CN").exit_code == 0
    assert build(inspectors, "us-1").exit_code == 0
    run("whitelist", "sign", inspectors / "wl.json", "--key", outsider / "x.key")
    r = verify(inspectors)
    assert r.exit_code == 1 and "ignored" in r.stdout and "not a key of this policy" in r.stdout
    # a valid quorum, then one byte of the payload changed
    assert build(inspectors, "us-1", "cn-1").exit_code == 0
    env = Envelope.from_bytes((inspectors / "wl.json").read_bytes())
    payload = env.payload_bytes().replace(b'"version":1', b'"version":9')
    forged = Envelope(env.payloadType, dsse.sign(dsse.WHITELIST, payload, []).payload,
                      env.signatures)
    (inspectors / "wl.json").write_bytes(forged.to_bytes())
    r = verify(inspectors)
    assert r.exit_code == 1 and "INVALID" in r.stdout and "version 9" in r.stdout


def test_cli_verify_expired(inspectors: Path) -> None:
    assert build(inspectors, "us-1", "cn-1", days="0.000001").exit_code == 0
    import time

    time.sleep(0.2)
    r = verify(inspectors)
    assert r.exit_code == 1 and "EXPIRED" in r.stdout and "expired" in r.stdout


def test_cli_bad_files_give_clear_errors(inspectors: Path) -> None:
    tmp = inspectors
    assert build(tmp, "us-1").exit_code == 0
    (tmp / "garbage").write_bytes(b"\x00\xffnot json")
    cases: list[tuple[list[str | Path], str]] = [
        (["whitelist", "verify", tmp / "missing.json", "--policy", tmp / "policy.json"],
         "no such file"),
        (["whitelist", "verify", tmp / "garbage", "--policy", tmp / "policy.json"],
         "not a valid DSSE envelope"),
        (["whitelist", "verify", tmp / "wl.json", "--policy", tmp / "garbage"],
         "not a valid quorum policy"),
        (["whitelist", "verify", tmp / "tiny.json", "--policy", tmp / "policy.json"],
         "not a valid DSSE envelope"),
        (["whitelist", "sign", tmp / "wl.json", "--key", tmp / "keys" / "us-1.pub.json"],
         "not a private key file"),
        (["whitelist", "sign", tmp / "garbage", "--key", tmp / "keys" / "us-1.key"],
         "not a valid DSSE envelope"),
        (["whitelist", "build", "--manifest", tmp / "garbage", "--version", "2",
          "--expires-days", "1", "--key", tmp / "keys" / "us-1.key", "--out", tmp / "o"],
         "not a valid manifest"),
        (["whitelist", "build", "--manifest", tmp / "tiny.json", "--version", "2",
          "--expires-days", "0", "--key", tmp / "keys" / "us-1.key", "--out", tmp / "o"],
         "--expires-days"),
        (["whitelist", "build", "--manifest", tmp / "tiny.json", "--manifest",
          tmp / "tiny.json", "--version", "2", "--expires-days", "1", "--key",
          tmp / "keys" / "us-1.key", "--out", tmp / "o"], "unique"),
        (["whitelist", "build", "--manifest", tmp / "tiny.json", "--version", "2",
          "--expires-days", "1", "--key", tmp / "keys" / "us-1.key", "--key",
          tmp / "keys" / "us-1.key", "--out", tmp / "o"], "twice"),
        (["whitelist", "build", "--manifest", tmp / "tiny.json", "--version", "2",
          "--expires-days", "1", "--key", tmp / "keys" / "us-1.key", "--out",
          tmp / "no-dir" / "o"], "no such directory"),
    ]
    for args, text in cases:
        r = run(*args)
        assert r.exit_code == 2, (args, r.output)
        assert text in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.output
    # an admin envelope is not a whitelist, even with a quorum
    admin = dsse.sign(dsse.ADMIN, b"{}", [SigningKey.load(tmp / "keys" / "us-1.key",
                                                                PASSPHRASE.encode())])
    (tmp / "admin.json").write_bytes(admin.to_bytes())
    r = run("whitelist", "verify", tmp / "admin.json", "--policy", tmp / "policy.json")
    assert r.exit_code == 2 and "not a whitelist" in r.stderr
