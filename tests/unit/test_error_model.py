"""One error model: domains raise typed, HTTP-free errors; gateway/errors.py alone maps them to a
status and OpenAI's shape. Also: name patterns never accept a trailing newline."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import ValidationError

from gateway.api.admin_experiments import CreateExperiment
from gateway.domain_errors import DomainError
from gateway.errors import DOMAIN_ERRORS, APIError, PayloadTooLargeError, install_error_handlers, register_domain_error
from gateway.experiments import errors as experiment_errors
from gateway.settings import Settings
from test_api_errors import assert_error


class JobError(DomainError):
    pass


class JobMissing(JobError):
    pass


class Unmapped(DomainError):
    pass


def app_raising(exc: Exception) -> TestClient:
    app = FastAPI()
    install_error_handlers(app)

    @app.get("/boom")
    async def boom():
        raise exc

    return TestClient(app, raise_server_exceptions=False)


def test_a_domain_registers_its_errors_after_the_handlers_were_installed():
    client = app_raising(JobMissing("no job 'j1'", param="job_id"))
    register_domain_error(JobError, 404, "not_found_error", "job_not_found", retry_after=None)
    try:
        error = assert_error(client.get("/boom"), 404, type_="not_found_error", code="job_not_found",
                             param="job_id")  # the subclass takes its base's row
        assert error["message"] == "no job 'j1'"
        register_domain_error(JobMissing, 429, "rate_limit_error", "busy", retry_after=3)
        response = client.get("/boom")
        assert_error(response, 429, type_="rate_limit_error", code="busy")
        assert response.headers["retry-after"] == "3"
    finally:
        DOMAIN_ERRORS.pop(JobError, None)
        DOMAIN_ERRORS.pop(JobMissing, None)


def test_an_unmapped_domain_error_is_a_shaped_500():
    assert_error(app_raising(Unmapped("x")).get("/boom"), 500, type_="server_error", code="internal_error")


@pytest.mark.parametrize("cls", sorted(DOMAIN_ERRORS, key=lambda c: c.__name__), ids=lambda c: c.__name__)
def test_every_mapped_error_renders_in_openai_shape(cls):
    exc = cls("something went wrong")  # every mapped error takes its message alone
    spec = DOMAIN_ERRORS[cls]
    assert_error(app_raising(exc).get("/boom"), spec.status, type_=spec.type, code=spec.code)


def test_experiment_errors_carry_nothing_http():
    for name in dir(experiment_errors):
        cls = getattr(experiment_errors, name)
        if isinstance(cls, type) and issubclass(cls, Exception) and cls.__module__ == experiment_errors.__name__:
            assert issubclass(cls, DomainError) and not issubclass(cls, APIError)
            assert not {"status", "code", "type"} & set(vars(cls)), cls
            assert cls in DOMAIN_ERRORS or cls is experiment_errors.ExperimentError


def test_payload_too_large_is_one_413():
    error = assert_error(app_raising(PayloadTooLargeError.over(10)).get("/boom"), 413, code="payload_too_large")
    assert "10 bytes" in error["message"]


# ---- patterns: "$" must not accept "name\n" -------------------------------------------------------
@pytest.mark.parametrize("fields", [
    {"name": "exp\n"}, {"name": "exp", "stickiness": "header", "subject_header": "x-session\n"},
])
def test_experiment_names_refuse_a_trailing_newline(fields):
    arms = [{"name": "a", "weight": 1}, {"name": "b", "weight": 1}]
    CreateExperiment(**{"name": "exp", "arms": arms})  # the valid form passes
    with pytest.raises(ValidationError):
        CreateExperiment(**{"arms": arms, **fields})


def test_subject_header_setting_refuses_a_trailing_newline():
    with pytest.raises(ValidationError):
        Settings(experiment_subject_header="x-session-id\n")


def test_duplicate_key_names_or_keys_are_refused():
    with pytest.raises(ValidationError):
        Settings(api_keys='[{"key": "k1", "name": "a"}, {"key": "k2", "name": "a"}]')
    with pytest.raises(ValidationError):
        Settings(api_keys="k1,k1")
