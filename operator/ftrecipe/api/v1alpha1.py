"""FinetuneRecipe v1alpha1: the one source of truth for the API.

The CRD in `crds/` is generated from these models (`ftrecipe crd`), so every field's description,
default, bound and enum lives here once. Rules that span fields are written twice on purpose: as a
pydantic validator (the CLI and `ftrecipe run` check recipes offline) and as a CEL rule attached with
`cel_rules` (the API server rejects the same recipe before anything runs). Tests check both agree.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from datetime import datetime
from fractions import Fraction
from typing import Annotated, Any, ClassVar, Final, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field, model_validator
from pydantic_core import PydanticCustomError

GROUP = "ftrecipe.dev"
VERSION = "v1alpha1"
API_VERSION: Final = "ftrecipe.dev/v1alpha1"
KIND: Final = "FinetuneRecipe"
PLURAL = "finetunerecipes"
SINGULAR = "finetunerecipe"
SHORT_NAMES = ("ftr",)
CATEGORIES = ("ftrecipe",)

# Keys that look like credentials. A recipe is reviewed in pull requests and stored in etcd unencrypted,
# so a secret value must never be a spec field; such a key gets a message pointing at the *SecretRef.
_SECRET_LOOKING_KEYS = ("key", "token", "password", "secret", "credential")

_DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
_S3_URI = r"^s3://[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9](/.*)?$"
_GIT_URL = r"^(https://|http://|ssh://|git@|file://).+"
_HTTP_URL = r"^https?://.+"
_HF_REPO_ID = r"^[\w.\-]+(/[\w.\-]+)?$"
_CAMEL_WORD = r"^[A-Za-z]\w*$"
# Same syntax as a Kubernetes resource.Quantity, so `resources` reads like any pod's.
_QUANTITY = r"^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$"
_ISO_DATETIME = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}([T ][0-9]{2}:[0-9]{2}(:[0-9]{2}([.][0-9]{1,6})?)?)?(Z|[+-][0-9]{2}:[0-9]{2})?$"

# What each pattern means, for error messages people can act on.
PATTERN_MEANINGS = {
    _DNS_LABEL: "a lowercase name of letters, digits and '-' (at most 63)",
    _DNS_SUBDOMAIN: "a lowercase Kubernetes name of letters, digits, '-' and '.'",
    _S3_URI: "an s3://bucket/prefix/ URI",
    _GIT_URL: "a git URL starting with https://, ssh://, git@ or file://",
    _QUANTITY: "a resource quantity such as 2, 500m or 16Gi",
    _HTTP_URL: "an http:// or https:// URL",
    _HF_REPO_ID: "a Hugging Face repository id such as meta-llama/Llama-3.1-8B-Instruct",
    _CAMEL_WORD: "a CamelCase word",
    _ISO_DATETIME: "an ISO 8601 date and time such as 2026-01-15T09:30:00+00:00",
}


def camel(name: str) -> str:
    """snake_case → camelCase, keeping digits attached (`e2e_tests` → `e2eTests`, not pydantic's `e2ETests`)."""
    head, *rest = name.split("_")
    return head + "".join(part[:1].upper() + part[1:] for part in rest)


def cel_rules(*rules: tuple[str, str]) -> dict[str, Any]:
    """Attach CEL rules (rule, message) to a model's generated schema as x-kubernetes-validations."""
    return {"x-kubernetes-validations": [{"rule": rule, "message": message} for rule, message in rules]}


def _exactly_one_rule(fields: tuple[str, ...]) -> str:
    return " + ".join(f"(has(self.{f}) ? 1 : 0)" for f in fields) + " == 1"


class ApiModel(BaseModel):
    """Base for every API object: camelCase on the wire, unknown fields rejected with a clear hint."""

    model_config = ConfigDict(
        alias_generator=camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
        frozen=True,
    )

    @model_validator(mode="before")
    @classmethod
    def _reject_unknown_fields(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        known = {info.alias or name for name, info in cls.model_fields.items()} | set(cls.model_fields)
        for key in data:
            if key in known:
                continue
            allowed = ", ".join(sorted(info.alias or name for name, info in cls.model_fields.items()))
            lowered = str(key).lower()
            if any(word in lowered for word in _SECRET_LOOKING_KEYS) and not lowered.endswith("secretref"):
                refs = [
                    a for a in (info.alias or n for n, info in cls.model_fields.items()) if "SecretRef" in a
                ]
                hint = f"use {refs[0]} to reference a Secret" if refs else "reference a Secret instead"
                raise PydanticCustomError(
                    "secret_in_spec",
                    "field '{key}' would put a secret in clear text in the recipe; {hint}",
                    {"key": key, "hint": hint},
                )
            raise PydanticCustomError(
                "unknown_field",
                "unknown field '{key}'; known fields here: {allowed}",
                {"key": key, "allowed": allowed},
            )
        return data


class ExactlyOne(ApiModel):
    """A union written the Kubernetes way: an object in which exactly one field is set."""

    _choices: ClassVar[tuple[str, ...]] = ()

    @model_validator(mode="after")
    def _exactly_one(self) -> ExactlyOne:
        chosen = [name for name in self._choices if getattr(self, name) is not None]
        if len(chosen) != 1:
            names = ", ".join(camel(n) for n in self._choices)
            got = ", ".join(camel(n) for n in chosen) or "none"
            raise PydanticCustomError(
                "exactly_one",
                "set exactly one of {names} (got {got})",
                {"names": names, "got": got},
            )
        return self


def _exactly_one_schema(choices: tuple[str, ...]) -> dict[str, Any]:
    names = ", ".join(camel(c) for c in choices)
    return cel_rules((_exactly_one_rule(tuple(camel(c) for c in choices)), f"set exactly one of {names}"))


# --------------------------------------------------------------------------------------------- references


class SecretKeyRef(ApiModel):
    """A key inside a Secret in the recipe's namespace; its value reaches Jobs only as a secretKeyRef env var."""

    name: Annotated[str, Field(description="Name of the Secret.", pattern=_DNS_SUBDOMAIN, max_length=253)]
    key: Annotated[str, Field(description="Key inside the Secret's data.", min_length=1, max_length=253)]


class SecretEnvVar(ApiModel):
    """An environment variable of a Job whose value is a Secret key (never a value in the recipe)."""

    name: Annotated[
        str,
        Field(
            description="Variable name, e.g. the one an endpoints.yml model group reads "
            "(`api_key: ${AZURE_OPENAI_KEY}`).",
            pattern=r"^[A-Za-z_][A-Za-z0-9_]*$",
            max_length=253,
        ),
    ]
    secret_key_ref: Annotated[SecretKeyRef, Field(description="The Secret key holding the value.")]


class SecretRef(ApiModel):
    """A whole Secret in the recipe's namespace, for credentials made of several keys."""

    name: Annotated[str, Field(description="Name of the Secret.", pattern=_DNS_SUBDOMAIN, max_length=253)]


class S3Location(ApiModel):
    """An S3 (or S3-compatible: MinIO, SeaweedFS, Ceph) prefix."""

    uri: Annotated[str, Field(description="s3://bucket/prefix/ URI.", pattern=_S3_URI)]
    endpoint: Annotated[
        str | None,
        Field(
            description="Endpoint URL for S3-compatible stores, e.g. http://minio.minio:9000. "
            "Empty means AWS (or AWS_ENDPOINT_URL in the pod).",
            pattern=_HTTP_URL,
        ),
    ] = None
    region: Annotated[str | None, Field(description="Region of the bucket, e.g. eu-west-1.")] = None
    force_path_style: Annotated[
        bool,
        Field(
            description="Path-style addressing (bucket in the path, not the host); most non-AWS stores need it."
        ),
    ] = False
    credentials_secret_ref: Annotated[
        SecretRef | None,
        Field(
            description="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Leave empty to use the "
            "pod's identity (IRSA, EKS pod identity, instance profile)."
        ),
    ] = None


class LocalPath(ApiModel):
    """A path on the machine running `ftrecipe run`. The operator rejects it: pods cannot see your laptop."""

    path: Annotated[str, Field(description="Filesystem path, relative to the recipe file.", min_length=1)]


class PvcPath(ApiModel):
    """A folder inside a PersistentVolumeClaim in the recipe's namespace (mounted read-only)."""

    claim_name: Annotated[
        str, Field(description="Name of the PersistentVolumeClaim.", pattern=_DNS_SUBDOMAIN, max_length=253)
    ]
    path: Annotated[str, Field(description="Folder inside the volume.")] = "."


# --------------------------------------------------------------------------------------------- assistant


class ConfigMapSource(ApiModel):
    """A ConfigMap whose keys are the assistant's files (flat: ConfigMap keys cannot hold folders)."""

    name: Annotated[str, Field(description="Name of the ConfigMap.", pattern=_DNS_SUBDOMAIN, max_length=253)]


class GitSource(ApiModel):
    """A git repository, cloned at a fixed revision so a recipe is reproducible."""

    url: Annotated[str, Field(description="Clone URL (https:// or ssh).", pattern=_GIT_URL)]
    revision: Annotated[
        str, Field(description="Branch, tag or commit to check out; a commit SHA makes runs reproducible.")
    ] = "main"
    path: Annotated[str, Field(description="Folder of the assistant inside the repository.")] = "."
    credentials_secret_ref: Annotated[
        SecretRef | None,
        Field(
            description="Secret with `username` and `password` (a token) for https, or `ssh-privatekey` "
            "(and optional `known_hosts`) for ssh."
        ),
    ] = None


_ASSISTANT_SOURCES = ("s3", "config_map", "git", "pvc", "local")


class AssistantSource(ExactlyOne):
    _choices: ClassVar[tuple[str, ...]] = _ASSISTANT_SOURCES
    model_config = ConfigDict(json_schema_extra=_exactly_one_schema(_ASSISTANT_SOURCES))

    s3: Annotated[S3Location | None, Field(description="Assistant files under an S3 prefix.")] = None
    config_map: Annotated[ConfigMapSource | None, Field(description="Assistant files in a ConfigMap.")] = None
    git: Annotated[GitSource | None, Field(description="Assistant files in a git repository.")] = None
    pvc: Annotated[PvcPath | None, Field(description="Assistant files on a PersistentVolumeClaim.")] = None
    local: Annotated[LocalPath | None, Field(description="A local folder (`ftrecipe run` only).")] = None


class AssistantSpec(ApiModel):
    """Where the assistant's flows, domain and E2E tests come from."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!has(self.endpoints) || has(self.config)",
                "endpoints is only read together with config: set config (e.g. config.yml) too",
            )
        )
    )

    source: Annotated[
        AssistantSource, Field(description="Where the assistant's files are: exactly one source.")
    ]
    e2e_tests: Annotated[
        list[Annotated[str, Field(min_length=1)]],
        Field(
            description="Files or folders of E2E test YAML inside the source, e.g. the passing tests "
            "written by `rasa test e2e --coverage-report` (e2e_coverage_results/passed.yml).",
            min_length=1,
        ),
    ] = Field(default_factory=lambda: ["e2e_tests"])
    config: Annotated[
        str | None,
        Field(
            description="Rasa config.yml inside the source: the command generator's syntax (from its type), "
            "prompt template and LLM are read from it; commandGenerator's fields, where set, win."
        ),
    ] = None
    endpoints: Annotated[
        str | None,
        Field(
            description="Rasa endpoints.yml inside the source: the model_groups a `model_group` in `config` "
            "refers to. Needs `config`."
        ),
    ] = None

    @model_validator(mode="after")
    def _endpoints_need_config(self) -> AssistantSpec:
        if self.endpoints is not None and self.config is None:
            raise PydanticCustomError(
                "endpoints_without_config",
                "endpoints is only read together with config: set config (e.g. config.yml) too",
            )
        return self


# --------------------------------------------------------------------------------------------- LLMs


class LLMSpec(ApiModel):
    """An OpenAI-compatible chat-completions model, described the way Rasa's `llm` blocks are."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.provider != 'azure' || (has(self.apiBase) && has(self.apiVersion))",
                "provider azure needs apiBase and apiVersion",
            ),
            (
                "self.provider != 'self-hosted' || has(self.apiBase)",
                "provider self-hosted needs apiBase, e.g. http://vllm:8000/v1",
            ),
        )
    )

    provider: Annotated[
        Literal["openai", "azure", "self-hosted"],
        Field(
            description="openai, azure (Azure OpenAI), or self-hosted (any OpenAI-compatible server, e.g. vLLM)."
        ),
    ] = "openai"
    model: Annotated[str, Field(description="Model name, or the Azure deployment name.", min_length=1)]
    api_base: Annotated[
        str | None, Field(description="Base URL of the API, e.g. http://vllm:8000/v1.", pattern=_HTTP_URL)
    ] = None
    api_version: Annotated[str | None, Field(description="API version (Azure only), e.g. 2024-06-01.")] = None
    temperature: Annotated[
        float, Field(description="Sampling temperature; 0 makes annotations repeatable.", ge=0.0, le=2.0)
    ] = 0.0
    max_tokens: Annotated[int | None, Field(description="Cap on tokens per answer.", ge=1, le=131072)] = None
    timeout_seconds: Annotated[
        int, Field(description="Timeout of one request, in seconds.", ge=1, le=3600)
    ] = 60
    api_key_secret_ref: Annotated[
        SecretKeyRef | None,
        Field(
            description="Secret key holding the API key, passed to the Job as OPENAI_API_KEY (AZURE_API_KEY for "
            "azure). Empty for servers without auth. `ftrecipe run` reads the environment instead."
        ),
    ] = None

    @model_validator(mode="after")
    def _provider_needs(self) -> LLMSpec:
        if self.provider == "azure" and (self.api_base is None or self.api_version is None):
            raise PydanticCustomError("provider_fields", "provider azure needs apiBase and apiVersion")
        if self.provider == "self-hosted" and self.api_base is None:
            raise PydanticCustomError(
                "provider_fields", "provider self-hosted needs apiBase, e.g. http://vllm:8000/v1"
            )
        return self


class CommandGeneratorSpec(ApiModel):
    """The production command generator: its prompt and the LLM whose answers are the training labels."""

    syntax: Annotated[
        Literal["v1", "v2", "v3"] | None,
        Field(
            description="Command syntax: v1 `StartFlow(x)` (SingleStep), v2 `start flow x` (Compact), "
            "v3 SearchReady (`search and reply`). Empty: the command generator named in assistant.config "
            "decides, else v2. Set together with assistant.config, it must agree with that generator."
        ),
    ] = None
    prompt_template: Annotated[
        str | None,
        Field(
            description="Jinja2 prompt template inside the assistant source; empty uses ftrecipe's default."
        ),
    ] = None
    llm: Annotated[
        LLMSpec | None,
        Field(
            description="The annotating LLM (the oracle). Required unless dataPreparation.annotator is assertions."
        ),
    ] = None


class RephraserSpec(ApiModel):
    """The LLM that writes paraphrases of user messages."""

    llm: Annotated[LLMSpec | None, Field(description="Rephrasing LLM; empty uses commandGenerator.llm.")] = (
        None
    )
    prompt_template: Annotated[
        str | None,
        Field(description="Jinja2 template inside the assistant source; empty uses ftrecipe's default."),
    ] = None


# --------------------------------------------------------------------------------------------- resources


def _parses(text: str) -> bool:
    try:
        parse_quantity(text)
    except ValueError:
        return False
    return True


def _check_quantity(value: Any) -> Any:
    # One check for both spellings, so a bad value gets one message instead of one per union member.
    if isinstance(value, bool) or not (
        isinstance(value, int)
        or (isinstance(value, str) and re.fullmatch(_QUANTITY, value) and _parses(value))
    ):
        raise PydanticCustomError(
            "quantity",
            "must be a resource quantity such as 2, 500m or 16Gi (got {value})",
            {"value": repr(value)},
        )
    return value


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    Field(
        description="A resource quantity, e.g. 2, 500m, 16Gi.",
        json_schema_extra={"x-kubernetes-int-or-string": True, "pattern": _QUANTITY},
    ),
]


class ResourceRequirements(ApiModel):
    """Standard container resources (requests and limits)."""

    requests: Annotated[
        dict[str, Quantity] | None, Field(description="Minimum resources, e.g. {cpu: 2, memory: 8Gi}.")
    ] = None
    limits: Annotated[
        dict[str, Quantity] | None, Field(description="Maximum resources, e.g. {memory: 16Gi}.")
    ] = None

    @model_validator(mode="after")
    def _requests_within_limits(self) -> ResourceRequirements:
        # The API server refuses such a pod only when the Job creates it; say so while the recipe is read.
        for name, limit in (self.limits or {}).items():
            request = (self.requests or {}).get(name)
            if request is not None and parse_quantity(request) > parse_quantity(limit):
                raise PydanticCustomError(
                    "request_above_limit",
                    "requests.{name} ({request}) is above limits.{name} ({limit}): raise the limit or lower "
                    "the request",
                    {"name": name, "request": str(request), "limit": str(limit)},
                )
        return self


class Toleration(ApiModel):
    """A pod toleration, as in a PodSpec."""

    key: Annotated[str | None, Field(description="Taint key; empty with operator Exists matches all.")] = None
    operator: Annotated[
        Literal["Exists", "Equal"] | None, Field(description="Exists or Equal (default Equal).")
    ] = None
    value: Annotated[str | None, Field(description="Taint value to match with Equal.")] = None
    effect: Annotated[
        Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None,
        Field(description="Taint effect to match; empty matches all."),
    ] = None
    toleration_seconds: Annotated[
        int | None, Field(description="How long a NoExecute taint is tolerated.", ge=0)
    ] = None


def parse_quantity(value: int | str) -> Fraction:
    """A Kubernetes resource quantity as an exact number (`500m` → 1/2, `16Gi` → 16·2³⁰), for comparing."""
    text = str(value).strip()
    match = re.fullmatch(r"([+-]?[0-9.]+)(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?[0-9]+)?", text)
    if match is None:
        raise ValueError(f"not a resource quantity: {text!r}")
    number, suffix = Fraction(match[1]), match[2] or ""
    if suffix[:1] in ("e", "E"):
        return number * Fraction(10) ** int(suffix[1:])
    return number * _QUANTITY_SUFFIXES[suffix]


_QUANTITY_SUFFIXES: Final[dict[str, Fraction]] = {
    "": Fraction(1),
    **{s: Fraction(1024) ** (i + 1) for i, s in enumerate(("Ki", "Mi", "Gi", "Ti", "Pi", "Ei"))},
    **{s: Fraction(1000) ** (i + 1) for i, s in enumerate(("k", "M", "G", "T", "P", "E"))},
    "m": Fraction(1, 1000),
    "u": Fraction(1, 1000**2),
    "n": Fraction(1, 1000**3),
}


# --------------------------------------------------------------------------------------------- pods

# A label or annotation key: an optional DNS-subdomain prefix and '/', then a name of at most 63.
_QUALIFIED_NAME = (
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?"
    r"[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
)
_LABEL_VALUE = r"^(([A-Za-z0-9][-A-Za-z0-9_.]{0,61})?[A-Za-z0-9])?$"
# An extended resource a device plugin advertises: nvidia.com/gpu, nvidia.com/mig-1g.10gb, amd.com/gpu.
_EXTENDED_RESOURCE = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?([.][a-z0-9]([-a-z0-9]*[a-z0-9])?)+/[A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?$"
PATTERN_MEANINGS[_LABEL_VALUE] = (
    "a label value: at most 63 letters, digits, '-', '_' or '.', alphanumeric at both ends"
)
PATTERN_MEANINGS[_EXTENDED_RESOURCE] = (
    "a device plugin's resource name such as nvidia.com/gpu or nvidia.com/mig-1g.10gb"
)

# Pod labels ftrecipe or the Job controller set, or that Kueue would act on: a recipe's own labels must not
# take them over (the operator finds its Jobs and pods by them).
RESERVED_LABEL_PREFIXES: Final = ("ftrecipe.dev/", "batch.kubernetes.io/")
RESERVED_LABELS: Final = (
    "app.kubernetes.io/name",
    "app.kubernetes.io/managed-by",
    "controller-uid",
    "job-name",
    "kueue.x-k8s.io/queue-name",
)
RESERVED_ANNOTATION_PREFIXES: Final = ("ftrecipe.dev/",)
MAX_POD_METADATA: Final = 32  # bounds the CEL cost of checking every key (the API server estimates it)


def _cel_list(items: tuple[str, ...]) -> str:
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


def _key_rules(what: str, prefixes: tuple[str, ...], reserved: tuple[str, ...]) -> dict[str, Any]:
    taken = " && ".join(f"!k.startsWith('{prefix}')" for prefix in prefixes)
    if reserved:
        taken += f" && !(k in {_cel_list(reserved)})"
    return cel_rules(
        (
            f"self.all(k, size(k) <= 317 && k.matches('{_QUALIFIED_NAME}') && "
            "(!k.contains('/') || k.matches('^[^/]{1,253}/')))",
            f"{what} keys are an optional DNS-subdomain prefix and '/', then a name of at most 63 letters, "
            "digits, '-', '_' or '.'",
        ),
        (
            f"self.all(k, {taken})",
            f"{what} keys {', '.join([*(p + '*' for p in prefixes), *reserved])} are set by ftrecipe or "
            "Kubernetes; choose another key",
        ),
    )


def _checked_keys(
    what: str, prefixes: tuple[str, ...], reserved: tuple[str, ...]
) -> Callable[[dict[str, str]], dict[str, str]]:
    def check(value: dict[str, str]) -> dict[str, str]:
        if len(value) > MAX_POD_METADATA:
            raise PydanticCustomError(
                "too_many_keys",
                "at most {most} {what}s (got {count})",
                {"most": MAX_POD_METADATA, "what": what, "count": len(value)},
            )
        for key in value:
            prefix = key.rpartition("/")[0]
            if not re.fullmatch(_QUALIFIED_NAME, key) or len(prefix) > 253:
                raise PydanticCustomError(
                    "qualified_name",
                    "{what} key {key} is not valid: an optional DNS-subdomain prefix and '/', then a name of "
                    "at most 63 letters, digits, '-', '_' or '.'",
                    {"what": what, "key": repr(key)},
                )
            if key.startswith(prefixes) or key in reserved:
                raise PydanticCustomError(
                    "reserved_key",
                    "{what} key {key} is set by ftrecipe or Kubernetes; choose another key",
                    {"what": what, "key": repr(key)},
                )
        return value

    return check


PodLabels = Annotated[
    dict[str, Annotated[str, Field(pattern=_LABEL_VALUE, max_length=63)]],
    AfterValidator(_checked_keys("label", RESERVED_LABEL_PREFIXES, RESERVED_LABELS)),
    Field(json_schema_extra={"maxProperties": MAX_POD_METADATA}),
]
PodAnnotations = Annotated[
    dict[str, Annotated[str, Field(max_length=4096)]],
    AfterValidator(_checked_keys("annotation", RESERVED_ANNOTATION_PREFIXES, ())),
    Field(json_schema_extra={"maxProperties": MAX_POD_METADATA}),
]


class LocalObjectReference(ApiModel):
    """An object in the recipe's namespace, by name (as `imagePullSecrets` entries are)."""

    name: Annotated[str, Field(description="Name of the object.", pattern=_DNS_SUBDOMAIN, max_length=253)]


class ModelCacheSpec(ApiModel):
    """A writable PersistentVolumeClaim that holds the Hugging Face cache across Jobs and retries."""

    claim_name: Annotated[
        str,
        Field(
            description="Name of the PersistentVolumeClaim, mounted read-write at the pods' HF_HOME. "
            "ReadWriteMany lets several recipes and nodes share it; ReadWriteOnce ties the pods to one node.",
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ]


class PodSettings(ApiModel):
    """What every pod of the recipe (data preparation, training, evaluation) shares: identity, registry
    access, metadata and default placement. `training`'s placement fields, where set, replace these for the
    training and evaluation pods (GPU nodes), so the data pod can go elsewhere."""

    service_account_name: Annotated[
        str | None,
        Field(
            description="ServiceAccount of the Job pods: the cloud identity for S3 and the model hub "
            "(IRSA, EKS Pod Identity, GKE or Azure workload identity). Empty: the namespace's default. "
            "Its Kubernetes API token is never mounted; the identity webhooks mount their own.",
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    image_pull_secrets: Annotated[
        list[LocalObjectReference] | None,
        Field(
            description="Secrets (kubernetes.io/dockerconfigjson) for pulling the Job images from a "
            "private registry.",
            max_length=16,
        ),
    ] = None
    labels: Annotated[
        PodLabels | None,
        Field(
            description="Extra labels of the Job pods, e.g. a team or cost centre. ftrecipe's own "
            "(app.kubernetes.io/name, app.kubernetes.io/managed-by, ftrecipe.dev/*), the Job controller's "
            "and kueue.x-k8s.io/queue-name (use queueName) are refused.",
            json_schema_extra=_key_rules("label", RESERVED_LABEL_PREFIXES, RESERVED_LABELS),
        ),
    ] = None
    annotations: Annotated[
        PodAnnotations | None,
        Field(
            description="Extra annotations of the Job pods, e.g. for a service mesh or the cluster "
            "autoscaler. ftrecipe.dev/* are refused.",
            json_schema_extra=_key_rules("annotation", RESERVED_ANNOTATION_PREFIXES, ()),
        ),
    ] = None
    node_selector: Annotated[
        dict[str, str] | None,
        Field(
            description="Node labels every Job pod must match; training.nodeSelector replaces it for GPU pods."
        ),
    ] = None
    tolerations: Annotated[
        list[Toleration] | None,
        Field(description="Tolerations of every Job pod; training.tolerations replaces them for GPU pods."),
    ] = None
    affinity: Annotated[
        dict[str, Any] | None,
        Field(
            description="Affinity of every Job pod, exactly as in a PodSpec; training.affinity replaces it "
            "for GPU pods.",
            json_schema_extra={"type": "object"},
        ),
    ] = None
    priority_class_name: Annotated[
        str | None,
        Field(
            description="PriorityClass of every Job pod; training.priorityClassName replaces it for GPU pods.",
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    runtime_class_name: Annotated[
        str | None,
        Field(
            description="RuntimeClass of every Job pod; training.runtimeClassName replaces it for GPU pods.",
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    fetch_inputs_resources: Annotated[
        ResourceRequirements | None,
        Field(
            description="Resources of the fetch-inputs init container (it clones or copies the assistant). "
            "Unset values: requests cpu 100m, memory 256Mi, ephemeral-storage 256Mi; limits cpu 1, memory "
            "1Gi, ephemeral-storage 4Gi."
        ),
    ] = None


# --------------------------------------------------------------------------------------------- phases


def _check_prompt_datetime(value: Any) -> Any:
    # YAML reads an unquoted 2026-01-15T09:30:00Z as a timestamp: take it back as the text it was.
    if isinstance(value, datetime):
        value = value.isoformat()
    if isinstance(value, str) and re.fullmatch(_ISO_DATETIME, value) and _is_datetime(value):
        return value
    raise PydanticCustomError(
        "datetime",
        "must be an ISO 8601 date and time such as 2026-01-15T09:30:00+00:00 (got {value})",
        {"value": repr(value)},
    )


def _is_datetime(text: str) -> bool:
    try:
        datetime.fromisoformat(text)
    except ValueError:  # e.g. month 13, which the pattern lets through
        return False
    return True


# The pattern in the schema is for the API server; here `_check_prompt_datetime` checks it (and the date).
PromptDatetime = Annotated[
    str, BeforeValidator(_check_prompt_datetime), Field(json_schema_extra={"pattern": _ISO_DATETIME})
]


class DataPreparationSpec(ApiModel):
    """How training data is made from the assistant's E2E tests."""

    annotator: Annotated[
        Literal["llm", "assertions"],
        Field(
            description="llm: the command generator's LLM labels every user turn (verified against the test's "
            "assertions). assertions: labels derived from assertions alone, offline."
        ),
    ] = "llm"
    num_rephrases: Annotated[
        int, Field(description="Rephrasings asked for per user message; 0 skips rephrasing.", ge=0, le=49)
    ] = 10
    rephraser: Annotated[RephraserSpec, Field(description="The rephrasing LLM and prompt.")] = Field(
        default_factory=RephraserSpec
    )
    train_fraction: Annotated[
        float,
        Field(description="Share of test cases in the train split; 1 puts all in train.", gt=0.0, le=1.0),
    ] = 0.8
    output_format: Annotated[
        Literal["instruction", "conversational"],
        Field(
            description="instruction: {prompt, completion}; conversational: {messages: [user, assistant]}."
        ),
    ] = "instruction"
    seed: Annotated[int, Field(description="Seed of the train/validation shuffle.", ge=0)] = 42
    concurrency: Annotated[int, Field(description="Concurrent LLM requests.", ge=1, le=512)] = 16
    prompt_datetime: Annotated[
        PromptDatetime | None,
        Field(
            description="The instant a prompt template's current_datetime shows, ISO 8601 (e.g. "
            "2026-01-15T09:30:00+00:00; without an offset, UTC). Empty: the first run records when it ran "
            "beside its LLM answer cache and re-runs with the same template and LLM reuse that, so they make "
            "the same prompts. A Job's cache lives only as long as the Job: set this for data that a later "
            "Job makes identically.",
        ),
    ] = None
    resources: Annotated[
        ResourceRequirements | None,
        Field(
            description="CPU, memory and ephemeral storage of the data-preparation container (CPU and network "
            "bound: LLM requests). Each of cpu, memory and ephemeral-storage not given takes the default, "
            "kept within what is given: requests cpu 1, memory 2Gi, ephemeral-storage 1Gi; limits cpu 2, "
            "memory 4Gi, ephemeral-storage 10Gi."
        ),
    ] = None
    secret_env: Annotated[
        list[SecretEnvVar],
        Field(
            description="More variables of the data-preparation container from Secret keys: the API keys "
            "the LLMs in assistant.config / endpoints read (OPENAI_API_KEY, or what `api_key: ${VAR}` names). "
            "`ftrecipe run` reads its own environment instead."
        ),
    ] = Field(default_factory=list)


class HuggingFaceModel(ApiModel):
    """A model on the Hugging Face hub."""

    id: Annotated[
        str,
        Field(description="Repository id, e.g. meta-llama/Llama-3.1-8B-Instruct.", pattern=_HF_REPO_ID),
    ]
    revision: Annotated[
        str | None, Field(description="Branch, tag or commit; a commit hash makes runs reproducible.")
    ] = None
    token_secret_ref: Annotated[
        SecretKeyRef | None,
        Field(description="Secret key holding an HF token, for gated models (passed as HF_TOKEN)."),
    ] = None


_BASE_MODEL_SOURCES = ("hugging_face", "s3", "pvc", "local")


class BaseModelSource(ExactlyOne):
    _choices: ClassVar[tuple[str, ...]] = _BASE_MODEL_SOURCES
    model_config = ConfigDict(json_schema_extra=_exactly_one_schema(_BASE_MODEL_SOURCES))

    hugging_face: Annotated[HuggingFaceModel | None, Field(description="A Hugging Face hub model.")] = None
    s3: Annotated[
        S3Location | None, Field(description="A saved model (save_pretrained) under an S3 prefix.")
    ] = None
    pvc: Annotated[PvcPath | None, Field(description="A saved model on a PersistentVolumeClaim.")] = None
    local: Annotated[
        LocalPath | None, Field(description="A saved model in a local folder (`ftrecipe run` only).")
    ] = None


DEFAULT_TARGET_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")

# What vLLM serves, so a recipe cannot train an adapter the server then refuses (sources in docs/training.md).
# `--max-lora-rank` accepts only these values (vllm/config/lora.py, MaxLoRARanks; default 16).
VLLM_LORA_RANKS: Final = (1, 8, 16, 32, 64, 128, 256, 320, 512)
# vLLM wraps these only for model classes that list them in `embedding_modules` and vocabularies it
# supports; elsewhere loading fails ("expected target modules in … but received …"). A command generator
# needs neither.
VLLM_UNSERVABLE_TARGETS: Final = ("lm_head", "embed_tokens")
MAX_TARGET_MODULES: Final = 64  # bounds the CEL cost of checking every name


def _servable_target(name: str) -> str:
    if name.rsplit(".", 1)[-1] in VLLM_UNSERVABLE_TARGETS:
        raise PydanticCustomError(
            "vllm_unservable_target",
            "{name} cannot carry a LoRA that vLLM serves on every model (vLLM adapts lm_head and embed_tokens "
            "only on some architectures and vocabularies); remove it from targetModules",
            {"name": name},
        )
    return name


def _unservable_target_rule() -> str:
    names = _cel_list(VLLM_UNSERVABLE_TARGETS)
    ends = " && ".join(f"!m.endsWith('.{name}')" for name in VLLM_UNSERVABLE_TARGETS)
    return f"!has(self.targetModules) || self.targetModules.all(m, !(m in {names}) && {ends})"


class LoraSpec(ApiModel):
    """LoRA adapter shape (peft LoraConfig)."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                _unservable_target_rule(),
                "targetModules: lm_head and embed_tokens cannot carry a LoRA that vLLM serves on every model; "
                "remove them",
            ),
            (
                "!has(self.bias) || self.bias == 'none'",
                "bias: vLLM does not load adapter biases (support removed in 2025); use none",
            ),
        )
    )

    r: Annotated[
        int,
        Field(
            description="Rank of the update matrices; at most 512, the largest rank vLLM serves "
            "(`--max-lora-rank` accepts 1, 8, 16, 32, 64, 128, 256, 320 or 512; the model card's command "
            "takes the next one up).",
            ge=1,
            le=VLLM_LORA_RANKS[-1],
        ),
    ] = 16
    alpha: Annotated[int, Field(description="Scaling numerator (lora_alpha).", ge=1, le=4096)] = 16
    dropout: Annotated[float, Field(description="Dropout on the LoRA input.", ge=0.0, lt=1.0)] = 0.05
    bias: Annotated[
        Literal["none", "all", "lora_only"],
        Field(
            description="Which biases are trained; only none is accepted, because vLLM does not load the "
            "biases an adapter would ship."
        ),
    ] = "none"
    target_modules: Annotated[
        list[Annotated[str, Field(min_length=1, max_length=253), AfterValidator(_servable_target)]],
        Field(
            description="Module names that get adapters; not lm_head or embed_tokens, which vLLM does not "
            "serve adapted on every model.",
            min_length=1,
            max_length=MAX_TARGET_MODULES,
        ),
    ] = Field(default_factory=lambda: list(DEFAULT_TARGET_MODULES))

    @model_validator(mode="after")
    def _servable_bias(self) -> LoraSpec:
        if self.bias != "none":
            raise PydanticCustomError(
                "vllm_lora_bias",
                "bias {bias}: vLLM does not load adapter biases (support removed in 2025), so the adapter would "
                "not be served; use bias: none",
                {"bias": self.bias},
            )
        return self


class HyperparametersSpec(ApiModel):
    """Optimisation settings; defaults follow Rasa's reference notebook."""

    epochs: Annotated[int, Field(description="Passes over the training data.", ge=1, le=1000)] = 3
    learning_rate: Annotated[float, Field(description="Peak learning rate.", gt=0.0, le=1.0)] = 1.0e-4
    batch_size: Annotated[int, Field(description="Examples per device per step.", ge=1, le=1024)] = 2
    gradient_accumulation_steps: Annotated[
        int, Field(description="Steps accumulated per optimizer update.", ge=1, le=1024)
    ] = 4
    max_seq_length: Annotated[
        int,
        Field(description="Longest example in tokens; longer ones are dropped, never cut.", ge=16, le=131072),
    ] = 4096
    warmup_steps: Annotated[int, Field(description="Linear warm-up steps.", ge=0)] = 20
    weight_decay: Annotated[float, Field(description="AdamW weight decay.", ge=0.0, le=1.0)] = 0.01
    scheduler: Annotated[
        Literal["linear", "cosine", "constant", "constant_with_warmup"],
        Field(description="Learning-rate schedule."),
    ] = "linear"
    seed: Annotated[int, Field(description="Seed of initialisation and data order.", ge=0)] = 42
    gradient_checkpointing: Annotated[
        bool | None,
        Field(
            description="Recompute activations in the backward pass to save GPU memory (about a third "
            "slower). Empty: on only when the weights and the activations of a full micro-batch "
            "(batchSize x maxSeqLength tokens) would not fit in 80% of the GPU memory free when training "
            "starts; off on the CPU."
        ),
    ] = None
    padding_free: Annotated[
        bool | None,
        Field(
            description="Flatten each micro-batch into one row with no padding (TRL padding_free; position "
            "ids restart at each example). Only flash attention 2 (flash-attn installed, an Ampere or newer "
            "GPU) keeps the examples of a row apart, so true needs it; empty: on there, else padded batches "
            "grouped by length. The examples, and so the tokens, per optimizer step are the same either way."
        ),
    ] = None
    loss_logits: Annotated[
        Literal["labels", "all"],
        Field(
            description="Where the output layer is computed for the loss: labels computes it only at the "
            "positions that carry loss (the completion; TRL's fused chunked head on CUDA), all builds the "
            "full logits as a plain transformers Trainer does (batch x tokens x vocabulary: about 2 GB per "
            "4096 tokens of a 128k-vocabulary model in bf16, with their float32 softmax more)."
        ),
    ] = "labels"
    eval_every_steps: Annotated[
        int, Field(description="Validation loss every N optimizer steps (and at each epoch end).", ge=1)
    ] = 200


# Pod hostnames of a multi-node JobSet end in `-node-0-<index>` and must stay DNS labels: the bound keeps
# the index to two digits (`ftrecipe.plan.planner.job_name` leaves room for it).
MAX_NODES: Final = 64


# accelerate's FSDP2 shards bitsandbytes 4-bit weights (stored in the compute dtype: bnb_4bit_quant_storage,
# which the trainer sets under fsdp); 8-bit Int8Params keep scales beside the int8 data and cannot be split.
FSDP_8BIT: Final = (
    "parallelism fsdp with quantization 8bit: bitsandbytes 8-bit weights cannot be sharded "
    "(FSDP supports 4-bit QLoRA only); use quantization 4bit, or parallelism ddp"
)


class TrainingSpec(ApiModel):
    """The LoRA fine-tuning Job."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.method != 'qlora' || self.quantization != 'none'",
                "method qlora needs quantization 4bit or 8bit",
            ),
            ("self.quantization == 'none' || self.gpus >= 1", "quantization (bitsandbytes) needs gpus >= 1"),
            (
                "self.nodes == 1 || self.gpus >= 1",
                "nodes >= 2 (multi-node training) needs gpus >= 1 on each node: set gpus, or nodes: 1",
            ),
            ("self.parallelism != 'fsdp' || self.quantization != '8bit'", FSDP_8BIT),
        )
    )

    base_model: Annotated[BaseModelSource, Field(description="The model to adapt: exactly one source.")]
    method: Annotated[
        Literal["lora", "qlora"], Field(description="lora, or qlora (LoRA over a quantized base model).")
    ] = "lora"
    quantization: Annotated[
        Literal["none", "8bit", "4bit"], Field(description="Load the base model quantized with bitsandbytes.")
    ] = "none"
    lora: Annotated[LoraSpec, Field(description="Adapter shape.")] = Field(default_factory=LoraSpec)
    hyperparameters: Annotated[HyperparametersSpec, Field(description="Optimisation settings.")] = Field(
        default_factory=HyperparametersSpec
    )
    gpus: Annotated[
        int,
        Field(
            description="GPUs for the Job (of gpuResourceName); more than 1 trains data-parallel.",
            ge=0,
            le=16,
        ),
    ] = 1
    gpu_resource_name: Annotated[
        str,
        Field(
            description="The extended resource `gpus` counts: nvidia.com/gpu, a MIG slice such as "
            "nvidia.com/mig-1g.10gb, or another vendor's device plugin (amd.com/gpu, gpu.intel.com/i915).",
            pattern=_EXTENDED_RESOURCE,
            max_length=316,
        ),
    ] = "nvidia.com/gpu"
    nodes: Annotated[
        int,
        Field(
            description="Pods (nodes) the training runs on, each with `gpus` GPUs. 2 or more train across "
            "nodes in a JobSet (jobset.x-k8s.io, installed on the cluster and enabled in the chart), the "
            "global batch growing with the number of GPUs in all; `ftrecipe run` runs 1 only.",
            ge=1,
            le=MAX_NODES,
        ),
    ] = 1
    parallelism: Annotated[
        Literal["ddp", "fsdp"],
        Field(
            description="ddp keeps a full copy of the base model on every GPU; fsdp shards its weights "
            "across all GPUs of all nodes, for base models that do not fit one GPU."
        ),
    ] = "ddp"
    resources: Annotated[
        ResourceRequirements | None,
        Field(
            description="CPU, memory and ephemeral storage of the trainer (and of the evaluator unless "
            "evaluation.resources is set); GPUs come from `gpus`. Each of cpu, memory and ephemeral-storage "
            "not given takes the default, kept within what is given: requests cpu 8, memory 64Gi, "
            "ephemeral-storage 40Gi; limits cpu 16, memory 64Gi, ephemeral-storage 100Gi. Host memory "
            "matters: transformers loads the base model in host memory before the GPU (16 GB in bf16 for an "
            "8B model, once per GPU process), and the HF cache and checkpoints live on the pod's disk "
            "unless modelCache is set."
        ),
    ] = None
    node_selector: Annotated[
        dict[str, str] | None,
        Field(
            description="Node labels the training and evaluation pods must match (replaces pods.nodeSelector)."
        ),
    ] = None
    tolerations: Annotated[
        list[Toleration] | None,
        Field(
            description="Tolerations of the training and evaluation pods, e.g. for GPU node taints "
            "(replaces pods.tolerations)."
        ),
    ] = None
    affinity: Annotated[
        dict[str, Any] | None,
        Field(
            description="Affinity of the training and evaluation pods, exactly as in a PodSpec (replaces "
            "pods.affinity).",
            json_schema_extra={"type": "object"},
        ),
    ] = None
    priority_class_name: Annotated[
        str | None,
        Field(
            description="PriorityClass of the training and evaluation pods (replaces pods.priorityClassName).",
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    runtime_class_name: Annotated[
        str | None,
        Field(
            description="RuntimeClass of the training and evaluation pods, e.g. nvidia on k3s and RKE2, "
            "whose containerd does not use the NVIDIA runtime by default (replaces pods.runtimeClassName).",
            pattern=_DNS_SUBDOMAIN,
            max_length=253,
        ),
    ] = None
    termination_grace_period_seconds: Annotated[
        int,
        Field(
            description="Seconds the trainer gets after SIGTERM (preemption, eviction, a drain) to save a "
            "checkpoint and upload it before it is killed; a large adapter on a slow store needs minutes.",
            ge=30,
            le=7200,
        ),
    ] = 600
    model_cache: Annotated[
        ModelCacheSpec | None,
        Field(
            description="A PersistentVolumeClaim for the Hugging Face cache of the training and evaluation "
            "pods, so a retry or the next recipe does not download the base model again. Empty: the cache "
            "is on the pod's ephemeral storage."
        ),
    ] = None
    checkpoint_every_steps: Annotated[
        int, Field(description="Checkpoint every N optimizer steps, to survive preemption.", ge=1)
    ] = 200
    active_deadline_seconds: Annotated[
        int, Field(description="Wall-clock limit of the training Job, in seconds.", ge=60)
    ] = 86400

    @model_validator(mode="after")
    def _consistent(self) -> TrainingSpec:
        if self.method == "qlora" and self.quantization == "none":
            raise PydanticCustomError("qlora_quantization", "method qlora needs quantization 4bit or 8bit")
        if self.quantization != "none" and self.gpus < 1:
            raise PydanticCustomError("quantization_gpu", "quantization (bitsandbytes) needs gpus >= 1")
        if self.nodes >= 2 and self.gpus < 1:
            raise PydanticCustomError(
                "nodes_gpu",
                "nodes >= 2 (multi-node training) needs gpus >= 1 on each node: set gpus, or nodes: 1",
            )
        if self.parallelism == "fsdp" and self.quantization == "8bit":
            raise PydanticCustomError("fsdp_8bit", FSDP_8BIT)
        return self


class EvaluationSpec(ApiModel):
    """Scoring the adapter on held-out conversations."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "!has(self.minE2EPassRate) || self.e2e",
                "evaluation.minE2EPassRate needs evaluation.e2e: true (the E2E pass rate is only measured "
                "then): set e2e: true, or remove minE2EPassRate",
            ),
        )
    )

    enabled: Annotated[bool, Field(description="Run the evaluation phase.")] = True
    min_command_accuracy: Annotated[
        float,
        Field(
            description="Quality gate: below this command accuracy the recipe fails (0 disables).",
            ge=0.0,
            le=1.0,
        ),
    ] = 0.0
    max_new_tokens: Annotated[
        int, Field(description="Longest generated answer, in tokens.", ge=1, le=4096)
    ] = 64
    resources: Annotated[
        ResourceRequirements | None,
        Field(
            description="CPU, memory and ephemeral storage of the evaluation container (it loads the same "
            "base model). Empty: training.resources, with the same defaults."
        ),
    ] = None
    e2e: Annotated[
        bool,
        Field(
            description="Also replay each held-out E2E test with the adapter in the loop (its own commands "
            "drive the dialogue state) and report the share of tests that pass end to end. The evaluation "
            "then reads the assistant's files and the production prompt, as data preparation does."
        ),
    ] = False
    min_e2e_pass_rate: Annotated[
        float | None,
        Field(
            alias="minE2EPassRate",
            description="Quality gate: below this share of held-out E2E tests passing with the adapter in the "
            "loop the recipe fails. Needs e2e: true.",
            ge=0.0,
            le=1.0,
        ),
    ] = None

    @model_validator(mode="after")
    def _gate_needs_e2e(self) -> EvaluationSpec:
        if self.min_e2e_pass_rate is not None and not self.e2e:
            raise PydanticCustomError(
                "e2e_gate_without_e2e",
                "evaluation.minE2EPassRate needs evaluation.e2e: true (the E2E pass rate is only measured "
                "then): set e2e: true, or remove minE2EPassRate",
            )
        return self


_OUTPUT_TARGETS = ("s3", "local")


class OutputSpec(ExactlyOne):
    """Where datasets, adapters and reports are written: exactly one target."""

    _choices: ClassVar[tuple[str, ...]] = _OUTPUT_TARGETS
    model_config = ConfigDict(json_schema_extra=_exactly_one_schema(_OUTPUT_TARGETS))

    s3: Annotated[S3Location | None, Field(description="An S3 prefix; each phase writes below it.")] = None
    local: Annotated[LocalPath | None, Field(description="A local folder (`ftrecipe run` only).")] = None


class ImagesSpec(ApiModel):
    """Container images overriding the operator's defaults."""

    operator: Annotated[
        str | None, Field(description="Image for data preparation (CPU), e.g. ghcr.io/org/ftrecipe:0.1.0.")
    ] = None
    trainer: Annotated[str | None, Field(description="Image for training and evaluation (CUDA).")] = None


class FinetuneRecipeSpec(ApiModel):
    """What to fine-tune, on which data, how, and where the results go."""

    model_config = ConfigDict(
        json_schema_extra=cel_rules(
            (
                "self.dataPreparation.annotator != 'llm' || has(self.commandGenerator.llm) "
                "|| has(self.assistant.config)",
                "dataPreparation.annotator llm needs commandGenerator.llm (or assistant.config naming the LLM)",
            ),
            (
                "self.dataPreparation.numRephrases == 0 || has(self.commandGenerator.llm) "
                "|| has(self.assistant.config)",
                "dataPreparation.numRephrases > 0 needs commandGenerator.llm (or assistant.config naming the "
                "LLM) to check the rephrasings",
            ),
        )
    )

    assistant: Annotated[AssistantSpec, Field(description="Where the assistant's files come from.")]
    command_generator: Annotated[
        CommandGeneratorSpec, Field(description="The production prompt and the LLM that labels data.")
    ] = Field(default_factory=CommandGeneratorSpec)
    data_preparation: Annotated[DataPreparationSpec, Field(description="How training data is made.")] = Field(
        default_factory=DataPreparationSpec
    )
    training: Annotated[TrainingSpec, Field(description="The LoRA fine-tuning Job.")]
    evaluation: Annotated[EvaluationSpec, Field(description="Scoring on held-out data.")] = Field(
        default_factory=EvaluationSpec
    )
    output: Annotated[OutputSpec, Field(description="Where results are written.")]
    images: Annotated[ImagesSpec, Field(description="Image overrides.")] = Field(default_factory=ImagesSpec)
    pods: Annotated[
        PodSettings,
        Field(
            description="What every Job pod shares: ServiceAccount, image pull Secrets, labels, annotations "
            "and default placement."
        ),
    ] = Field(default_factory=PodSettings)
    queue_name: Annotated[
        str | None,
        Field(
            description="Kueue LocalQueue; Jobs get the kueue.x-k8s.io/queue-name label.", pattern=_DNS_LABEL
        ),
    ] = None
    suspend: Annotated[
        bool, Field(description="Pause: running Jobs are suspended until set back to false.")
    ] = False

    @model_validator(mode="after")
    def _llm_needed(self) -> FinetuneRecipeSpec:
        # Rasa's config.yml may name the LLM (directly or by model group): prepare-data checks it there.
        named = self.command_generator.llm is not None or self.assistant.config is not None
        if self.data_preparation.annotator == "llm" and not named:
            raise PydanticCustomError(
                "llm_required",
                "dataPreparation.annotator llm needs commandGenerator.llm (or assistant.config naming the LLM)",
            )
        if self.data_preparation.num_rephrases > 0 and not named:
            raise PydanticCustomError(
                "llm_required",
                "dataPreparation.numRephrases > 0 needs commandGenerator.llm (or assistant.config naming the "
                "LLM) to check the rephrasings",
            )
        return self


# Spec fields added after recipes were hashed and run, each with the value every recipe had before it
# existed (Python attribute paths). Phase hashes (`ftrecipe.plan.cache_key`) and what Jobs carry
# (`ftrecipe.phases.inputs`) leave a field out while it has that value, so an existing recipe keeps its
# phase hashes, its finished work and its Job manifests byte for byte; any other value counts.
ADDED_LATER: Final[dict[str, Any]] = {
    "training.nodes": 1,
    "training.parallelism": "ddp",
    "evaluation.e2e": False,
}


def added_later_at_default(spec: FinetuneRecipeSpec) -> dict[str, Any]:
    """The `ADDED_LATER` fields that ``spec`` leaves at their earlier value, as a pydantic ``exclude`` tree
    (``{"training": {"nodes": True}}``) for ``model_dump``/``model_dump_json``."""
    tree: dict[str, Any] = {}
    for dotted, before in ADDED_LATER.items():
        *parents, last = dotted.split(".")
        node: Any = spec
        for part in parents:
            node = getattr(node, part, None)
        if node is None or getattr(node, last) != before:
            continue
        branch = tree
        for part in parents:
            branch = branch.setdefault(part, {})
        branch[last] = True
    return tree


# --------------------------------------------------------------------------------------------- status

Phase = Literal["Pending", "PreparingData", "Training", "Evaluating", "Succeeded", "Failed", "Suspended"]
# What a running evaluation does (status.evaluation.stage): the teacher-forced scoring, then the E2E replay.
EvaluationStage = Literal["scoring", "e2e"]
ConditionType = Literal["DataPrepared", "Trained", "Evaluated", "Ready"]


class Condition(ApiModel):
    """A metav1.Condition."""

    model_config = ConfigDict(frozen=True)

    type: Annotated[str, Field(description="DataPrepared, Trained, Evaluated or Ready.")]
    status: Annotated[Literal["True", "False", "Unknown"], Field(description="True, False or Unknown.")]
    reason: Annotated[str, Field(description="CamelCase machine-readable reason.", pattern=_CAMEL_WORD)]
    message: Annotated[str, Field(description="What happened, for people.")] = ""
    last_transition_time: Annotated[datetime, Field(description="When status last changed.")]
    observed_generation: Annotated[
        int | None, Field(description="The spec generation this condition describes.", ge=0)
    ] = None


class DataSummary(ApiModel):
    """Figures from data preparation's result_summary.yaml."""

    num_input_e2e_tests: Annotated[int | None, Field(description="Test cases read.")] = None
    num_annotated_conversations: Annotated[
        int | None, Field(description="Test cases that passed annotation.")
    ] = None
    num_user_messages_to_rephrase: Annotated[
        int | None, Field(description="Annotated user turns of passing tests.")
    ] = None
    num_passing_rephrased_user_messages: Annotated[int | None, Field(description="Rephrasings kept.")] = None
    num_failing_rephrased_user_messages: Annotated[int | None, Field(description="Rephrasings rejected.")] = (
        None
    )
    num_ft_data_points: Annotated[int | None, Field(description="Data points written.")] = None
    num_train_data_points: Annotated[int | None, Field(description="Data points in the train split.")] = None
    num_val_data_points: Annotated[int | None, Field(description="Data points in the validation split.")] = (
        None
    )
    llm_calls: Annotated[int | None, Field(description="LLM requests made (retries included).")] = None


class DataPreparationStatus(ApiModel):
    """Progress and result of data preparation."""

    job_name: Annotated[str | None, Field(description="The data-preparation Job.")] = None
    started_at: Annotated[datetime | None, Field(description="When the phase started.")] = None
    completed_at: Annotated[datetime | None, Field(description="When the phase ended.")] = None
    cached: Annotated[bool | None, Field(description="True when an earlier identical run was reused.")] = None
    dataset_uri: Annotated[
        str | None, Field(alias="datasetURI", description="Where the dataset bundle is.")
    ] = None
    summary: Annotated[DataSummary | None, Field(description="Figures from result_summary.yaml.")] = None


class TrainingStatus(ApiModel):
    """Progress and result of training."""

    job_name: Annotated[str | None, Field(description="The training Job.")] = None
    started_at: Annotated[datetime | None, Field(description="When the phase started.")] = None
    completed_at: Annotated[datetime | None, Field(description="When the phase ended.")] = None
    cached: Annotated[bool | None, Field(description="True when an earlier identical run was reused.")] = None
    step: Annotated[int | None, Field(description="Optimizer steps done.", ge=0)] = None
    total_steps: Annotated[int | None, Field(description="Optimizer steps planned.", ge=0)] = None
    epoch: Annotated[float | None, Field(description="Epochs done (fractional).", ge=0)] = None
    train_loss: Annotated[float | None, Field(description="Latest training loss.")] = None
    eval_loss: Annotated[float | None, Field(description="Latest validation loss.")] = None
    eta_seconds: Annotated[int | None, Field(description="Estimated seconds left.", ge=0)] = None
    adapter_uri: Annotated[
        str | None, Field(alias="adapterURI", description="Where the adapter bundle is.")
    ] = None
    last_checkpoint: Annotated[str | None, Field(description="Latest complete checkpoint.")] = None
    restarts: Annotated[
        int | None,
        Field(
            description="Training on several nodes (a JobSet): how often the group restarted, e.g. after a "
            "lost node.",
            ge=0,
        ),
    ] = None
    max_restarts: Annotated[
        int | None,
        Field(description="Training on several nodes: the restarts allowed before it fails.", ge=0),
    ] = None
    preemptions: Annotated[
        int | None,
        Field(
            description="Training on several nodes: how often a preempted node restarted the group from its "
            "last checkpoint without using up a restart (the operator's --max-evictions bounds them).",
            ge=0,
        ),
    ] = None


class EvaluationStatus(ApiModel):
    """Progress and result of evaluation."""

    job_name: Annotated[str | None, Field(description="The evaluation Job.")] = None
    started_at: Annotated[datetime | None, Field(description="When the phase started.")] = None
    completed_at: Annotated[datetime | None, Field(description="When the phase ended.")] = None
    cached: Annotated[bool | None, Field(description="True when an earlier identical run was reused.")] = None
    stage: Annotated[
        EvaluationStage | None,
        Field(
            description="What the evaluate Job is doing while it runs, and what turnsDone/totalTurns count: "
            "scoring (the validation turns, each asked with the teacher's state) or e2e (the turns of the "
            "held-out E2E tests, replayed with the adapter in the loop). Unset when the evaluate image does "
            "not say, and once the evaluation succeeded (the counts are then the validation turns)."
        ),
    ] = None
    turns_done: Annotated[
        int | None,
        Field(
            description="Turns of the current stage answered by the adapter so far (after success: the "
            "validation turns).",
            ge=0,
        ),
    ] = None
    total_turns: Annotated[
        int | None,
        Field(
            description="Turns of the current stage to answer (after success: the validation turns).", ge=0
        ),
    ] = None
    eta_seconds: Annotated[int | None, Field(description="Estimated seconds left.", ge=0)] = None
    command_accuracy: Annotated[
        float | None,
        Field(description="Share of validation turns answered with exactly the right commands.", ge=0, le=1),
    ] = None
    per_command: Annotated[
        dict[str, float] | None,
        Field(description="F1 by command type on the validation turns, e.g. {start flow: 0.97}."),
    ] = None
    e2e_tests: Annotated[
        int | None, Field(description="Held-out E2E tests replayed with the adapter in the loop (e2e).", ge=0)
    ] = None
    e2e_passed: Annotated[
        int | None, Field(description="Held-out E2E tests that passed every turn with the adapter.", ge=0)
    ] = None
    e2e_pass_rate: Annotated[
        float | None,
        Field(
            description="Share of held-out E2E tests passing with the adapter's own commands driving the "
            "dialogue (e2e).",
            ge=0,
            le=1,
        ),
    ] = None
    report_uri: Annotated[
        str | None, Field(alias="reportURI", description="Where the evaluation report is.")
    ] = None


class PlannedWith(ApiModel):
    """What the recipe's Jobs were planned with. An operator upgrade (new defaults, a new version in the
    phase hashes) keeps these while the spec's generation stays the same, so finished work is never run
    again and running Jobs are adopted; a new generation is planned afresh."""

    generation: Annotated[int, Field(description="The spec generation the hashes were computed for.", ge=0)]
    operator_version: Annotated[str, Field(description="The operator version that computed them.")]
    data: Annotated[str, Field(description="Inputs hash of data preparation.")]
    train: Annotated[str, Field(description="Inputs hash of training.")]
    evaluate: Annotated[str, Field(description="Inputs hash of evaluation.")]


class FinetuneRecipeStatus(ApiModel):
    """Where the recipe stands; written by the operator only."""

    phase: Annotated[
        Phase | None,
        Field(description="Pending, PreparingData, Training, Evaluating, Succeeded, Failed or Suspended."),
    ] = None
    observed_generation: Annotated[
        int | None, Field(description="The spec generation last acted on.", ge=0)
    ] = None
    observed_retry: Annotated[
        str | None,
        Field(
            description="The ftrecipe.dev/retry annotation value last acted on: a different value re-runs "
            "the failed phase."
        ),
    ] = None
    started_at: Annotated[datetime | None, Field(description="When the first phase started.")] = None
    completed_at: Annotated[datetime | None, Field(description="When the recipe succeeded or failed.")] = None
    message: Annotated[str | None, Field(description="One line on the current state, for people.")] = None
    conditions: Annotated[
        list[Condition] | None,
        Field(
            description="DataPrepared, Trained, Evaluated and Ready (true only on success).",
            json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        ),
    ] = None
    data_preparation: Annotated[DataPreparationStatus | None, Field(description="Data preparation.")] = None
    training: Annotated[TrainingStatus | None, Field(description="Training.")] = None
    evaluation: Annotated[EvaluationStatus | None, Field(description="Evaluation.")] = None
    planned_with: Annotated[
        PlannedWith | None,
        Field(
            description="The spec generation, operator version and phase hashes the Jobs were planned with."
        ),
    ] = None


class ObjectMeta(BaseModel):
    """The part of metav1.ObjectMeta a recipe file carries; everything else is kept as is."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: Annotated[str | None, Field(pattern=_DNS_SUBDOMAIN, max_length=253)] = None
    namespace: Annotated[str | None, Field(pattern=_DNS_LABEL, max_length=63)] = None


class FinetuneRecipe(ApiModel):
    """Fine-tunes a Rasa CALM command generator: prepares data, trains a LoRA adapter, evaluates it."""

    api_version: Annotated[Literal["ftrecipe.dev/v1alpha1"], Field(description="ftrecipe.dev/v1alpha1.")] = (
        API_VERSION
    )
    kind: Annotated[Literal["FinetuneRecipe"], Field(description="FinetuneRecipe.")] = KIND
    metadata: Annotated[ObjectMeta, Field(description="Standard object metadata.")] = Field(
        default_factory=ObjectMeta
    )
    spec: Annotated[FinetuneRecipeSpec, Field(description="The recipe.")]
    status: Annotated[FinetuneRecipeStatus | None, Field(description="Written by the operator.")] = None
