"""Starting the fleet without starting it: ``serve --replicas N`` hands over to the Ray runner (1
keeps the single process), the application builder's settings, and its refusals."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest

from gateway import cli
from gateway.settings import Settings

pytest.importorskip("ray")


def test_serve_with_two_replicas_runs_the_fleet_and_one_replica_does_not(monkeypatch, tmp_path: Path):
    import gateway.fleet.app as fleet_app

    started: list[Settings] = []
    monkeypatch.setattr(fleet_app, "run_fleet", started.append)
    cli.main(["serve", "--replicas", "2", "--data-dir", str(tmp_path), "--ray-address", "auto"])
    assert len(started) == 1 and started[0].replicas == 2 and started[0].ray_address == "auto"

    single: list[object] = []
    import gateway.exposure

    # the one-process path checks exposure before anything: stop it there
    monkeypatch.setattr(gateway.exposure, "check_exposure", lambda s: single.append(s) or "single process")
    with pytest.raises(SystemExit, match="single process"):
        cli.main(["serve", "--data-dir", str(tmp_path)])
    assert len(started) == 1 and single[0].replicas == 1  # the one-process path, unchanged


def test_fleet_settings_share_one_admin_key_resolved_where_the_fleet_starts(tmp_path: Path):
    from gateway.fleet.app import fleet_settings

    first = fleet_settings(Settings(data_dir=tmp_path, replicas=2))
    again = fleet_settings(Settings(data_dir=tmp_path, replicas=2))
    assert first.admin_key and first.admin_key == again.admin_key  # generated once into DATA_DIR/admin_key
    assert (tmp_path / "admin_key").read_text().strip() == first.admin_key
    chosen = "operator-chosen-admin-key-0123"
    assert fleet_settings(Settings(data_dir=tmp_path, admin_key=chosen)).admin_key == chosen


def test_replica_gpus_follow_the_device():
    from gateway.fleet.app import replica_gpus

    assert replica_gpus(Settings(device="cpu")) == 0
    assert replica_gpus(Settings(device="cuda")) == 1
    assert replica_gpus(Settings(device="cuda", replica_num_gpus=0.5)) == 0.5


def test_build_app_refuses_an_open_v1_beyond_loopback_and_builds_otherwise(tmp_path: Path):
    from ray.serve import Application

    from gateway.fleet.app import build_app

    with pytest.raises(ValueError, match="without an inference key"):
        build_app({"host": "0.0.0.0", "data_dir": str(tmp_path)})
    app = build_app({"host": "0.0.0.0", "api_keys": "k-0123456789abcdef", "replicas": 2, "data_dir": str(tmp_path)})
    assert isinstance(app, Application)


def test_replica_data_dirs_are_distinct(tmp_path: Path):
    from gateway.fleet.replica import replica_data_dir

    assert replica_data_dir(tmp_path, 0) != replica_data_dir(tmp_path, 1)
    assert replica_data_dir(tmp_path, 1).parent == tmp_path


PG = "postgresql://gateway@127.0.0.1:1/gateway"  # never reached: the checks below refuse first or need none


def test_a_fleet_on_postgresql_without_a_shared_store_is_refused(tmp_path: Path):
    from gateway.fleet.app import FleetConfigError, build_fleet

    unshared = Settings(data_dir=tmp_path, replicas=2, database_url=PG)
    with pytest.raises(FleetConfigError, match="needs shared_store_url"):
        build_fleet(unshared)
    with pytest.raises(SystemExit, match="refusing to start: .*needs shared_store_url"):
        cli.main(["serve", "--replicas", "2", "--data-dir", str(tmp_path), "--database-url", PG])
    (tmp_path / "shared").mkdir()
    build_fleet(unshared.model_copy(update={"shared_store_url": str(tmp_path / "shared")}))  # builds
    build_fleet(Settings(data_dir=tmp_path, database_url=PG))  # one replica: nothing to share


def test_a_fleet_on_sqlite_starts_with_a_warning_that_admin_writes_stay_on_one_replica(tmp_path: Path, caplog):
    from gateway.fleet.app import build_fleet

    with caplog.at_level("WARNING", logger="gateway.fleet.app"):
        build_fleet(Settings(data_dir=tmp_path, replicas=2))
    assert "exists on ONE replica only" in caplog.text
    caplog.clear()
    with caplog.at_level("WARNING", logger="gateway.fleet.app"):
        build_fleet(Settings(data_dir=tmp_path, replicas=2, database_url=PG, shared_store_url=str(tmp_path)))
    assert "ONE replica" not in caplog.text


def test_a_local_fleet_whose_database_or_store_is_unusable_is_refused_before_ray_starts(monkeypatch, tmp_path: Path):
    import gateway.fleet.app as fleet_app

    started: list[Settings] = []
    monkeypatch.setattr(fleet_app, "run_fleet", started.append)
    (tmp_path / "shared").mkdir()
    with pytest.raises(SystemExit, match="refusing to start"):  # nothing listens on port 1
        cli.main(["serve", "--replicas", "2", "--data-dir", str(tmp_path), "--database-url", PG,
                  "--shared-store-url", str(tmp_path / "shared"), "--database-timeout-seconds", "1"])
    with pytest.raises(SystemExit, match="refusing to start: the shared folder .* does not exist"):  # a missing mount
        cli.main(["serve", "--replicas", "2", "--data-dir", str(tmp_path), "--shared-store-url",
                  str(tmp_path / "not-mounted")])
    assert started == []



class _Version:
    def __init__(self, number: int):
        self.id = self.name = "a"
        self.number = number


class _Registry:
    """What ``Residency`` uses of the registry: lookup by id, and the tiers' ``release_device``."""

    def __init__(self, entries: dict):
        self.entries = entries
        self.released: list[int] = []
        self.tiers = self

    def __contains__(self, adapter_id: str) -> bool:
        return adapter_id in self.entries

    def get(self, adapter_id: str):
        return self.entries[adapter_id]

    async def release_device(self, entry) -> bool:
        self.released.append(entry.number)
        return True


def test_serve_evicting_a_replaced_adapter_frees_its_current_version_too():
    """The multiplexed id was loaded as version 1, then replaced: when Serve stops routing the id
    here, the slot of the version now served (2) is given back too."""
    import asyncio

    from gateway.fleet.replica import Residency

    loaded = _Version(1)
    registry = _Registry({"a": _Version(2)})
    asyncio.run(Residency(registry, loaded).release())
    assert registry.released == [1, 2]
    registry = _Registry({})  # deleted meanwhile: only the version that was loaded
    asyncio.run(Residency(registry, loaded).release())
    assert registry.released == [1]
    registry = _Registry({"a": loaded})  # not replaced: released once
    asyncio.run(Residency(registry, loaded).release())
    assert registry.released == [1]


class _Stopped:
    """``threading.Event`` for ``run_fleet``: already set, so the fleet stops as soon as it started."""

    def set(self) -> None:
        pass

    def wait(self) -> bool:
        return True


@pytest.mark.parametrize(("trusted", "allowed"), [([], ""), (["10.0.0.0/8", "192.0.2.7"], "10.0.0.0/8,192.0.2.7")])
def test_the_fleet_starts_serves_proxies_believing_only_the_trusted_proxies(monkeypatch, tmp_path: Path, trusted,
                                                                            allowed):
    """Serve's HTTP proxy runs uvicorn with proxy headers on, believing X-Forwarded-For from
    127.0.0.1 unless FORWARDED_ALLOW_IPS says otherwise: the fleet sets it, for the proxies the
    Serve controller starts, to trusted_proxies (empty: none believed, as in one process)."""
    import ray
    from ray import serve

    import gateway.fleet.app as fleet_app

    started: list[dict] = []
    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(serve, "start", lambda **kwargs: started.append(kwargs))
    for name in ("run", "delete", "shutdown"):
        monkeypatch.setattr(serve, name, lambda *args, **kwargs: None)
    monkeypatch.setattr(fleet_app, "build_fleet", lambda settings: None)
    monkeypatch.setattr(fleet_app, "threading", SimpleNamespace(Event=_Stopped))
    monkeypatch.setattr(fleet_app, "signal", SimpleNamespace(signal=lambda *args: None, SIGTERM=15, SIGINT=2))
    fleet_app.run_fleet(Settings(model=str(tmp_path), data_dir=tmp_path, replicas=2, trusted_proxies=trusted))
    assert started[0]["controller_options"] == {"runtime_env": {"env_vars": {"FORWARDED_ALLOW_IPS": allowed}}}
