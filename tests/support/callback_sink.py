"""The cheapest receiver of the sandbox's callbacks: answers 204 to every POST and counts them.

`python -m tests.support.callback_sink PORT` serves until SIGTERM; GET /count says how many came.
"""

from __future__ import annotations

import sys

from aiohttp import web


def build_sink() -> web.Application:
    received = [0]

    async def take(request: web.Request) -> web.Response:
        await request.read()
        received[0] += 1
        return web.Response(status=204)

    async def count(request: web.Request) -> web.Response:
        return web.json_response({"received": received[0]})

    app = web.Application()
    app.router.add_get("/count", count)
    app.router.add_post("/{tail:.*}", take)
    return app


if __name__ == "__main__":
    port = int(sys.argv[1])
    print(f"callback sink listening on http://127.0.0.1:{port}", flush=True)
    web.run_app(build_sink(), host="127.0.0.1", port=port, access_log=None, print=None)
