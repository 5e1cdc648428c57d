"""``adapter-gateway`` command line: ``serve`` starts the HTTP server; ``train`` trains an adapter offline.

Every setting is a flag (``--max-batch-size 16``) and an environment variable
(``GATEWAY_MAX_BATCH_SIZE=16``); flags win."""

from __future__ import annotations

import argparse
import logging
import sys
from typing import TYPE_CHECKING

from pydantic import ValidationError

from gateway.settings import EMBEDDED_MODEL, Settings

if TYPE_CHECKING:  # imported where used: the CLI starts (and answers --help) without them
    import uvicorn
    from fastapi import FastAPI

    from gateway.connections import ConnectionBook


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
    from adapters.kinds.lora_kernel import check_lora_kernel
    from adapters.shared_store import SharedStoreError
    from adapters.sql import DatabaseUnavailableError
    from adapters.store import DatabaseUnusableError
    from gateway.app import check_data_dir, create_app
    from gateway.base_model import ModelLoadError, compute_dtype, context_window_of, pick_device, read_model_config
    from gateway.connections import ConnectionBook, ShortRequestTargets, connection_limits, ensure_file_descriptors
    from gateway.database.migrations import SchemaTooNewError
    from gateway.engines import check_kv_pool, check_paged_attention
    from gateway.exposure import check_exposure
    from gateway.shared_storage import open_shared_store
    from gateway.shutdown import GatewayServer

    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    problem = check_exposure(settings)
    if problem is not None:
        sys.exit(f"adapter-gateway: {problem}")
    if settings.replicas >= 2:  # a Ray Serve fleet; each replica checks its own data dir
        from gateway.fleet.app import FleetConfigError, check_fleet_state, run_fleet

        try:
            check_fleet_state(settings)
            if settings.ray_address is None:  # replicas on this machine: their database and store are ours
                if settings.database_url is not None:
                    check_data_dir(settings)  # reachable, schema migrated once before the replicas start
                open_shared_store(settings)
        except (FleetConfigError, DatabaseUnavailableError, SchemaTooNewError, SharedStoreError) as exc:
            sys.exit(f"adapter-gateway: refusing to start: {exc}")
        run_fleet(settings)
        return
    try:
        check_data_dir(settings)
    except (DatabaseUnusableError, DatabaseUnavailableError, SchemaTooNewError) as exc:
        sys.exit(f"adapter-gateway: refusing to start: {exc}")
    try:  # before the model loads
        device = pick_device(settings.device)
        check_lora_kernel(settings.lora_kernel, device)
        pool_set = settings.kv_cache_tokens is not None or settings.kv_cache_bytes is not None
        if settings.model != EMBEDDED_MODEL or pool_set:  # the embedded model's config takes seconds to read
            config = read_model_config(settings)  # a wrong model path is said here, not as a traceback
            check_kv_pool(settings, config, compute_dtype(device), context_window_of(config))
            check_paged_attention(settings, config, context_window_of(config))
    except (ModelLoadError, ValueError) as exc:
        sys.exit(f"adapter-gateway: refusing to start: {exc}")
    try:
        open_shared_store(settings)  # before the model loads: a wrong bucket or mount fails fast
    except SharedStoreError as exc:
        sys.exit(f"adapter-gateway: refusing to start: {exc}")
    connections = ConnectionBook(connection_limits(settings))
    ensure_file_descriptors(settings.max_connections)
    app = create_app(settings, connections=connections)
    config = server_config(app, settings, connections)
    logging.getLogger("uvicorn.access").addFilter(ShortRequestTargets())  # after Config set up uvicorn's logging
    GatewayServer(config, lambda: getattr(app.state, "gateway", None), settings.shutdown_grace_seconds).run()


def server_config(app: FastAPI, settings: Settings, connections: ConnectionBook) -> uvicorn.Config:
    """uvicorn's configuration for the gateway's app."""
    import uvicorn

    from gateway.connections import guarded_protocol

    # the drain (shutdown_grace_seconds) ends every request first; the rest is sending the last bytes;
    # no WebSocket upgrades (no route takes one, and an upgraded connection would leave the book);
    # X-Forwarded-* believed from the configured proxies only (uvicorn's default believes 127.0.0.1)
    return uvicorn.Config(app, host=settings.host, port=settings.port, log_level=settings.log_level.lower(),
                          timeout_graceful_shutdown=5, http=guarded_protocol(connections), ws="none",
                          proxy_headers=bool(settings.trusted_proxies),
                          forwarded_allow_ips=",".join(settings.trusted_proxies) or None)


TRAIN_SETTINGS = ("model", "device", "quantization", "chat_template", "data_dir", "dummy_weights", "max_lora_rank",
                  "max_virtual_tokens", "max_adapter_bytes", "max_training_dataset_bytes",
                  "max_training_dataset_lines", "log_level")
TRAIN_SERVER_ONLY = ("adapter_id", "register_adapter", "register_only_if_improved")


def _add_train_flags(parser: argparse.ArgumentParser) -> None:
    from pathlib import Path

    from adapters.training.config import TrainingConfig

    parser.add_argument("--data", type=Path, required=True, help="JSONL dataset (chat, prompt/completion or instruction)")
    parser.add_argument("--out", type=Path, required=True, help="folder for the PEFT adapter")
    parser.add_argument("--config", dest="config_file", type=Path, help="JSON file with any training config fields")
    for name, field in TrainingConfig.model_fields.items():
        if name not in TRAIN_SERVER_ONLY:
            parser.add_argument("--" + name.replace("_", "-"), dest="train_" + name, default=None,
                                metavar=name.upper(), help=field.description)
    for name in TRAIN_SETTINGS:
        field = Settings.model_fields[name]
        parser.add_argument("--" + name.replace("_", "-"), dest=name, default=None, metavar=name.upper(),
                            help=f"{field.description} (env GATEWAY_{name.upper()})")


def train(args: argparse.Namespace) -> None:
    import json

    from gateway.training.offline import TrainingFailed, config_from_flags, train_offline

    settings = _settings(args)
    logging.basicConfig(level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    values = {k[len("train_"):]: v for k, v in vars(args).items() if k.startswith("train_")}
    try:
        config = config_from_flags(values, args.config_file)
        summary = train_offline(settings, args.data, config, args.out)
    except ValidationError as exc:
        problems = "; ".join(f"{'.'.join(map(str, e['loc'])) or 'config'}: {e['msg']}" for e in exc.errors())
        sys.exit(f"adapter-gateway train: invalid config: {problems}")
    except TrainingFailed as exc:
        sys.exit(f"adapter-gateway train: {exc}")
    print(json.dumps(summary, indent=2))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="adapter-gateway", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)
    serve_parser = commands.add_parser("serve", help="start the OpenAI-compatible server")
    _add_setting_flags(serve_parser)
    train_parser = commands.add_parser("train", help="train an adapter offline with the gateway's trainer")
    _add_train_flags(train_parser)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(_settings(args))
    elif args.command == "train":
        train(args)


if __name__ == "__main__":
    main()
