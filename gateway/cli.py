"""``adapter-gateway`` command line: ``serve`` starts the HTTP server.

Every setting is a flag (``--max-batch-size 16``) and an environment variable
(``GATEWAY_MAX_BATCH_SIZE=16``); flags win."""

from __future__ import annotations

import argparse
import logging
import sys

from pydantic import ValidationError

from gateway.settings import Settings


def _add_setting_flags(parser: argparse.ArgumentParser) -> None:
    for name, field in Settings.model_fields.items():
        flag = "--" + name.replace("_", "-")
        parser.add_argument(flag, dest=name, default=None, metavar=name.upper(),
                            help=f"{field.description} (env GATEWAY_{name.upper()})")


def _settings(args: argparse.Namespace) -> Settings:
    overrides = {k: v for k, v in vars(args).items() if k in Settings.model_fields and v is not None}
    try:
        return Settings(**overrides)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'settings'}: {e['msg']}" for e in exc.errors())
        sys.exit(f"adapter-gateway: invalid settings: {problems}")


def serve(settings: Settings) -> None:
    import uvicorn

    from gateway.app import create_app

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    uvicorn.run(create_app(settings), host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                timeout_graceful_shutdown=30)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adapter-gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="start the OpenAI-compatible server")
    _add_setting_flags(serve_parser)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(_settings(args))


if __name__ == "__main__":
    main()
