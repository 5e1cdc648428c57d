"""The fine-tuning API's operations over the one job store (``gateway.training.jobs``) and the
file store (``gateway.files``): a job is created from file ids, and afterwards it is a training
job like any other, seen by the admin API too. Also answers which jobs read a file (deleting it
waits for them) and which adapter an ``ft:`` model name stands for."""

from __future__ import annotations

import collections
import contextlib
from collections.abc import Callable, Iterable, Iterator

from adapters.errors import DatasetValidationError
from gateway.files.errors import FileNotFound, FileUnavailableError
from gateway.files.service import FileService
from gateway.fine_tuning.errors import FineTuningRequestError
from gateway.fine_tuning.methods import MethodSpec
from gateway.fine_tuning.plan import FineTuningJobCreate, JobPlan, plan_job
from gateway.fine_tuning.views import checkpoint_name, result_name
from gateway.training.jobs import TrainingJobs
from gateway.training.store import SUCCEEDED, TERMINAL, TrainingJobRecord


class FineTuning:
    def __init__(self, jobs: TrainingJobs, files: FileService, base_name: str,
                 describe: Callable[[str], dict | None] = lambda adapter_id: None):
        self.jobs = jobs
        self.files = files
        self.base_name = base_name
        # a registered adapter's {"kind", "num_virtual_tokens"}; None when no adapter has this id
        self._describe = describe
        self._creating: collections.Counter[str] = collections.Counter()  # file id -> jobs being created

    async def create(self, body: FineTuningJobCreate) -> TrainingJobRecord:
        """Raises ``FineTuningRequestError``/``FileNotFound`` naming the parameter at fault, and the
        job store's errors (too many jobs, storage)."""
        plan = plan_job(body, start_from=self._start_from(body))
        files = self._files(body, plan.method.spec)
        # claimed before the first await, until the job is stored (``in_use`` sees it from then):
        # a delete of these files meanwhile is a 409 instead of leaving the job naming a deleted file
        with self._claimed(files.values()):
            data = {param: await self._read(file_id, param) for param, file_id in files.items()}
            try:
                return await self.jobs.create(data["training_file"], plan.config,
                                              validation=data.get("validation_file"),
                                              fine_tuning=self._request_fields(body, plan))
            except DatasetValidationError as exc:
                exc.param = getattr(exc, "param", None) or "training_file"  # read by gateway.errors
                raise
            except ValueError as exc:  # the adapter settings against this gateway's limits
                raise FineTuningRequestError(str(exc), param="adapter") from None

    def _request_fields(self, body: FineTuningJobCreate, plan: JobPlan) -> dict:
        """What the job record keeps of the request (its OpenAI view is built from it)."""
        config = plan.config
        return {"model": body.model, "base": self.base_name, "training_file": body.training_file,
                "validation_file": body.validation_file, "suffix": body.suffix, "metadata": body.metadata,
                "hyperparameters": plan.hyperparameters, "method": plan.method.resolved(plan.hyperparameters),
                "adapter": {**(body.adapter or {}), "kind": config.kind.value,
                            **({"init_adapter": config.init_adapter} if config.init_adapter else {})}}

    def _files(self, body: FineTuningJobCreate, spec: MethodSpec) -> dict[str, str]:
        """``{param: file id}`` of the job's files, each one known and of a format ``spec`` trains on."""
        files = {}
        for param in ("training_file", "validation_file"):
            file_id = getattr(body, param)
            if file_id is None:
                continue
            try:
                record = self.files.get(file_id)
            except FileNotFound:
                raise FileNotFound(f"No such File object: {file_id[:80]}", param=param) from None
            if record.format not in spec.formats:
                raise FineTuningRequestError(
                    f"{param} {file_id} holds {record.format} records; method '{spec.type}' trains on "
                    f"{' or '.join(sorted(spec.formats))} records", param=param)
            files[param] = file_id
        return files

    async def _read(self, file_id: str, param: str) -> bytes:
        try:
            return await self.files.read(file_id)
        except FileUnavailableError as exc:
            exc.param = param  # read by gateway.errors: the request's field, not the files API's "id"
            raise

    @contextlib.contextmanager
    def _claimed(self, file_ids: Iterable[str]) -> Iterator[None]:
        claim = collections.Counter(file_ids)
        self._creating += claim
        try:
            yield
        finally:
            self._creating -= claim  # ids back at zero are dropped

    def _start_from(self, body: FineTuningJobCreate) -> dict | None:
        """The adapter settings and ``init_adapter`` of a job whose ``model`` is a registered adapter
        (by its id or ``ft:`` name); None for the base model."""
        if body.model == self.base_name:
            return None
        adapter_id = self.resolve(body.model) or body.model
        described = self._describe(adapter_id)
        if described is None:
            raise FineTuningRequestError(f"model must be the base model {self.base_name!r} or a registered adapter "
                                         f"to start from; {body.model[:80]!r} is neither", param="model")
        if body.adapter is not None:
            raise FineTuningRequestError(f"the adapter's kind and settings come from model {body.model[:80]!r}; "
                                         "omit adapter when starting from a registered adapter", param="adapter")
        settings = {"kind": described["kind"], "init_adapter": adapter_id}
        if described.get("num_virtual_tokens"):
            settings["num_virtual_tokens"] = described["num_virtual_tokens"]
        return settings

    def in_use(self, file_id: str) -> str | None:
        """Why ``file_id`` may not be deleted now (a job that has not ended, or one being created,
        uses it), or None."""
        if self._creating[file_id]:
            return "a fine-tuning job being created uses it; retry once the job has ended"
        for record in self.jobs.list():
            ft = record.fine_tuning or {}
            if record.state not in TERMINAL and file_id in (ft.get("training_file"), ft.get("validation_file")):
                return f"the fine-tuning job {record.id} ({record.state}) uses it; cancel it or wait for it to end"
        return None

    def resolve(self, name: str) -> str | None:
        """The adapter id an ``ft:`` model (or checkpoint) name stands for, or None."""
        if not name.startswith("ft:"):
            return None
        for record in self.jobs.list():
            if record.state == SUCCEEDED and record.fine_tuning and name in (result_name(record),
                                                                              checkpoint_name(record)):
                return record.adapter_id
        return None

    def served_names(self) -> list[tuple[str, float]]:
        """``(ft: name, created)`` of each succeeded job of this API whose adapter is registered."""
        return [(result_name(r), r.finished or r.created) for r in self.jobs.list()
                if r.state == SUCCEEDED and r.fine_tuning and r.adapter_id is not None and self._describe(r.adapter_id) is not None]
