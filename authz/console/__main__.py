"""`python -m authz.console`: run the console's backend-for-frontend until SIGTERM/SIGINT."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from datetime import timedelta

import aiohttp
import grpc
from aiohttp import web

from authz.console.keyapi import KeyApi
from authz.console.oidc import OidcFlow
from authz.console.sessions import SessionStore
from authz.console.settings import ConsoleSettings, add_flags, load_console_settings
from authz.console.web import Console, build_app
from authz.identity import IdentityVerifier
from authz.logs import configure_logging
from authz.settings import SettingsError
from authz.store.base import utc_now

log = logging.getLogger("authz.console")


async def serve(settings: ConsoleSettings) -> int:
    """The composition root of the console process."""
    timeout_s = settings.console_timeout_ms / 1000
    async with (
        aiohttp.ClientSession() as http,
        grpc.aio.insecure_channel(settings.console_key_api) as channel,
    ):
        console = Console(
            settings=settings,
            sessions=SessionStore(
                clock=utc_now, max_age=timedelta(seconds=settings.console_session_ttl_s)
            ),
            flow=OidcFlow(
                http=http,
                clients={c.issuer: c for c in settings.console_clients},
                redirect_uri=settings.redirect_uri,
                timeout_s=timeout_s,
            ),
            keys=KeyApi(channel, timeout_s=timeout_s),
            verifier=IdentityVerifier(
                settings.jwt_issuers, jwks_timeout_s=settings.jwks_timeout_ms / 1000
            ),
            clock=utc_now,
        )
        runner = web.AppRunner(build_app(console), access_log=None)
        await runner.setup()
        host, _, port = settings.console_addr.rpartition(":")
        try:
            await web.TCPSite(runner, host.strip("[]"), int(port)).start()
        except OSError as error:
            await runner.cleanup()
            sys.stderr.write(
                f"cannot listen on AUTHZ_CONSOLE_ADDR={settings.console_addr}: {error}\n"
            )
            return 2
        log.info(
            "console on %s (public %s), key API %s, %d sign-in provider(s)",
            settings.console_addr,
            settings.console_public_url,
            settings.console_key_api,
            len(settings.console_clients),
        )
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m authz.console", description=__doc__)
    add_flags(parser)
    args = parser.parse_args(argv)
    try:
        settings = load_console_settings(os.environ, args)
    except SettingsError as error:
        sys.stderr.write(f"{error}\n")
        return 2
    configure_logging("info", "text")
    return asyncio.run(serve(settings))


if __name__ == "__main__":
    sys.exit(main())
