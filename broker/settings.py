"""One frozen settings object, read once from ``MESH_*`` at the entry point and passed down."""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Literal

from pydantic import Field, PrivateAttr, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from mesh.contracts import ConfigError

from . import connection

ENV_PREFIX = "MESH_"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


class MeshSettings(BaseSettings):
    """Every knob of a deployment. Durations carry their unit in the name."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, frozen=True, extra="forbid",
                                      hide_input_in_errors=True)  # an input may be a URL with a password

    redis_url: str = Field(default=DEFAULT_REDIS_URL, repr=False, description="redis://, rediss:// (TLS), "
                           "redis+sentinel:// or redis+cluster:// (rediss+cluster://: TLS) URL, with credentials "
                           "if the server wants them")
    redis_ca_file: str | None = Field(default=None, description="rediss://: the CA bundle (PEM) the server's "
                                      "certificate is checked against; default: the system's")
    redis_cert_file: str | None = Field(default=None, description="rediss://: client certificate (PEM), for "
                                        "servers with tls-auth-clients")
    redis_key_file: str | None = Field(default=None, description="rediss://: the client certificate's key (PEM)")
    redis_sentinel_password: SecretStr | None = Field(default=None, description="redis+sentinel://: the "
                                                      "sentinels' own password (the URL's is the master's)")
    redis_retries: int = Field(default=8, ge=0, le=30, description="times a command that is safe to re-send "
                               "(claims, leases, job records, reads) is re-sent after a lost connection or a "
                               "timeout, backing off from 50 ms to 1 s (8: about 4 s); past them it fails as "
                               "Redis unavailable")
    reconnect_delay_s: float | None = Field(default=None, gt=0, description="how long a worker waits after a "
                                            "lost Redis connection before it rebuilds a consumer or re-sends a "
                                            "settlement; default: dramatiq's (3 s and 5 s)")
    redis_wait_replicas: int = Field(default=0, ge=0, description="a client's enqueue returns only once this many "
                                     "replicas have it (Redis WAIT); 0: once the primary has it")
    redis_wait_timeout_ms: int = Field(default=1000, ge=1, description="how long an enqueue waits for "
                                       "MESH_REDIS_WAIT_REPLICAS before it fails as not replicated")
    # No braces and no ":": the namespace is the hash tag of every key, "{ns}:..." (broker/keys.py).
    namespace: str = Field(default="mesh", pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$",
                           description="every key starts with it in braces, {NS}: (its Redis Cluster hash "
                           "tag); one deployment per namespace; letters, digits, _ . - only")
    shard: int = Field(default=0, ge=0, le=4095, description="the shard of the namespace this process's jobs, queues "
                       "and their indexes are kept in: {NS}: for 0, {NS:N}: for N (the fleet-wide keys stay in "
                       "{NS}:); every process of a deployment must use the same one. For testing the key layout on "
                       "a Redis Cluster (the fleet-wide keys and a shard's in two slots); leave it at 0")
    shards: int = Field(default=1, ge=1, le=256, description="how many shards a namespace's jobs are spread over "
                        "(MESH_SHARD, MESH_SHARD + 1, ...; from 1 when MESH_SHARD is 0 and there are several, leaving "
                        "shard 0's slot to the fleet-wide keys): a job's shard is a hash of its id, and every worker "
                        "consumes every shard. On a Redis Cluster each shard is a slot of its own, so the jobs "
                        "spread over the primaries; each worker process runs one set of consumers per shard, "
                        "its threads divided among them (MESH_WORKER_THREADS); fixed per namespace (a process with "
                        "another count refuses to start: drain the namespace to change it)")

    model_provider: Literal["local", "openai", "openai_sdk", "anthropic"] | None = Field(
        default=None, description="local (offline, deterministic); openai (any OpenAI-compatible endpoint, over "
        "httpx); openai_sdk or anthropic (the vendor's SDK: the openai or anthropic extra). Default: openai when "
        "MESH_MODEL_URL is set, local otherwise")
    model_url: str | None = Field(default=None, description="base URL of the model API: an OpenAI-compatible API's "
                                  "(e.g. .../v1; openai needs it), or Anthropic's; unset for openai_sdk and "
                                  "anthropic: the SDK's own")
    model_name: str = Field(default="gpt-4o-mini", description="the model asked unless a pipeline step or a call "
                            "names one")
    model_api_key: SecretStr | None = Field(default=None, description="the API key (a bearer token for "
                                            "MESH_MODEL_URL); unset for openai_sdk and anthropic: the SDK's own "
                                            "variable (OPENAI_API_KEY, ANTHROPIC_API_KEY)")
    model_max_tokens: int = Field(default=4096, ge=1, description="the most tokens an answer may take (anthropic "
                                  "requires a bound)")
    model_timeout_s: float = Field(default=30.0, gt=0, description="a model call's timeout, cut to the job's deadline")
    model_structured: Literal["json_schema", "json_object"] = Field(
        default="json_schema", description="how answers are asked for: the output's JSON schema as response_format "
        "(json_object is used instead once the endpoint refuses it), or json_object with the schema in the prompt")
    model_repairs: int = Field(default=2, ge=0, le=10, description="times an invalid answer is sent back with its "
                               "validation errors before the attempt fails as invalid_output")
    job_token_budget: int = Field(default=0, ge=0, description="model tokens a job may spend unless its sender "
                                  "says otherwise; 0: no budget")

    secrets_dir: str | None = Field(default=None, description="folder of secret files (one per name) tools may "
                                    "declare; the environment is looked at first")
    http_allow: str = Field(default="", description="comma-separated host:port pairs http_post may reach")
    http_timeout_s: float = Field(default=10.0, gt=0, description="http_post's timeout, cut to the job's deadline")

    max_message_bytes: int = Field(default=1024 * 1024, ge=1024, description="largest message (encoded) a "
                                   "client sends or a worker runs; a larger one found in a queue is dead-lettered")
    max_json_depth: int = Field(default=64, ge=8, le=200, description="deepest nesting of objects and arrays "
                                "a message may carry (orjson refuses to encode past about 250)")
    max_fan_out: int = Field(default=256, ge=1, description="most steps a plan or items a for_each list may "
                             "release from one step")
    max_output_bytes: int = Field(default=256 * 1024, ge=1024, description="largest step output (encoded) kept "
                                  "in a job record; a larger one fails the step as invalid_output")
    max_response_bytes: int = Field(default=1024 * 1024, ge=1024, description="most bytes of an HTTP "
                                    "response a tool reads into memory, and of an MCP tool's result (its "
                                    "JSON); a longer one fails the call")

    dlq_max_line_bytes: int | None = Field(default=None, ge=1024, description="longest line `mesh dlq load` "
                                           "reads from an export file; a longer one refuses the file unread. "
                                           "Default: 4 x MESH_MAX_MESSAGE_BYTES")
    dlq_max_raw_bytes: int | None = Field(default=None, ge=1024, description="largest message (raw bytes) an "
                                          "exported entry may carry, at most MESH_MAX_MESSAGE_BYTES (the default)")

    ops_request_timeout_s: float = Field(default=10.0, gt=0, description="the ops server closes a connection "
                                         "that has not sent a whole request (head and body) this long after it "
                                         "opened or after its last response")
    ops_keep_alive_s: int = Field(default=5, ge=1, description="the ops server closes an idle keep-alive "
                                  "connection after this long")
    ops_max_connections: int = Field(default=64, ge=2, description="connections the ops server holds at once "
                                     "(at most its descriptor limit less a reserve); past it a new one replaces "
                                     "the oldest idle one")

    console_users_file: Path | None = Field(default=None, description="the ops server's console users: a file "
                                            "of `name:hash` lines (`mesh ops user add NAME` writes one); with "
                                            "users, every console page and action needs a login")
    console_users: SecretStr | None = Field(default=None, description="console users as comma-separated "
                                            "`name:hash` pairs, read besides MESH_CONSOLE_USERS_FILE")
    console_secret: SecretStr | None = Field(default=None, description="the key console session cookies are "
                                             "signed with; default: a random one per process (logins end when "
                                             "the server restarts, and each server of several has its own)")
    console_session_s: int = Field(default=12 * 3600, ge=60, description="how long a console login lasts")

    expr_timeout_ms: int = Field(default=1000, ge=10, description="longest a pipeline expression may run; "
                                 "past it its step is dead-lettered")
    expr_memory_mb: int = Field(default=512, ge=64, description="address space of the process pipeline "
                                "expressions run in; an expression that needs more dead-letters its step")
    expr_max_result_bytes: int = Field(default=1024 * 1024, ge=1024, description="largest value (encoded) a "
                                       "pipeline expression may give; a larger one dead-letters its step")
    max_job_bytes: int = Field(default=16 * 1024 * 1024, ge=64 * 1024, description="largest job record "
                               "(encoded) a for_each fan-out may grow; a larger one dead-letters the step")
    poison_kills: int = Field(default=3, ge=1, description="workers a message may take down (its claim taken "
                              "over from a dead owner) before its next delivery is dead-lettered as poison")

    max_retries: int = Field(default=3, ge=0, le=100, description="retries of retryable failures (brownout, "
                             "invalid_output, unknown) before the DLQ; an agent's max_retries overrides it")
    retry_min_backoff_ms: int = Field(default=200, ge=1, description="lower bound of the backoff of retries and "
                                      "of deferrals that name no wait")
    retry_max_backoff_ms: int = Field(default=30_000, ge=1, description="upper bound of that backoff")
    max_defers: int = Field(default=20, ge=0, description="deferrals (rate limits, open breakers, "
                            "mesh Redis outages) of one message before the DLQ; the entry's error then starts "
                            "with that cause, each attempt keeping its own")
    max_waits: int = Field(default=500, ge=1, description="waits of a duplicate for a key's live owner "
                           "before the DLQ (a passed deadline stops it sooner)")
    breaker_failures: int = Field(default=5, ge=1,
                                  description="brownouts or timeouts within the window that open a breaker")
    breaker_window_s: float = Field(default=30.0, gt=0, description="the window MESH_BREAKER_FAILURES are "
                                    "counted in")
    breaker_cooldown_s: float = Field(default=10.0, gt=0, description="open this long before one probe")
    breaker_max_cooldown_s: float = Field(default=300.0, gt=0, description="cap of the cool-down, which "
                                          "doubles after each failed probe")
    breaker_probe_ttl_s: float = Field(default=60.0, gt=0, description="a probe not answered by then frees the "
                                       "half-open slot")
    job_deadline_s: float = Field(default=600.0, gt=0, description="a job's budget, carried across hops as an "
                                  "absolute deadline")
    max_hops: int = Field(default=8, ge=1, description="hop limit of a message (an agent re-entered is a "
                          "cycle)")
    time_limit_s: float = Field(default=300.0, gt=0, description="a handler's time limit, cut to what is left "
                                "of the job's deadline; an agent's time_limit_s can only lower it")

    heartbeat_timeout_s: float = Field(default=15.0, gt=0, description="a worker silent this long (by the Redis "
                                       "server's clock) is dead; its messages go back to their queues")
    stuck_after_s: float = Field(default=120.0, gt=0, description="a running step without progress this long is stuck")
    lease_s: float | None = Field(default=None, gt=0, description="claim lease on a message key, renewed every "
                                  "third of it while the handler runs; default: MESH_HEARTBEAT_TIMEOUT_S")
    lease_check_after_s: float | None = Field(default=None, ge=0, description="a tool call whose lease Redis "
                                              "last confirmed longer ago than this confirms it first (a tool with "
                                              "an effect always does); default: a quarter of the lease")
    dedup_ttl_s: float = Field(default=7 * 24 * 3600.0, ge=60, description="how long a done key is "
                                 "remembered; must not be shorter than MESH_DLQ_RETENTION_S")
    claim_result_bytes: int = Field(default=4096, ge=0, description="largest step output (encoded) a done "
                                    "key's claim keeps for the dedup window; a larger one is kept as its digest "
                                    "and its step's place, read from the job record while that is kept")
    dlq_retention_s: float = Field(default=0.0, ge=0, description="how long dead letters are kept; 0 keeps "
                                   "them until an operator removes them; the retention sweep removes older ones, "
                                   "each audited (expire) and counted (dlq_expired)")
    job_retention_s: float = Field(default=7 * 24 * 3600.0, gt=0, description="how long a job's record, trace "
                                   "and index entries are kept after the job ends; running jobs are kept")
    job_retention_count: int = Field(default=0, ge=0, description="keep at most this many finished jobs per "
                                     "agent or pipeline (the newest), besides MESH_JOB_RETENTION_S; 0: no count "
                                     "limit. Jobs holding dead letters or waiting for a person are kept by age only")
    note_retention_s: float = Field(default=30 * 24 * 3600.0, gt=0, description="how long a note the `note` "
                                    "tool wrote is kept (users' data, not bookkeeping)")
    sweep_interval_s: float = Field(default=60.0, gt=0, description="retention sweeps run this often, "
                                    "once per interval across the whole fleet")
    counter_flush_s: float = Field(default=1.0, ge=0, le=60, description="a worker process adds up its steps' "
                                   "success counts (messages succeeded, the handler-duration histogram) and "
                                   "writes them this often and when it stops; a killed process loses up to this "
                                   "long's counts. 0: each step's write adds its own, exact even across a kill")
    timer_interval_s: float = Field(default=0.2, gt=0, le=1.0, description="how often a worker looks for due "
                                    "durable timers (approval expiries and warnings, sleeps, wait_for "
                                    "timeouts): a timer fires within about this long after its due time on the "
                                    "Redis clock, never before it")
    event_window_s: float = Field(default=3600.0, gt=0, le=30 * 86400, description="how long an event "
                                  "(mesh emit, mesh signal) that no waiting step took yet is kept for a wait_for "
                                  "that starts later")
    event_keep: int = Field(default=1000, ge=1, le=1_000_000, description="most events kept per event name (and "
                            "per job, for signals) within MESH_EVENT_WINDOW_S; the oldest go first")
    worker_threads: int = Field(default=4, ge=1, le=256, description="threads per worker process; with "
                                "MESH_SHARDS > 1, divided among the shards it consumes: each shard's consumers "
                                "get ceil(threads / shards), at least 1")
    prefetch: int = Field(default=0, ge=0, description="messages prefetched per queue; 0 = 2 x threads (1 x threads "
                                                       "on the queue of an agent whose limits are keyed by tenant)")
    otlp_endpoint: str | None = Field(default=None, description="OTLP/HTTP traces URL (e.g. http://collector:4318"
                                      "/v1/traces) a declared pipeline with tracing.provider set exports its step "
                                      "spans to; needs the otlp extra. Unset: nothing is exported")

    @model_validator(mode="after")
    def _dedup_outlives_dlq(self) -> MeshSettings:
        # A replayed dead letter must still find the done marker of an effect that happened.
        if self.dlq_retention_s and self.dedup_ttl_s < self.dlq_retention_s:
            raise ValueError(f"MESH_DEDUP_TTL_S ({self.dedup_ttl_s:g}) must not be shorter than "
                             f"MESH_DLQ_RETENTION_S ({self.dlq_retention_s:g})")
        return self

    @model_validator(mode="after")
    def _dlq_raw_within_messages(self) -> MeshSettings:
        # A dead letter never holds more than a message may (an oversized poison keeps a prefix).
        if self.dlq_max_raw_bytes is not None and self.dlq_max_raw_bytes > self.max_message_bytes:
            raise ValueError(f"MESH_DLQ_MAX_RAW_BYTES ({self.dlq_max_raw_bytes}) must not be over "
                             f"MESH_MAX_MESSAGE_BYTES ({self.max_message_bytes})")
        return self

    @model_validator(mode="after")
    def _shards_within_range(self) -> MeshSettings:
        last = max(self.shard, 1 if self.shards > 1 else 0) + self.shards - 1  # see broker/shards.py
        if last > 4095:
            raise ValueError(f"the last shard (MESH_SHARD + MESH_SHARDS - 1, from 1 with several: {last}) "
                             f"must not be over 4095")
        return self

    @model_validator(mode="after")
    def _redis_reachable_as_written(self) -> MeshSettings:
        try:
            connection.check(self)
        except ConfigError as exc:  # pydantic wants a ValueError; from_env turns it back into a ConfigError
            raise ValueError(exc.message) from None
        return self

    #: the first of the namespace's shards, when this is one shard's copy of the settings (:meth:`on_shard`)
    _first_shard: int | None = PrivateAttr(default=None)

    def on_shard(self, shard: int) -> MeshSettings:
        """These settings as one of the namespace's shards sees them (a worker runs one set of consumers
        per shard): ``shard`` is that shard; :attr:`first_shard` and ``shards`` still say them all."""
        copy = self.model_copy(update={"shard": shard})
        copy._first_shard = self.first_shard
        return copy

    @property
    def first_shard(self) -> int:
        """The first of the namespace's shards (MESH_SHARD, unless these are one shard's settings)."""
        return self.shard if self._first_shard is None else self._first_shard

    @property
    def claim_lease_s(self) -> float:
        """The lease a claim holds; by default as long as a worker may go silent before it counts as dead."""
        return self.heartbeat_timeout_s if self.lease_s is None else self.lease_s

    @property
    def dlq_line_cap(self) -> int:
        """The longest export-file line loaded: room for an entry's envelope, its raw bytes in base64
        and its error and traceback, each bounded by MESH_MAX_MESSAGE_BYTES."""
        return 4 * self.max_message_bytes if self.dlq_max_line_bytes is None else self.dlq_max_line_bytes

    @property
    def dlq_raw_cap(self) -> int:
        """The largest raw message an exported entry may carry."""
        return self.max_message_bytes if self.dlq_max_raw_bytes is None else self.dlq_max_raw_bytes

    @property
    def dead_letter_job_retention_s(self) -> float:
        """How long the record of an ended job holding dead-lettered (or unknown) steps is kept: as long
        as its dead letters may wait for a replay (MESH_DLQ_RETENTION_S, or, when they are kept until
        removed, the dedup window a replay is safe in), and never less than MESH_JOB_RETENTION_S."""
        return max(self.job_retention_s, self.dlq_retention_s or self.dedup_ttl_s)

    @property
    def lease_check_s(self) -> float:
        """How long a lease Redis confirmed counts as valid before a tool call without an effect
        confirms it again (MESH_LEASE_CHECK_AFTER_S; default a quarter of the lease)."""
        return self.claim_lease_s / 4 if self.lease_check_after_s is None else self.lease_check_after_s

    @property
    def http_allowlist(self) -> frozenset[str]:
        return frozenset(p.strip().lower() for p in self.http_allow.split(",") if p.strip())

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: object) -> MeshSettings:
        """Read ``MESH_*`` variables; an unknown one or a bad value is a ConfigError, never ignored."""
        environ = os.environ if environ is None else environ
        known = {ENV_PREFIX + name.upper() for name in cls.model_fields}
        # Names are exact: a lower-case mesh_namespace is unknown, not silently ignored.
        unknown = sorted(k for k in environ if k.upper().startswith(ENV_PREFIX) and k not in known)
        if unknown:
            raise ConfigError(f"unknown settings: {', '.join(unknown)}; known: {', '.join(sorted(known))}")
        values: dict[str, object] = {
            name: environ[ENV_PREFIX + name.upper()]
            for name in cls.model_fields
            if ENV_PREFIX + name.upper() in environ
        }
        values.update(overrides)
        try:
            return cls.model_validate(values)
        except ValidationError as exc:
            problems = "; ".join(  # a check across settings (no loc) names its settings itself
                f"{ENV_PREFIX}{'.'.join(str(p) for p in e['loc']).upper()}: {e['msg']}" if e["loc"]
                else str(e["msg"]).removeprefix("Value error, ") for e in exc.errors()
            )
            raise ConfigError(f"invalid settings: {problems}") from None

    @classmethod
    def settings_customise_sources(cls, settings_cls, init_settings, **_sources):  # type: ignore[override]
        # Only explicit values: the environment is read by from_env alone, where unknown names fail.
        return (init_settings,)
