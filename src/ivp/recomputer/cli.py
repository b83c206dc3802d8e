"""`ivp recomputer` (run the SRC) and `ivp admin` (build, sign and send admin requests)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated, Any, NoReturn

import typer

admin_app = typer.Typer(
    name="admin",
    help=(
        "Inspector tools for ADMIN_REQUESTs to a recomputer (docs/ADMIN.md). A request is "
        "one instruction from a closed list, a nonce and an expiry, signed by a quorum of "
        "inspector keys. Build and sign in one go (`ivp admin enrol …`), or build with "
        "`ivp admin request`, let each party countersign with `ivp admin sign`, then "
        "`ivp admin send`."
    ),
    no_args_is_help=True,
)


def register(app: typer.Typer) -> None:
    """Add `recomputer`, `admin`, `watch`, `status` and `alarms` to the root CLI."""
    from ivp.recomputer import tables
    from ivp.recomputer.watch import watch

    app.command(name="recomputer", no_args_is_help=False)(recomputer)
    app.add_typer(admin_app, name="admin")
    app.command(name="watch", no_args_is_help=True)(watch)
    tables.register(app)


def _fail(message: str) -> NoReturn:
    typer.echo(f"ivp: {message}", err=True)
    raise typer.Exit(2)


def recomputer(
    state: Annotated[Path, typer.Option(help="State directory: device/ (the UID the key is "
                                             "derived from: a FILE, whoever reads it can "
                                             "sign as this recomputer) and "
                                             "recomputer.sqlite.")
                     ] = Path("state/recomputer"),
    host: Annotated[str, typer.Option(help="Address to bind.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    policy: Annotated[Path | None, typer.Option(
        help="Quorum policy JSON (`ivp keys policy`): whose signatures admin requests and "
             "whitelists need.")] = None,
    whitelist: Annotated[Path | None, typer.Option(
        help="Signed whitelist envelope. Refused (and the recomputer does not start) if "
             "under-signed or expired; ignored if older than the installed one.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        help="ID=DIR, repeatable: where the recomputer's own copy of whitelisted model ID "
             "lives. Every file is checked against the manifest before loading.")] = None,
    workers: Annotated[str, typer.Option(
        help="Verification workers: N local threads (each its own engine), 'ray' (a "
             "private local Ray instance), or 'auto' / 'ray://HOST:PORT' (a Ray "
             "cluster).")] = "1",
    ray_actors: Annotated[int, typer.Option(help="Ray actors (>= 2) with --workers ray.")] = 2,
    mode: Annotated[str, typer.Option(
        help="tolerant (default): every token explained within the manifest's calibrated "
             "noise bound δ (0 if it has none); exact: every token must be the spec's "
             "choice.")] = "tolerant",
    checkpoint_period: Annotated[float, typer.Option(
        help="The gateways' checkpoint period in seconds; 3 periods of silence from a "
             "serving gateway raise checkpoint_missing.")] = 60.0,
    sensor_heartbeat: Annotated[float, typer.Option(
        min=0.0, help="Seconds an enrolled sensor may stay silent (sensors send heartbeat "
                      "readings when idle) before sensor_silent; 0 turns the rule off.")
    ] = 600.0,
    lone_grace: Annotated[float, typer.Option(
        min=0.0, help="Seconds one person may be alone in a zone before lone_entry "
                      "(the two-person rule).")] = 30.0,
    shutdown_on: Annotated[list[str] | None, typer.Option(
        help="Alarm kind that shuts gateways down, repeatable (default verify_fail, "
             "audit_withheld, rollback; giving any replaces the defaults). Only "
             "authenticated kinds are allowed (e.g. sequence_gap, audit_rate, "
             "checkpoint_missing, gateway:<kind>).")] = None,
    shutdown_scope: Annotated[str, typer.Option(
        help="What a shutdown covers: gateway (the offender), model (every gateway "
             "serving its model) or cluster (every gateway).")] = "gateway",
    rate_limit: Annotated[float, typer.Option(
        help="INPUT requests per second per client (0 = no limit).")] = 0.0,
    rate_burst: Annotated[float, typer.Option(help="Burst size of the rate limit.")] = 20.0,
    health_interval: Annotated[float, typer.Option(
        help="Seconds between gateway health checks.")] = 5.0,
    batch_size: Annotated[int, typer.Option(help="Audit records per replay batch.")] = 16,
    require_sealed_uplink: Annotated[bool, typer.Option(
        "--require-sealed-uplink", help="Refuse every uplink body that is not sealed to "
             "this recomputer's KEM key (gateways need --recomputer-kem-key): audit "
             "records then never cross the operator's network readable.")] = False,
    allow_tamper_endpoint: Annotated[bool, typer.Option(
        help="DEMO/TEST ONLY: POST /tamper stands for the tamper mesh and bricks the "
             "device.")] = False,
    console: Annotated[bool, typer.Option(
        "--console/--no-console", help="Serve the read-only inspectors' console (fleet, "
        "alarms, audit explorer, verification health, admin log; docs/CONSOLE.md) on its "
        "own address.")] = False,
    console_host: Annotated[str, typer.Option(
        help="Address of the console. Any other than a loopback address needs "
             "--console-token-file.")] = "127.0.0.1",
    console_port: Annotated[int, typer.Option(
        help="TCP port of the console (0: --port + 1).")] = 0,
    console_token_file: Annotated[Path | None, typer.Option(
        help="File holding the token inspectors log in to the console with (at least 16 "
             "characters; kept out of the command line, which other users can read).")
    ] = None,
    device_kind: Annotated[str, typer.Option(
        "--device", help="soft: the development default, whose UID secret is a FILE in "
             "STATE/device (whoever reads it can sign as this recomputer, seal rows of its "
             "store and open sealed uplink); tpm: the keys are made inside a TPM 2.0 and "
             "never leave it (see --tpm, docs/TRUST.md).")] = "soft",
    tpm: Annotated[str | None, typer.Option(
        help="With --device tpm: the TPM's TCTI, e.g. device:/dev/tpmrm0 (default) or "
             "swtpm:host=127.0.0.1,port=2321 (scripts/swtpm.sh start).")] = None,
    print_identity: Annotated[bool, typer.Option(
        "--print-identity", help="Print {\"public_key\", \"keyid\", \"kem_public_key\"} "
                                 "of the device (kem_public_key: what gateways seal their "
                                 "uplink to, --recomputer-kem-key) and exit.")] = False,
    log_level: Annotated[str, typer.Option(help="Logging level.")] = "INFO",
) -> None:
    """Secure ReComputer (SRC): routes INPUT to gateways, ingests signed audit records,
    re-runs them by replay, and shuts a cheating gateway down.

    Routes: POST /v1/completions, POST /v1/chat/completions (INPUT), POST /uplink
    (gateways), POST /admin (inspectors), GET /admin/log, GET /identity, /status,
    /verdicts, /alarms, /metrics (see docs/ARCHITECTURE.md and docs/ADMIN.md).
    With --console, the inspectors' console on its own address (docs/CONSOLE.md).
    Prints "ivp recomputer: listening on http://HOST:PORT" once it accepts.
    """
    import logging

    from ivp.device import open_device
    from ivp.errors import IvpError

    if print_identity:
        from ivp.protocol.hpke import kem_public_hex

        try:
            device = open_device(device_kind, state / "device", tpm)
            key = device.public_key
            ident = {"public_key": key.hex, "keyid": key.keyid,
                     "kem_public_key": kem_public_hex(device)}
            getattr(device, "close", lambda: None)()
        except IvpError as exc:
            _fail(str(exc))
        typer.echo(json.dumps(ident))
        return
    logging.basicConfig(level=log_level.upper(), stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    if policy is None:
        _fail("--policy is required (the inspectors' quorum policy)")
    if mode not in ("exact", "tolerant"):
        _fail("--mode must be exact or tolerant")
    if shutdown_scope not in ("gateway", "model", "cluster"):
        _fail("--shutdown-scope must be gateway, model or cluster")
    from ivp.protocol.encoding import decode
    from ivp.protocol.quorum import QuorumPolicy
    from ivp.recomputer.alarms import known
    from ivp.recomputer.ingest import Rules
    from ivp.recomputer.sensors import SensorRules
    from ivp.recomputer.service import Config

    models: dict[str, Path] = {}
    for spec in model or []:
        mid, sep, directory = spec.partition("=")
        if not sep or not mid or not directory:
            _fail(f"--model {spec!r}: expected ID=DIR")
        models[mid] = Path(directory)
    from ivp.recomputer.service import DEFAULT_SHUTDOWN_ON

    kinds = set(shutdown_on or DEFAULT_SHUTDOWN_ON)
    unknown = sorted(k for k in kinds if not known(k))
    if unknown:
        _fail(f"--shutdown-on: unknown alarm kind(s) {unknown}")
    try:
        config = Config(
            state_dir=state, policy=decode(policy.read_bytes(), QuorumPolicy),
            whitelist=whitelist.read_bytes() if whitelist else None, models=models,
            workers=workers, ray_actors=ray_actors, mode=mode,  # type: ignore[arg-type]
            rules=Rules(checkpoint_period=checkpoint_period),
            sensor_rules=SensorRules(silence=3 * checkpoint_period,
                                     heartbeat=sensor_heartbeat, lone_grace=lone_grace),
            shutdown_on=frozenset(kinds), shutdown_scope=shutdown_scope,  # type: ignore[arg-type]
            batch_size=batch_size, rate_limit=rate_limit, rate_burst=rate_burst,
            health_interval=health_interval, tamper_endpoint=allow_tamper_endpoint,
            device=device_kind, tpm=tpm, require_sealed_uplink=require_sealed_uplink,
        )
        console_settings = None
        if console:
            from ivp.recomputer.console import ConsoleSettings

            token = console_token_file.read_text().strip() if console_token_file else None
            console_settings = ConsoleSettings(console_host, console_port or port + 1, token)
    except (OSError, IvpError) as exc:
        _fail(str(exc))
    run(config, host, port, console_settings)


def run(config: Any, host: str, port: int, console: Any = None) -> None:
    """Open the recomputer and serve until SIGINT/SIGTERM."""
    import asyncio
    import contextlib

    from aiohttp import web

    from ivp.errors import IvpError
    from ivp.recomputer.app import make_app
    from ivp.recomputer.service import Recomputer
    from ivp.web import bound_port, listen

    sock = listen("recomputer", host, port)  # before anything starts: a busy port exits 2
    try:
        rec = Recomputer(config)
    except IvpError as exc:
        _fail(f"recomputer refuses to start: {type(exc).__name__}: {exc}")

    async def main() -> None:
        runner = web.AppRunner(make_app(rec), handle_signals=True)
        await runner.setup()
        site = web.SockSite(runner, sock)
        await site.start()
        typer.echo(f"ivp recomputer: listening on http://{host}:{bound_port(sock)} "
                   f"(keyid {rec.identity()['keyid']})")
        shown = None
        if console is not None:
            from ivp.recomputer.console import start_console

            shown = await start_console(rec, console)
            typer.echo(f"ivp recomputer: console on {console.url}")
        try:
            await asyncio.Event().wait()
        finally:
            if shown is not None:
                await shown.cleanup()
            await runner.cleanup()

    with contextlib.suppress(KeyboardInterrupt, web.GracefulExit):
        asyncio.run(main())


# --- ivp admin -------------------------------------------------------------------------------
KeyOpt = Annotated[list[Path] | None, typer.Option(
    "--key", help="Inspector private key file, repeatable: each signs the request (its "
                  "passphrase: $IVP_KEY_PASSPHRASE_FILE, $IVP_KEY_PASSPHRASE or a prompt).")]
ExpiresOpt = Annotated[float, typer.Option(
    help="Seconds the request stays valid (at most 7 days).")]
OutOpt = Annotated[Path | None, typer.Option(
    help="Also write the signed request envelope here (e.g. for others to countersign).")]
NoSendOpt = Annotated[bool, typer.Option(
    "--no-send", help="Only build and sign (with --out); do not send.")]


def _keys(paths: list[Path] | None) -> list[Any]:
    from ivp.whitelist.keyfiles import load_signing_key

    return [load_signing_key(p) for p in paths or []]


def _send(url: str, body: bytes) -> tuple[int, Any]:
    import urllib.error
    import urllib.request

    req = urllib.request.Request(url.rstrip("/") + "/admin", data=body, method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        raw = e.read()
        try:
            return e.code, json.loads(raw)
        except ValueError:
            return e.code, {"error": {"message": raw.decode(errors="replace")}}
    except OSError as exc:
        _fail(f"cannot reach {url}: {exc}")


def _report(status: int, answer: Any) -> None:
    typer.echo(json.dumps(answer, indent=2, sort_keys=True))
    if status != 200:
        raise typer.Exit(1)


def _issue(url: str | None, instruction: str, args: dict[str, Any], key: list[Path] | None,
           expires_in: float, out: Path | None, no_send: bool) -> None:
    from ivp.errors import IvpError
    from ivp.recomputer.admin import build_request, sign_request

    if not key and not no_send:
        _fail("give at least one --key (an inspector's private key): the recomputer accepts "
              "only requests signed by a quorum of inspectors. Nothing was sent")
    try:
        request = build_request(instruction, args, expires_in)
        envelope = sign_request(request, _keys(key))
    except (IvpError, OSError) as exc:
        _fail(str(exc))
    data = envelope.to_bytes()
    if out is not None:
        out.write_bytes(data)
        typer.echo(f"wrote {out} ({len(envelope.signatures)} signature(s), nonce "
                   f"{request.nonce})", err=True)
    if no_send:
        if out is None:
            typer.echo(data.decode())
        return
    if url is None:
        _fail("a recomputer URL is needed to send (or use --no-send)")
    _report(*_send(url, data))


@admin_app.command("request")
def admin_request(
    instruction: Annotated[str, typer.Argument(help="One of the closed list: enrol_device, "
                                                    "whitelist_update, set_epsilon, "
                                                    "reboot_schedule, ack_alarm, "
                                                    "readmit_gateway, rotate_key, "
                                                    "accept_store.")],
    args: Annotated[str, typer.Option("--args", help="Arguments as a JSON object.")] = "{}",
    out: Annotated[Path, typer.Option(help="Where to write the request envelope.")
                   ] = Path("admin-request.json"),
    key: KeyOpt = None,
    expires_in: ExpiresOpt = 3600.0,
) -> None:
    """Build a request (optionally signing it) and write it to a file, unsent."""
    try:
        parsed = json.loads(args)
    except ValueError as exc:
        _fail(f"--args is not JSON: {exc}")
    if not isinstance(parsed, dict):
        _fail("--args must be a JSON object")
    _issue(None, instruction, parsed, key, expires_in, out, True)


@admin_app.command("sign")
def admin_sign(
    file: Annotated[Path, typer.Argument(help="A request envelope file.")],
    key: KeyOpt = None,
    out: Annotated[Path | None, typer.Option(help="Write here (default: in place).")] = None,
) -> None:
    """Countersign a request file with one or more inspector keys."""
    from ivp.errors import IvpError
    from ivp.protocol.envelope import Envelope
    from ivp.recomputer.admin import countersign

    if not key:
        _fail("give at least one --key")
    try:
        envelope = countersign(Envelope.from_bytes(file.read_bytes()), _keys(key))
    except (IvpError, OSError) as exc:
        _fail(str(exc))
    target = out or file
    target.write_bytes(envelope.to_bytes())
    typer.echo(f"{target}: {len(envelope.signatures)} signature(s)")


@admin_app.command("send")
def admin_send(
    url: Annotated[str, typer.Argument(help="Recomputer URL, e.g. http://127.0.0.1:8000")],
    file: Annotated[Path, typer.Argument(help="A signed request envelope file.")],
) -> None:
    """Send a signed request; prints the answer (exit 1 if refused).

    The file is checked first (a signed, unexpired admin request of the closed list):
    a broken one fails here, and nothing is sent.
    """
    from ivp.errors import IvpError
    from ivp.recomputer.admin import read_request

    try:
        data = file.read_bytes()
        read_request(data)
    except OSError as exc:
        _fail(f"{file}: {exc.strerror or exc}")
    except IvpError as exc:
        _fail(f"{file}: not a request that can be sent: {exc}. Nothing was sent")
    _report(*_send(url, data))


@admin_app.command("enrol")
def admin_enrol(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    device_id: Annotated[str, typer.Option(help="The device's id, e.g. gw-a.")] = "",
    public_key: Annotated[str, typer.Option(
        help="Its public key, from its `--print-identity` (64 hex: Ed25519; "
             "ecdsa-p256:<66 hex>: a TPM's P-256 key).")] = "",
    identity: Annotated[Path | None, typer.Option(
        help="Or: a file holding the device's `--print-identity` JSON.")] = None,
    gateway_url: Annotated[str, typer.Option(
        "--url", help="Where the gateway serves INPUT and /control.")] = "",
    kind: Annotated[str, typer.Option(help="gateway or sensor.")] = "gateway",
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """enrol_device: bind a device id to its public key (and a gateway to its URL)."""
    if identity is not None:
        public_key = json.loads(identity.read_text())["public_key"]
    if not device_id or not public_key:
        _fail("--device-id and --public-key (or --identity) are required")
    args = {"device_id": device_id, "public_key": public_key, "kind": kind}
    if gateway_url:
        args["url"] = gateway_url
    _issue(url, "enrol_device", args, key, expires_in, out, no_send)


@admin_app.command("rotate-key")
def admin_rotate_key(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    device_id: Annotated[str, typer.Option(help="The enrolled device.")] = "",
    public_key: Annotated[str, typer.Option(
        help="Its new public key (as --print-identity prints it).")] = "",
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """rotate_key: replace an enrolled device's key (old-key records refused after)."""
    _issue(url, "rotate_key", {"device_id": device_id, "public_key": public_key}, key,
           expires_in, out, no_send)


@admin_app.command("ack-alarm")
def admin_ack_alarm(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    alarm_id: Annotated[int, typer.Option(help="Alarm id (GET /alarms).")] = 0,
    note: Annotated[str, typer.Option(help="Why it is acknowledged.")] = "",
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """ack_alarm: acknowledge an alarm (it stays stored, marked with this request)."""
    _issue(url, "ack_alarm", {"alarm_id": alarm_id, "note": note}, key, expires_in, out,
           no_send)


@admin_app.command("accept-store")
def admin_accept_store(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    device_counter: Annotated[int, typer.Option(
        help="The device counter the store_rolled_back alarm names (GET /alarms).")] = -1,
    note: Annotated[str, typer.Option(help="Why the store is accepted as it stands.")] = "",
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """accept_store: trust a set-back store again as it stands (after store_rolled_back;
    what the missing commits held is lost: enrol, rotate keys or shut down again as
    needed)."""
    if device_counter < 0:
        _fail("--device-counter is required: the value the store_rolled_back alarm names")
    _issue(url, "accept_store", {"device_counter": device_counter, "note": note}, key,
           expires_in, out, no_send)


@admin_app.command("readmit")
def admin_readmit(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    gateway_id: Annotated[str, typer.Option(help="The shut-down gateway.")] = "",
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """readmit_gateway: route to a shut-down gateway again after its next fresh BOOT."""
    _issue(url, "readmit_gateway", {"gateway_id": gateway_id}, key, expires_in, out, no_send)


@admin_app.command("set-epsilon")
def admin_set_epsilon(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    epsilon: Annotated[float, typer.Option(help="Audit probability ε in (0, 1].")] = 0.01,
    model_id: Annotated[str | None, typer.Option(help="Only for this model.")] = None,
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """set_epsilon: the ε gateways must declare in BOOT (else epsilon_mismatch)."""
    args: dict[str, Any] = {"epsilon": epsilon}
    if model_id:
        args["model_id"] = model_id
    _issue(url, "set_epsilon", args, key, expires_in, out, no_send)


@admin_app.command("reboot-schedule")
def admin_reboot_schedule(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    interval_s: Annotated[float, typer.Option(help="Seconds between forced reboots.")
                          ] = 86400.0,
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """reboot_schedule: boots older than 1.5 x this raise reboot_overdue."""
    _issue(url, "reboot_schedule", {"interval_s": interval_s}, key, expires_in, out, no_send)


@admin_app.command("whitelist-update")
def admin_whitelist_update(
    url: Annotated[str | None, typer.Argument(help="Recomputer URL.")] = None,
    whitelist: Annotated[Path | None, typer.Option(
        help="The new signed whitelist envelope (version above the installed one).")] = None,
    key: KeyOpt = None, expires_in: ExpiresOpt = 3600.0, out: OutOpt = None,
    no_send: NoSendOpt = False,
) -> None:
    """whitelist_update: install a newer quorum-signed whitelist."""
    if whitelist is None:
        _fail("--whitelist is required")
    _issue(url, "whitelist_update", {"whitelist": json.loads(whitelist.read_bytes())}, key,
           expires_in, out, no_send)


@admin_app.command("log")
def admin_log(
    url: Annotated[str, typer.Argument(help="Recomputer URL.")],
) -> None:
    """Fetch the admin log, check its hash chain, print it (exit 1 if broken)."""
    import urllib.request

    from ivp.errors import ChainError
    from ivp.protocol.encoding import canonical
    from ivp.recomputer.admin import AdminLogEntry, verify_log

    with urllib.request.urlopen(url.rstrip("/") + "/admin/log", timeout=30) as r:
        answer = json.loads(r.read())
    rows = []
    for e in answer["entries"]:
        digest = e.pop("hash")
        raw = canonical(AdminLogEntry(**e))
        rows.append((e["seq"], raw, digest))
    try:
        head = verify_log(rows)
    except ChainError as exc:
        _fail(f"admin log is broken: {exc}")
    for e in answer["entries"]:
        typer.echo(f"{e['seq']:>5} {'ACCEPTED' if e['accepted'] else 'refused '} "
                   f"{e['instruction'] or '-':<17} {e['reason']}")
    typer.echo(f"chain ok: {len(rows)} entries, head {head}")
