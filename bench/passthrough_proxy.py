"""The floor under any Python gateway: a proxy on the gateway's own stack that does
nothing but forward.

The same aiohttp server the gateway runs and the gateway's keep-alive upstream client
(``ivp.gateway.upstream``), forwarding each POST body to the server and its answer
back: no parsing, tokenising, tagging, logging, sealing or sampling. What this costs
per request is what a Python datapath pays before it does any of the gateway's work;
``bench/gateway_overhead.py --python-floor`` measures it beside the gateway and nginx.

    .venv/bin/python bench/passthrough_proxy.py --port P --upstream http://127.0.0.1:S
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))


def main(argv: list[str] | None = None) -> None:
    from aiohttp import web

    from ivp.gateway.upstream import HttpUpstream

    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--upstream", required=True, help="the server's base URL")
    args = parser.parse_args(argv)
    upstream = HttpUpstream(args.upstream)

    async def forward(request: web.Request) -> web.Response:
        status, body = await upstream.post(request.path, await request.read())
        return web.Response(status=status, body=body, content_type="application/json")

    async def health(_: web.Request) -> web.Response:
        status, body = await upstream.get("/health")
        return web.Response(status=status, body=body, content_type="application/json")

    app = web.Application()
    app.router.add_post("/{path:.*}", forward)
    app.router.add_get("/health", health)
    web.run_app(app, host="127.0.0.1", port=args.port, print=None, access_log=None)


if __name__ == "__main__":
    main()
