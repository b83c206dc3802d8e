"""`ivp gateway` (run a Secure Network Gateway) and `ivp upload` (the operator's boot)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any

import typer

DEFAULT_SERVER_CMD = f"{sys.executable} -m ivp.cli server --host {{host}} --port {{port}}"
#: With --isolate the reference server also keeps its shards in the RAM-only mount.
ISOLATED_SERVER_CMD = DEFAULT_SERVER_CMD + " --weights-dir {weights}"


def register(app: typer.Typer) -> None:
    """Add the `gateway` and `upload` commands to the root CLI."""
    app.command(name="gateway", no_args_is_help=True)(gateway)
    app.command(name="upload", no_args_is_help=True)(upload)


def _fail(message: str, code: int = 2) -> None:
    typer.echo(f"ivp gateway: {message}", err=True)
    raise typer.Exit(code)


def gateway(
    state: Annotated[Path, typer.Option(help="State directory: device/ (the device's "
                                              "state) and log.sqlite (sealed pair log + "
                                              "spool).")],
    gateway_id: Annotated[str | None, typer.Option(
        help="This gateway's id (in every tag and record). Default: gw-<keyid prefix>.")] = None,
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8200,
    url: Annotated[str | None, typer.Option(
        help="URL the recomputer reaches this gateway at (sent in BOOT records). "
             "Default: http://HOST:PORT.")] = None,
    recomputer: Annotated[str | None, typer.Option(
        help="Recomputer base URL; audit/BOOT/checkpoint envelopes go to <URL>/uplink. "
             "Without it they stay in the durable spool.")] = None,
    recomputer_key: Annotated[str | None, typer.Option(
        help="Required. The recomputer's public key (its --print-identity: 64 hex for "
             "Ed25519, ecdsa-p256:<hex> for P-256), or a file holding that JSON. The only "
             "key whose Shutdown and Readmit envelopes this gateway obeys.")] = None,
    recomputer_kem_key: Annotated[str | None, typer.Option(
        help="The recomputer's X25519 KEM public key (its --print-identity "
             "kem_public_key: 64 hex, or that JSON file). Every uplink body is then sealed "
             "to it (HPKE, RFC 9180): the operator's network sees no prompt or output of "
             "the audit records, only sizes and timing. Without it the uplink is signed "
             "but readable.")] = None,
    policy: Annotated[Path | None, typer.Option(
        help="Quorum policy JSON (inspector keys) the whitelist must be signed under.")] = None,
    whitelist: Annotated[Path | None, typer.Option(
        help="Signed whitelist envelope (JSON). Refused → the gateway does not start.")] = None,
    epsilon: Annotated[float, typer.Option(
        help="Audit probability ε: each served pair is kept for audit with this "
             "probability (TRNG draw after the response is released). An ε the "
             "inspectors set (set_epsilon, relayed to POST /admin) overrides it, also "
             "across restarts.")] = 0.2,
    server_port: Annotated[int, typer.Option(
        help="Loopback port of this gateway's server (0 = pick a free one).")] = 0,
    server_cmd: Annotated[str, typer.Option(
        help="Command that starts the server (the gateway holds its power: it starts it, "
             "kills it on POWER_KILL and restarts it). {port}, {host} (the address it must "
             "bind) and {weights} (with --isolate: its RAM-only directory) are replaced. "
             "Default: the reference server (ivp server).")] = "",
    checkpoint_interval: Annotated[float, typer.Option(
        help="Seconds between signed checkpoints while serving (0 = off).")] = 10.0,
    reboot_interval: Annotated[float, typer.Option(
        help="Forced reboot period in seconds while serving: power flicker + memory wipe, "
             "then a fresh upload is needed (0 = off). A schedule the inspectors set "
             "(reboot_schedule) overrides it.")] = 0.0,
    release_grid_ms: Annotated[float, typer.Option(
        help="Release responses only on a fixed time grid of this many ms (lowers the "
             "timing side channel's rate, does not bound it; 0 = release at once).")] = 0.0,
    release_budget_ms: Annotated[float, typer.Option(
        help="Release policy with a proven bound (docs/THREATS.md): every response leaves "
             "exactly BASE + per-token costs after its request arrived; a later one at "
             "budget·2^k (alarmed release_late), or is dropped after the last step. "
             "0 = off (the grid, or at once).")] = 0.0,
    release_per_token_ms: Annotated[float, typer.Option(
        help="Budget per requested output token (max_tokens), ms.")] = 0.0,
    release_per_prompt_token_ms: Annotated[float, typer.Option(
        help="Budget per prompt token, ms.")] = 0.0,
    release_late_steps: Annotated[int, typer.Option(
        min=0, max=16, help="Late release points after the budget (each double the last); "
                            "timing then carries at most log2(steps + 2) bits a "
                            "response.")] = 3,
    sync: Annotated[str, typer.Option(
        help="SQLite synchronous mode of the pair log (FULL: fsync before every release).")
    ] = "FULL",
    engine: Annotated[str, typer.Option(
        help="Deployment: the inference engine this gateway's server runs (reference, "
             "vllm). Only the whitelist's manifest for (model, engine, dtype) boots, and "
             "its δ is the one the recomputer judges by.")] = "reference",
    dtype: Annotated[str, typer.Option(
        help="Deployment: the server's compute dtype (empty = the model's only profile "
             "for --engine).")] = "",
    device_kind: Annotated[str, typer.Option(
        "--device", help="soft: the development default, whose UID secret is a FILE in "
             "STATE/device (whoever reads it can sign as this gateway); tpm: the keys are "
             "made inside a TPM 2.0 and never leave it (see --tpm, docs/TRUST.md).")
    ] = "soft",
    tpm: Annotated[str | None, typer.Option(
        help="With --device tpm: the TPM's TCTI, e.g. device:/dev/tpmrm0 (default) or "
             "swtpm:host=127.0.0.1,port=2321 (scripts/swtpm.sh start).")] = None,
    isolate: Annotated[bool, typer.Option(
        "--isolate", help="Root only: run the server in its own network namespace whose "
             "only link is a veth pair to this gateway (nftables rejects and counts "
             "anything the server starts itself; an attempt raises the alarm "
             "server_network), in its own cgroup (POWER_KILL kills all of it), under "
             "bubblewrap (no capabilities, read-only files), with its weights on a "
             "RAM-only ramfs that POWER_KILL unmounts. See docs/TRUST.md.")] = False,
    print_identity: Annotated[bool, typer.Option(
        "--print-identity", help="Print {gateway_id, public_key, keyid} as JSON and exit "
                                 "(for enrolment by the inspectors).")] = False,
    allow_tamper_endpoint: Annotated[bool, typer.Option(
        "--allow-tamper-endpoint", help="Serve POST /tamper, which stands for the tamper "
                                        "mesh and bricks the gateway (demos and tests "
                                        "only; off: 404).")] = False,
) -> None:
    """Secure Network Gateway (SNG) in front of one inference server.

    Holds the server's power. UPLOAD mode: the operator streams the whitelisted
    model through POST /upload; each file's digest is checked as it passes (a
    mismatch power-kills the server at that file's end); at S good bytes the gateway
    enters SERVING. SERVING: every request is validated, tokenised with the
    whitelisted tokenizer, tagged, seeded from the TRNG, answered from token ids
    only, committed to the sealed hash-chained log before release, then kept for
    audit with probability ε. A Shutdown signed by the recomputer stops it until a
    Readmit (after the inspectors' quorum) lifts it; POST /tamper (the emulated tamper
    mesh, with --allow-tamper-endpoint) bricks it for good. See docs/GATEWAY.md.
    """
    from ivp.device import open_device
    from ivp.errors import BrickedError, IvpError

    try:
        device = open_device(device_kind, state / "device", tpm)
    except IvpError as exc:
        _fail(str(exc))
    if print_identity:
        try:
            key = device.public_key
        except BrickedError as exc:
            _fail(str(exc))
        from ivp.protocol.hpke import kem_public_hex

        gid = gateway_id or f"gw-{key.keyid[:12]}"
        typer.echo(json.dumps({"gateway_id": gid, "public_key": key.hex, "keyid": key.keyid,
                               "kem_public_key": kem_public_hex(device)}))
        return
    if policy is None or whitelist is None:
        _fail("--policy and --whitelist are required (the gateway boots only whitelisted "
              "models)")
    if recomputer and not recomputer_key:
        _fail("--recomputer needs --recomputer-key: the gateway deletes a spooled record "
              "only on an acknowledgement signed by that key")
    assert policy is not None and whitelist is not None
    if not recomputer_key:
        _fail("--recomputer-key is required: the recomputer's public key (hex, or its "
              "--print-identity JSON file). Without it this gateway could not obey a "
              "Shutdown, and a caught gateway would keep serving")
    assert recomputer_key is not None
    try:
        key_hex = _recomputer_key(recomputer_key)
    except (IvpError, OSError, ValueError) as exc:
        _fail(f"--recomputer-key: {exc}")
    try:
        seal_to = _kem_key(recomputer_kem_key) if recomputer_kem_key else None
    except (IvpError, OSError, ValueError) as exc:
        _fail(f"--recomputer-kem-key: {exc}")
    from aiohttp import web

    from ivp.web import bound_port, listen

    sock = listen("gateway", host, port)  # before anything starts: a busy port exits 2
    port = bound_port(sock)
    sandbox = None
    if isolate:
        from ivp.gateway.isolation import Sandbox, check_can_isolate

        try:
            check_can_isolate()
            sandbox = Sandbox.for_state(state)
            sandbox.setup()
        except IvpError as exc:
            sock.close()
            _fail(str(exc))
    try:
        built = _build(device, state, gateway_id, host, port, url, recomputer, key_hex,
                       policy, whitelist, epsilon, server_port, server_cmd,
                       checkpoint_interval, reboot_interval, release_grid_ms, sync, sandbox,
                       engine, dtype, allow_tamper_endpoint, _release_policy(
                           release_budget_ms, release_per_prompt_token_ms,
                           release_per_token_ms, release_late_steps), seal_to=seal_to)
    except (IvpError, OSError, ValueError) as exc:
        sock.close()
        if sandbox is not None:
            sandbox.teardown()
        _fail(str(exc))
        return
    where = f"{built.server_host}:{built.server_port}" + (
        f", isolated in {sandbox.netns}" if sandbox is not None else "")
    ready = (f"ivp gateway {built.config.gateway_id}: listening on http://{host}:{port} "
             f"(server on {where})")
    try:  # "listening" once the app has started on the bound socket
        web.run_app(built.app, sock=sock, print=lambda _: typer.echo(ready, err=True),
                    access_log=None)
    finally:
        if sandbox is not None:
            sandbox.teardown()


def _release_policy(base_ms: float, prompt_ms: float, token_ms: float,
                    steps: int) -> Any:
    """The release policy of the CLI flags (None: off)."""
    if base_ms <= 0:
        return None
    from ivp.gateway.release import ReleasePolicy

    return ReleasePolicy(base=base_ms / 1e3, per_prompt_token=prompt_ms / 1e3,
                         per_token=token_ms / 1e3, late_steps=steps)


def _recomputer_key(value: str) -> str:
    """The recomputer key's text form: given as such, or as its identity JSON file.

    Raises:
        ValueError, ValidationError: neither a key (Ed25519 hex, ecdsa-p256:<hex>) nor a
            file holding {"public_key": key}.
    """
    from ivp.errors import ValidationError
    from ivp.protocol.keys import VerifyKey

    try:
        return VerifyKey.from_hex(value.strip()).hex
    except ValidationError:
        if not Path(value).is_file():
            raise ValueError("expected the recomputer's public key (64 hex digits, or "
                             "ecdsa-p256:<hex>) or its --print-identity JSON file; "
                             f"{value!r} is neither") from None
    try:
        text = str(json.loads(Path(value).read_text())["public_key"])
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"{value}: not a --print-identity JSON file (no "
                         "\"public_key\")") from None
    return VerifyKey.from_hex(text).hex


def _kem_key(value: str) -> bytes:
    """The recomputer's KEM public key: 64 hex, or its --print-identity JSON file.

    Raises:
        ValueError: neither (or not a valid X25519 public key).
    """
    text = value.strip()
    if not all(c in "0123456789abcdefABCDEF" for c in text) or len(text) != 64:
        if not Path(value).is_file():
            raise ValueError("expected the recomputer's kem_public_key (64 hex digits) or "
                             f"its --print-identity JSON file; {value!r} is neither")
        try:
            text = str(json.loads(Path(value).read_text())["kem_public_key"])
        except (ValueError, KeyError, TypeError):
            raise ValueError(f"{value}: no \"kem_public_key\" in it (a recomputer's "
                             "--print-identity JSON)") from None
    from ivp.protocol.hpke import seal_message

    key = bytes.fromhex(text)
    seal_message(key, b"check", b"")  # ValidationError now rather than at the first uplink
    return key


class _Built:
    def __init__(self, app: Any, config: Any, server_host: str, server_port: int) -> None:
        self.app, self.config = app, config
        self.server_host, self.server_port = server_host, server_port


def _build(device: object, state: Path, gateway_id: str | None, host: str, port: int,
           url: str | None, recomputer: str | None, recomputer_key: str | None,
           policy: Path, whitelist: Path, epsilon: float, server_port: int, server_cmd: str,
           checkpoint_interval: float, reboot_interval: float, release_grid_ms: float,
           sync: str, sandbox: Any = None, engine: str = "reference",
           dtype: str = "", tamper_endpoint: bool = False, release: Any = None,
           seal_to: bytes | None = None) -> _Built:
    import socket

    from ivp.gateway.app import build_app
    from ivp.gateway.core import Gateway, GatewayConfig
    from ivp.gateway.log import PairLog
    from ivp.gateway.power import ProcessPower, server_command
    from ivp.gateway.uplink import HttpUplink
    from ivp.gateway.upstream import HttpUpstream
    from ivp.protocol.encoding import decode
    from ivp.protocol.keys import VerifyKey
    from ivp.protocol.quorum import QuorumPolicy
    from ivp.whitelist import TrustedWhitelist

    trusted = TrustedWhitelist(decode(policy.read_bytes(), QuorumPolicy))
    trusted.update(whitelist.read_bytes())  # refused → IvpError → no start
    bricked = device.bricked  # type: ignore[attr-defined]
    if gateway_id is None:
        if bricked:
            raise ValueError("bricked device: pass --gateway-id")
        gateway_id = f"gw-{device.public_key.keyid[:12]}"  # type: ignore[attr-defined]
    if server_port == 0:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            server_port = int(s.getsockname()[1])
    config = GatewayConfig(
        gateway_id=gateway_id, epsilon=epsilon, url=url or f"http://{host}:{port}",
        checkpoint_interval=checkpoint_interval, reboot_interval=reboot_interval,
        release_grid=release_grid_ms / 1000.0, engine=engine, dtype=dtype, release=release,
    )
    state.mkdir(parents=True, exist_ok=True)
    log = PairLog(state / "log.sqlite", device, synchronous=sync)  # type: ignore[arg-type]
    power: ProcessPower
    if sandbox is None:
        server_host = "127.0.0.1"
        power = ProcessPower(server_command(server_cmd or DEFAULT_SERVER_CMD, server_port),
                             log_path=state / "server.log")
    else:
        from ivp.gateway.isolation import IsolatedPower

        server_host = sandbox.server_ip
        power = IsolatedPower(sandbox, server_command(
            server_cmd or ISOLATED_SERVER_CMD, server_port, server_host, str(sandbox.ram)),
            log_path=state / "server.log")
    core = Gateway(
        config, device, log, trusted,  # type: ignore[arg-type]
        HttpUpstream(f"http://{server_host}:{server_port}"), power,
        uplink=HttpUplink(recomputer, seal_to=seal_to) if recomputer else None,
        recomputer_key=VerifyKey.from_hex(recomputer_key) if recomputer_key else None,
        on_serving=freeze_heap,
    )
    if sandbox is not None:
        _alarm_on_network_attempts(core, power)  # type: ignore[arg-type]
    return _Built(build_app(core, tamper_endpoint=tamper_endpoint), config, server_host,
                  server_port)


def _alarm_on_network_attempts(core: Any, power: Any) -> None:
    """Each attempt the kernel counted becomes the signed gateway alarm server_network."""
    import asyncio

    pending: set[asyncio.Task[Any]] = set()

    def raise_alarm(message: str) -> None:
        task = asyncio.get_running_loop().create_task(core.alarm("server_network", message))
        pending.add(task)
        task.add_done_callback(pending.discard)

    power.on_net_attempt(raise_alarm)


_heap_frozen = False


def freeze_heap() -> None:
    """Once per process, at the first boot (transformers loaded): move what is alive out
    of the cyclic GC's full passes, which took ~60 ms each (~10 µs per request under
    load). Collected first, so no garbage is frozen; later boots add little (a tokenizer
    is freed by reference counting, frozen or not). A process-wide change, so it is made
    here, by the process entry, not by the library's ``Gateway``."""
    global _heap_frozen
    if not _heap_frozen:
        import gc

        _heap_frozen = True
        gc.collect()
        gc.freeze()


def malformed_url(url: str) -> str:
    """Why ``url`` is not an http(s) base URL ("" when it is one)."""
    from urllib.parse import urlsplit

    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError as exc:
        return f"{url!r} is a malformed URL ({exc}); expected e.g. http://127.0.0.1:8200"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return (f"{url!r} is a malformed URL: expected http://HOST:PORT of a gateway, e.g. "
                "http://127.0.0.1:8200")
    return ""


def upload(
    gateway_url: Annotated[str, typer.Argument(help="The gateway, e.g. http://127.0.0.1:8200")],
    model_dir: Annotated[Path, typer.Argument(help="Model directory (config, tokenizer, "
                                                   "safetensors shards).")],
    model_id: Annotated[str, typer.Option(help="The model's id on the whitelist.")],
    encrypt_to: Annotated[str | None, typer.Option(
        help="Encrypt the stream (HPKE, RFC 9180) to this gateway KEM public key (hex, "
             "its --print-identity kem_public_key): only that gateway can read the "
             "weights on the way.")] = None,
) -> None:
    """Operator: stream a model's files (manifest order) through a gateway to its server.

    The gateway checks each file against the whitelisted manifest as it passes and
    answers {"state": "serving", "boot_id"} or, on a mismatch, power-kills the server
    and answers 400 {"state": "power_kill", "error", "file"}. Exit status 0 only when
    the gateway is SERVING.
    """
    import asyncio

    import aiohttp
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TimeRemainingColumn,
        TransferSpeedColumn,
    )

    from ivp.errors import IvpError
    from ivp.gateway.upload import upload_model, upload_order

    console = Console(stderr=True)
    why = malformed_url(gateway_url)
    if why:
        typer.echo(f"ivp upload: {why}", err=True)
        raise typer.Exit(2)
    try:
        order = upload_order(model_dir, model_id)
    except (IvpError, OSError) as exc:
        console.print(f"[red]ivp upload:[/red] {exc}")
        raise typer.Exit(2) from None
    total = sum(size for _, size in order)
    with Progress("[progress.description]{task.description}", BarColumn(), DownloadColumn(),
                  TransferSpeedColumn(), TimeRemainingColumn(), console=console) as bar:
        task = bar.add_task(f"upload {model_id}", total=total)
        try:
            result = asyncio.run(upload_model(
                gateway_url, model_dir, model_id, files=order,
                progress=lambda n: bar.advance(task, n),
                encrypt_to=bytes.fromhex(encrypt_to) if encrypt_to else None))
        except (OSError, aiohttp.ClientError) as exc:
            console.print(f"[red]ivp upload:[/red] gateway unreachable: {exc}")
            raise typer.Exit(2) from None
        except (IvpError, ValueError) as exc:  # a bad --encrypt-to
            console.print(f"[red]ivp upload:[/red] --encrypt-to: {exc}")
            raise typer.Exit(2) from None
    typer.echo(json.dumps(result, sort_keys=True))
    if result.get("state") == "serving":
        console.print(f"[green]SERVING[/green] {model_id} boot {result.get('boot_id')}")
    else:
        message = result.get("error", {})
        if isinstance(message, dict):
            message = message.get("message", "")
        console.print(f"[red]{str(result.get('state', 'refused')).upper()}[/red] {message}")
        raise typer.Exit(1)
