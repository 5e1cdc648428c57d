"""OpenAI's files and fine-tuning API, driven by the official ``openai`` SDK against the app on a
tiny random Llama: upload (validated, line-numbered errors), a job from file to a served ``ft:``
model, pagination, events, checkpoints, cancel, errors in OpenAI's shape, the admin key, and the
admin API seeing the same jobs."""

from __future__ import annotations

import asyncio
import collections
import io
import json
import time

import httpx
import openai
import pytest
from gateway.files.service import sanitize_filename
from test_training_api import ADMIN, MESSAGES, jsonl, make_client, rows

ADMIN_KEY = ADMIN["Authorization"].split()[1]


def chats(n: int = 8) -> list[dict]:
    return [{"messages": [{"role": "user", "content": f"the quick fox {i}"},
                          {"role": "assistant", "content": "how are you?"}]} for i in range(n)]


def preference(n: int = 2) -> list[dict]:
    return [{"input": {"messages": [{"role": "user", "content": f"question {i}"}]},
             "preferred_output": [{"role": "assistant", "content": '{"answer": 1}'}],
             "non_preferred_output": [{"role": "assistant", "content": "the answer is one"}]} for i in range(n)]


@pytest.fixture
def client(tmp_path):
    with make_client(tmp_path) as c:
        yield c


def sdk(client, key: str = ADMIN_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{client.base_url}/v1", api_key=key, http_client=client, max_retries=0)


def upload(api: openai.OpenAI, records, name: str = "train.jsonl"):
    return api.files.create(file=(name, io.BytesIO(jsonl(records))), purpose="fine-tune")


def wait_job(api: openai.OpenAI, job_id: str, predicate, timeout: float = 120.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        job = api.fine_tuning.jobs.retrieve(job_id)
        if predicate(job):
            return job
        time.sleep(0.05)
    raise AssertionError(f"the job never reached the expected state: {job}")


def test_files_upload_list_retrieve_content_delete(client):
    api = sdk(client)
    first = upload(api, chats(), name="../../etc/passwd.jsonl")
    assert first.object == "file" and first.id.startswith("file-") and first.purpose == "fine-tune"
    assert first.bytes == len(jsonl(chats())) and first.status == "processed"
    assert first.filename == "passwd.jsonl"  # metadata only: never a path
    second = upload(api, preference())
    listed = api.files.list()
    assert sorted(f.id for f in listed.data) == sorted([first.id, second.id])
    assert api.files.retrieve(first.id).bytes == first.bytes
    assert api.files.content(first.id).read() == jsonl(chats())
    assert api.files.delete(first.id).deleted is True
    with pytest.raises(openai.NotFoundError) as missing:
        api.files.retrieve(first.id)
    assert missing.value.body["code"] == "file_not_found"
    assert [f.id for f in api.files.list().data] == [second.id]


def test_filenames_are_sanitized_metadata():
    assert sanitize_filename("..\\..\\boot.ini") == "boot.ini"
    assert sanitize_filename("a\x00b\x07c\n.jsonl") == "abc.jsonl"
    assert sanitize_filename("x" * 300 + ".jsonl") == "x" * 255
    assert sanitize_filename("../..") == "upload.jsonl" and sanitize_filename(None) == "upload.jsonl"


def test_bad_uploads_get_clear_400s_with_line_numbers(client):
    api = sdk(client)
    with pytest.raises(openai.BadRequestError) as bad_purpose:
        api.files.create(file=("a.jsonl", io.BytesIO(jsonl(chats()))), purpose="assistants")
    assert bad_purpose.value.body["param"] == "purpose" and "fine-tune" in bad_purpose.value.body["message"]
    cases = {
        "line 2: not valid JSON": [chats(1)[0], "{oops"],
        "line 3: messages[0]: unknown role": [*chats(2), {"messages": [{"role": "robot", "content": "x"}]}],
        "line 2: field 'non_preferred_output' must hold exactly one": [
            *preference(1), {**preference(1)[0], "non_preferred_output": []}],
        "line 1: preferred_output[0]: role must be 'assistant'": [
            {**preference(1)[0], "preferred_output": [{"role": "user", "content": "x"}]}],
    }
    for expected, records in cases.items():
        with pytest.raises(openai.BadRequestError) as error:
            upload(api, records)
        assert expected in error.value.body["message"] and error.value.body["param"] == "file", error.value.body
    assert api.files.list().data == []


def test_admin_key_required(client):
    with pytest.raises(openai.AuthenticationError):
        sdk(client, key="not-the-admin-key").files.list()
    assert client.get("/v1/fine_tuning/jobs").status_code == 401
    assert client.get("/v1/files", headers=ADMIN).status_code == 200


def test_file_size_limit_comes_from_settings(tmp_path):
    with make_client(tmp_path) as client:
        client.app.state.gateway.files.limits = type(client.app.state.gateway.files.limits)(
            max_bytes=300, max_lines=10, max_line_bytes=1 << 20, max_files=2)
        api = sdk(client)
        with pytest.raises(openai.APIStatusError) as too_big:
            upload(api, chats(8))
        assert too_big.value.status_code == 413 and too_big.value.body["param"] == "file"
        upload(api, chats(1))
        upload(api, chats(1))
        with pytest.raises(openai.BadRequestError) as too_many:
            upload(api, chats(1))
        assert "limit 2" in too_many.value.body["message"]


def test_job_from_file_to_served_ft_model(client):
    api = sdk(client)
    training = upload(api, chats())
    validation = upload(api, chats(2), name="valid.jsonl")
    job = api.fine_tuning.jobs.create(
        model="tiny", training_file=training.id, validation_file=validation.id, suffix="fox", seed=7,
        metadata={"team": "search"},
        method={"type": "supervised", "supervised": {"hyperparameters": {
            "n_epochs": 2, "batch_size": 4, "learning_rate_multiplier": "auto"}}},
        extra_body={"adapter": {"kind": "lora", "r": 4}})
    assert job.object == "fine_tuning.job" and job.status in ("queued", "running")
    assert job.training_file == training.id and job.validation_file == validation.id
    assert job.seed == 7 and job.metadata == {"team": "search"} and job.fine_tuned_model is None
    assert job.method.supervised.hyperparameters.n_epochs == 2
    assert job.method.supervised.hyperparameters.learning_rate_multiplier == 1.0  # "auto" resolved
    with pytest.raises(openai.ConflictError) as busy:  # a job that has not ended uses the file
        api.files.delete(training.id)
    assert busy.value.body["code"] == "file_in_use"

    done = wait_job(api, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    assert done.fine_tuned_model == f"ft:tiny:fox:{job.id}" and done.trained_tokens > 0
    assert done.model_extra["adapter"] == {"kind": "lora", "r": 4}

    events = api.fine_tuning.jobs.list_events(job.id, limit=100).data
    metrics = [e for e in events if e.type == "metrics"]
    steps = [e.data["step"] for e in metrics if e.data.get("train_loss") is not None]
    assert sorted(steps) == [1, 2, 3, 4]  # 8 examples / batch 4 x 2 epochs
    assert [e.data["step"] for e in metrics if "valid_loss" in e.data] in ([4, 0], [0, 4])  # before and after
    assert events[0].message == "The job has successfully completed"  # newest first
    assert any(done.fine_tuned_model in e.message for e in events)
    page = api.fine_tuning.jobs.list_events(job.id, limit=2)
    assert len(page.data) == 2 and page.has_more
    after = api.fine_tuning.jobs.list_events(job.id, limit=2, after=page.data[-1].id)
    assert after.data[0].id == events[2].id

    checkpoints = api.fine_tuning.jobs.checkpoints.list(job.id).data
    assert [c.step_number for c in checkpoints] == [4]
    assert checkpoints[0].fine_tuned_model_checkpoint == f"{done.fine_tuned_model}:ckpt-step-4"

    for model in (done.fine_tuned_model, checkpoints[0].fine_tuned_model_checkpoint):
        reply = api.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].message.content is not None and reply.model == model
    assert done.fine_tuned_model in {m.id for m in api.models.list().data}
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model=f"ft:tiny:fox:{job.id}x", messages=MESSAGES, max_tokens=4)

    # one job store: the admin API sees the same job and the adapter it registered
    admin = client.get(f"/admin/training-jobs/{job.id}", headers=ADMIN).json()
    assert admin["state"] == "succeeded" and admin["adapter_id"] == job.id

    # continue training the result: model names it (its ft: name or its adapter id)
    follow = api.fine_tuning.jobs.create(model=done.fine_tuned_model, training_file=training.id,
                                         hyperparameters={"n_epochs": 1})
    assert follow.model == done.fine_tuned_model and follow.model_extra["adapter"] == {
        "kind": "lora", "init_adapter": job.id}
    follow_done = wait_job(api, follow.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert follow_done.status == "succeeded", follow_done.error
    assert follow_done.fine_tuned_model == f"ft:tiny::{follow.id}"
    reply = api.chat.completions.create(model=follow_done.fine_tuned_model, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content is not None
    with pytest.raises(openai.BadRequestError) as with_adapter:
        api.fine_tuning.jobs.create(model=job.id, training_file=training.id, extra_body={"adapter": {"kind": "ia3"}})
    assert with_adapter.value.body["param"] == "adapter"
    assert api.files.delete(training.id).deleted  # the jobs ended: the file may go


def test_list_pagination_and_admin_jobs_show_here(client):
    api = sdk(client)
    training = upload(api, chats())
    created = [api.fine_tuning.jobs.create(model="tiny", training_file=training.id,
                                           hyperparameters={"n_epochs": 1}).id for _ in range(2)]
    admin_job = client.post("/admin/training-jobs", headers=ADMIN, files={"dataset": ("d.jsonl", jsonl(rows()))},
                            data={"config": json.dumps({"max_steps": 1})}).json()["id"]
    first = api.fine_tuning.jobs.list(limit=2)
    assert len(first.data) == 2 and first.has_more
    rest = api.fine_tuning.jobs.list(limit=2, after=first.data[-1].id)
    assert not rest.has_more
    ids = [j.id for j in first.data + rest.data]
    assert sorted(ids) == sorted([*created, admin_job])
    admin_view = api.fine_tuning.jobs.retrieve(admin_job)
    assert admin_view.model == "tiny" and admin_view.training_file is None
    done = wait_job(api, admin_job, lambda j: j.status == "succeeded")
    assert done.fine_tuned_model == admin_job  # an admin job's result is served under its adapter id
    for job_id in created:
        assert wait_job(api, job_id, lambda j: j.status == "succeeded").method.type == "supervised"


def test_cancel_and_errors(client):
    api = sdk(client)
    training = upload(api, chats(64))
    job = api.fine_tuning.jobs.create(model="tiny", training_file=training.id,
                                      method={"type": "supervised", "supervised": {"hyperparameters": {
                                          "n_epochs": 50, "batch_size": 1}}})
    wait_job(api, job.id, lambda j: j.status == "running")
    cancelled = api.fine_tuning.jobs.cancel(job.id)
    assert cancelled.status == "cancelled" and cancelled.fine_tuned_model is None
    with pytest.raises(openai.ConflictError):
        api.fine_tuning.jobs.cancel(job.id)
    assert api.fine_tuning.jobs.list_events(job.id).data[0].message == "The job was cancelled"
    assert api.fine_tuning.jobs.checkpoints.list(job.id).data == []
    with pytest.raises(openai.NotFoundError):
        api.fine_tuning.jobs.retrieve("train-000000000000")
    with pytest.raises(openai.NotFoundError) as no_file:
        api.fine_tuning.jobs.create(model="tiny", training_file="file-nope")
    assert no_file.value.body["param"] == "training_file"


def bad_create(api, training_id: str, **params) -> dict:
    with pytest.raises(openai.BadRequestError) as error:
        api.fine_tuning.jobs.create(model=params.pop("model", "tiny"), training_file=training_id, **params)
    return error.value.body


def test_bad_job_requests_name_the_parameter(client):
    api = sdk(client)
    training = upload(api, chats()).id
    dpo_file = upload(api, preference()).id
    supervised = "method.supervised.hyperparameters"
    cases = [
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"n_epochs": 0}}}}, f"{supervised}.n_epochs"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": 1.5}}}},
         f"{supervised}.batch_size"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"learning_rate_multiplier": -1}}}},
         f"{supervised}.learning_rate_multiplier"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"epochs": 2}}}}, f"{supervised}.epochs"),
        ({"hyperparameters": {"n_epochs": "many"}}, "hyperparameters.n_epochs"),
        ({"method": {"type": "reinforcement"}}, "method.type"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0}}}}, "method.dpo.hyperparameters.beta"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.1}}}}, "training_file"),  # not preference
        ({"model": "gpt-4o-mini"}, "model"),
        ({"suffix": "no spaces please"}, "suffix"),
        ({"extra_body": {"adapter": {"kind": "loha"}}}, "adapter.kind"),
        ({"extra_body": {"adapter": {"kind": "lora", "r": 0}}}, "adapter.r"),
        ({"extra_body": {"adapter": {"kind": "lora", "rank": 4}}}, "adapter.rank"),
        ({"extra_body": {"adapter": {"kind": "lora", "init_r": 16}}}, "adapter"),  # AdaLoRA's, not LoRA's
        ({"extra_body": {"adapter": {"kind": "adalora", "init_r": 4, "target_r": 8}}}, "adapter"),
        ({"extra_body": {"adapter": {"kind": "prompt_tuning", "num_virtual_tokens": 100_000}}},
         "adapter.num_virtual_tokens"),
        ({"validation_file": dpo_file}, "validation_file"),
        # a 400-digit integer overflowed float() and a list as method.type is unhashable: 500s before
        ({"hyperparameters": {"n_epochs": 10**400}}, "hyperparameters.n_epochs"),
        ({"method": {"type": "supervised", "supervised": {"hyperparameters": {"batch_size": -10**400}}}},
         f"{supervised}.batch_size"),
        ({"method": {"type": "dpo", "dpo": {"hyperparameters": {"beta": 10**400}}}},
         "method.dpo.hyperparameters.beta"),
        ({"method": {"type": ["supervised"]}}, "method.type"),
        ({"method": {"type": {"supervised": {}}}}, "method.type"),
        # trained to a NaN loss, then refused at registration, before
        ({"extra_body": {"adapter": {"kind": "lora", "lora_alpha": 1e308}}}, "adapter.lora_alpha"),
        ({"extra_body": {"adapter": {"kind": "lora", "target_modules": ["q_proj", 5]}}}, "adapter.target_modules[1]"),
    ]
    for params, param in cases:
        body = bad_create(api, training, **params)
        assert body["param"] == param, (params, body)
    dpo = bad_create(api, training, method={"type": "dpo"})
    assert "method 'dpo' trains on preference records" in dpo["message"]
    wrong_format = bad_create(api, dpo_file)
    assert wrong_format["param"] == "training_file" and "preference" in wrong_format["message"]
    too_long = upload(api, [{"messages": [{"role": "user", "content": "fox " * 400},
                                          {"role": "assistant", "content": "ok"}]}]).id
    tokenized = bad_create(api, too_long)
    assert tokenized["param"] == "training_file" and "line 1: too long after tokenization" in tokenized["message"]
    assert api.fine_tuning.jobs.list().data == []  # nothing was queued


def test_a_file_whose_bytes_are_gone_is_unavailable_not_a_500(client):
    """As with the shared store: 503 file_unavailable (a 500 FileNotFoundError before)."""
    api = sdk(client)
    training = upload(api, chats()).id
    client.app.state.gateway.files.path(training).unlink()
    content = client.get(f"/v1/files/{training}/content", headers=ADMIN)
    assert content.status_code == 503 and content.json()["error"]["code"] == "file_unavailable", content.text
    assert content.json()["error"]["param"] == "id"
    with pytest.raises(openai.InternalServerError) as job:
        api.fine_tuning.jobs.create(model="tiny", training_file=training)
    assert job.value.status_code == 503
    assert job.value.body["code"] == "file_unavailable" and job.value.body["param"] == "training_file"


def test_a_file_truncated_on_disk_is_refused_not_served_or_trained_on(client):
    """The local data dir's bytes are checked against the upload's sha256, as the shared store's
    are: a truncated file was served whole-looking (200) and a job trained on half of it."""
    api = sdk(client)
    training = upload(api, chats()).id
    path = client.app.state.gateway.files.path(training)
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    content = client.get(f"/v1/files/{training}/content", headers=ADMIN)
    assert content.status_code == 503 and "corrupt" in content.json()["error"]["message"], content.text
    with pytest.raises(openai.InternalServerError) as job:
        api.fine_tuning.jobs.create(model="tiny", training_file=training)
    assert job.value.status_code == 503 and api.fine_tuning.jobs.list().data == []


def test_a_file_deleted_while_its_job_is_created_is_never_both(client):
    """Job creation and the file's delete raced through the app: both succeeded (60 of 60), leaving a
    job whose training file was deleted. Now the delete is a 409 (the job claimed the file first) or
    the job a 404 (the file was gone first), whichever came first."""
    transport = httpx.ASGITransport(app=client.app)

    async def race(delete_first: bool) -> tuple[httpx.Response, httpx.Response]:
        async with httpx.AsyncClient(transport=transport, base_url="http://gateway", headers=ADMIN) as http:
            upload_ = await http.post("/v1/files", files={"file": ("t.jsonl", jsonl(chats()))},
                                      data={"purpose": "fine-tune"})
            file_id = upload_.json()["id"]
            create = http.post("/v1/fine_tuning/jobs", json={"model": "tiny", "training_file": file_id})
            delete = http.delete(f"/v1/files/{file_id}")
            if delete_first:
                deleted, created = await asyncio.gather(delete, create)
            else:
                created, deleted = await asyncio.gather(create, delete)
            if created.status_code == 200:  # keep the queue short
                await http.post(f"/v1/fine_tuning/jobs/{created.json()['id']}/cancel")
            return created, deleted

    outcomes = collections.Counter()
    for i in range(12):
        created, deleted = client.portal.call(race, i % 2 == 1)  # on the app's own event loop
        outcome = (created.status_code, deleted.status_code)
        assert outcome in ((200, 409), (404, 200)), (outcome, created.text, deleted.text)
        if deleted.status_code == 409:
            assert deleted.json()["error"]["code"] == "file_in_use"
        else:
            assert created.json()["error"]["param"] == "training_file"
        outcomes[outcome] += 1
    assert outcomes[(200, 409)], outcomes  # the job's claim was tested, not only a delete that came first


def test_dpo_job_from_a_preference_file_then_from_a_supervised_result(client):
    """method dpo on a preference file: beta, DPO metrics in the events, the result served; then
    SFT then DPO: model names the supervised result, which is the reference and the start."""
    api = sdk(client)
    pairs = upload(api, preference(8))
    job = api.fine_tuning.jobs.create(
        model="tiny", training_file=pairs.id, suffix="prefers-json",
        method={"type": "dpo", "dpo": {"hyperparameters": {"beta": 0.2, "n_epochs": 2, "batch_size": 4}}},
        extra_body={"adapter": {"kind": "ia3"}})
    assert job.method.type == "dpo" and job.method.dpo.hyperparameters.beta == 0.2
    done = wait_job(api, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert done.status == "succeeded", done.error
    metrics = [e.data for e in api.fine_tuning.jobs.list_events(job.id, limit=100).data if e.type == "metrics"]
    assert sorted(m["step"] for m in metrics) == [1, 2, 3, 4]
    for m in metrics:
        assert {"train_loss", "chosen_reward", "rejected_reward", "reward_margin", "preference_accuracy"} <= set(m)
        assert m["reward_margin"] == pytest.approx(m["chosen_reward"] - m["rejected_reward"], abs=1e-5)
        assert 0.0 <= m["preference_accuracy"] <= 1.0
    assert metrics[0]["train_loss"] == pytest.approx(0.6931, abs=1e-3)  # a new IA3 starts as the reference
    admin = client.get(f"/admin/training-jobs/{job.id}", headers=ADMIN).json()
    assert admin["config"]["objective"] == "dpo" and admin["config"]["beta"] == 0.2
    assert admin["dataset"]["format"] == "preference"
    reply = api.chat.completions.create(model=done.fine_tuned_model, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content is not None

    sft = api.fine_tuning.jobs.create(model="tiny", training_file=upload(api, chats()).id,
                                      hyperparameters={"n_epochs": 1})
    sft_done = wait_job(api, sft.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert sft_done.status == "succeeded", sft_done.error
    follow = api.fine_tuning.jobs.create(model=sft_done.fine_tuned_model, training_file=pairs.id,
                                         method={"type": "dpo", "dpo": {"hyperparameters": {"n_epochs": 1}}})
    assert follow.model_extra["adapter"] == {"kind": "lora", "init_adapter": sft.id}
    assert follow.method.dpo.hyperparameters.beta == 0.1  # "auto"
    follow_done = wait_job(api, follow.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
    assert follow_done.status == "succeeded", follow_done.error
    first = [e.data for e in api.fine_tuning.jobs.list_events(follow.id, limit=100).data
             if e.type == "metrics" and e.data["step"] == 1][0]
    # the reference is the SFT adapter itself (only its LoRA dropout, on in training, moves the policy)
    assert first["train_loss"] == pytest.approx(0.6931, abs=1e-2)
    reply = api.chat.completions.create(model=follow_done.fine_tuned_model, messages=MESSAGES, max_tokens=4)
    assert reply.choices[0].message.content is not None


def test_files_and_ft_names_survive_a_restart(tmp_path):
    with make_client(tmp_path) as first:
        api = sdk(first)
        training = upload(api, chats())
        job = api.fine_tuning.jobs.create(model="tiny", training_file=training.id, suffix="keep",
                                          hyperparameters={"n_epochs": 1})
        done = wait_job(api, job.id, lambda j: j.status in ("succeeded", "failed", "cancelled"))
        assert done.status == "succeeded", done.error
    orphan = tmp_path / "files" / "file-0123456789abcdef01234567.jsonl"  # bytes whose record was never saved
    orphan.write_bytes(b"{}")
    with make_client(tmp_path) as second:
        api = sdk(second)
        assert api.files.retrieve(training.id).filename == "train.jsonl"
        assert api.files.content(training.id).read() == jsonl(chats())
        assert api.fine_tuning.jobs.retrieve(job.id).fine_tuned_model == f"ft:tiny:keep:{job.id}"
        reply = api.chat.completions.create(model=done.fine_tuned_model, messages=MESSAGES, max_tokens=4)
        assert reply.choices[0].message.content is not None
    assert not orphan.exists()
