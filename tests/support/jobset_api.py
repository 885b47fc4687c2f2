"""The structure of a jobset.x-k8s.io/v1alpha2 JobSet, checked offline: what the API server (the JobSet
CRD's schema) and the JobSet webhook would refuse.

Written by hand from JobSet's published API reference (site/content/en/docs/reference/jobset.v1alpha2.md
and the Go types in api/jobset/v1alpha2/jobset_types.go of kubernetes-sigs/jobset: fields, types, which
are required, the enums) and from the webhook's create-time rules (api/jobset/v1alpha2/jobset_webhook.go:
the generated Job and pod names must be DNS-1035 labels); not copied from the JobSet CRD. Fields we never
set (startupPolicy, coordinator, volumeClaimPolicies, dependsOn) are allowed in the shape the reference
gives and otherwise unchecked. The Job template itself is a batch/v1 JobTemplateSpec: `job_template_as_job`
wraps it into a Job for kubernetes-validate.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, StrictBool, StrictInt, StrictStr, ValidationError

INT32_MAX = 2**31 - 1
Int32 = Annotated[StrictInt, Field(ge=-(2**31), le=INT32_MAX)]
# RFC 1035 label: what Services (the JobSet's headless Service is named like it) and the webhook's name
# checks demand.
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
RULE_NAME = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"  # FailurePolicyRule.name, from the reference
FAILURE_ACTIONS = Literal[
    "FailJobSet",
    "RestartJobSet",
    "RestartJobSetAndIgnoreMaxRestarts",
    "RestartJob",
    "RestartJobAndIgnoreMaxRestarts",
]
POD_NAME_SUFFIX = "-abcde"  # the webhook checks the longest pod name with a 5-character random suffix


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class ObjectMeta(BaseModel):
    """The parts of ObjectMeta we check; the rest is validated by Kubernetes' own ObjectMeta rules."""

    model_config = ConfigDict(extra="allow", strict=True)
    name: StrictStr
    namespace: StrictStr | None = None
    labels: dict[StrictStr, StrictStr] | None = None
    annotations: dict[StrictStr, StrictStr] | None = None


class JobTemplateSpec(Strict):
    """batch/v1 JobTemplateSpec: checked in depth by `job_template_as_job` + kubernetes-validate."""

    metadata: dict[str, Any] | None = None
    spec: dict[str, Any]


class DependsOn(Strict):
    name: StrictStr
    status: Literal["Ready", "Complete"]


class ReplicatedJob(Strict):
    name: StrictStr
    group_name: StrictStr | None = Field(default=None, alias="groupName")
    template: JobTemplateSpec
    replicas: Annotated[Int32, Field(ge=0)] = 1
    depends_on: list[DependsOn] | None = Field(default=None, alias="dependsOn", max_length=5)


class Network(Strict):
    enable_dns_hostnames: StrictBool | None = Field(default=None, alias="enableDNSHostnames")
    subdomain: StrictStr | None = None
    publish_not_ready_addresses: StrictBool | None = Field(default=None, alias="publishNotReadyAddresses")


class SuccessPolicy(Strict):
    operator: Literal["All", "Any"]
    target_replicated_jobs: list[StrictStr] | None = Field(default=None, alias="targetReplicatedJobs")


class FailurePolicyRule(Strict):
    name: Annotated[StrictStr, Field(pattern=RULE_NAME)]
    action: FAILURE_ACTIONS
    on_job_failure_reasons: list[StrictStr] | None = Field(default=None, alias="onJobFailureReasons")
    on_job_failure_message_patterns: list[StrictStr] | None = Field(
        default=None, alias="onJobFailureMessagePatterns"
    )
    target_replicated_jobs: list[StrictStr] | None = Field(default=None, alias="targetReplicatedJobs")


class FailurePolicy(Strict):
    max_restarts: Int32 | None = Field(default=None, alias="maxRestarts")
    restart_strategy: Literal["Recreate", "BlockingRecreate", "InPlaceRestart"] | None = Field(
        default=None, alias="restartStrategy"
    )
    rules: list[FailurePolicyRule] | None = None


class StartupPolicy(Strict):
    startup_policy_order: Literal["AnyOrder", "InOrder"] = Field(alias="startupPolicyOrder")


class JobSetSpec(Strict):
    replicated_jobs: list[ReplicatedJob] = Field(alias="replicatedJobs", min_length=1)
    network: Network | None = None
    success_policy: SuccessPolicy | None = Field(default=None, alias="successPolicy")
    failure_policy: FailurePolicy | None = Field(default=None, alias="failurePolicy")
    startup_policy: StartupPolicy | None = Field(default=None, alias="startupPolicy")
    suspend: StrictBool | None = None
    coordinator: dict[str, Any] | None = None
    managed_by: Annotated[StrictStr, Field(max_length=63)] | None = Field(default=None, alias="managedBy")
    ttl_seconds_after_finished: Annotated[Int32, Field(ge=0)] | None = Field(
        default=None, alias="ttlSecondsAfterFinished"
    )
    volume_claim_policies: list[dict[str, Any]] | None = Field(
        default=None, alias="volumeClaimPolicies", max_length=50
    )


class JobSet(Strict):
    api_version: Literal["jobset.x-k8s.io/v1alpha2"] = Field(alias="apiVersion")
    kind: Literal["JobSet"]
    metadata: ObjectMeta
    spec: JobSetSpec
    status: dict[str, Any] | None = None


def _dns1035(value: str, what: str) -> list[str]:
    problems = []
    if len(value) > 63:
        problems.append(f"{what} {value!r}: longer than 63 characters")
    if not DNS1035_LABEL.match(value):
        problems.append(f"{what} {value!r}: not a DNS-1035 label (a-z first, then a-z, 0-9, -)")
    return problems


def jobset_violations(manifest: dict[str, Any]) -> list[str]:
    """What the API server or the JobSet webhook would refuse in ``manifest``, one line each ([] = none)."""
    try:
        jobset = JobSet.model_validate(manifest)
    except ValidationError as error:
        return [f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()]
    problems: list[str] = []
    name = jobset.metadata.name
    # The headless Service for DNS hostnames is named like the JobSet (or network.subdomain).
    subdomain = (jobset.spec.network.subdomain if jobset.spec.network else None) or name
    problems += _dns1035(subdomain, "subdomain (the headless Service's name)")
    names = [rjob.name for rjob in jobset.spec.replicated_jobs]
    if len(set(names)) != len(names):  # listType=map, listMapKey=name
        problems.append(f"replicatedJobs: names must be unique ({names})")
    for rjob in jobset.spec.replicated_jobs:
        spec = rjob.template.spec
        parallelism = spec.get("parallelism", 1)
        if parallelism * rjob.replicas > INT32_MAX:
            problems.append(f"replicatedJobs[{rjob.name}]: replicas x parallelism above int32")
        longest_job = f"{name}-{rjob.name}-{rjob.replicas - 1}"
        problems += _dns1035(longest_job, "child Job name")
        if spec.get("completionMode") == "Indexed" and spec.get("completions") is not None:
            longest_pod = f"{longest_job}-{spec['completions'] - 1}{POD_NAME_SUFFIX}"
            problems += _dns1035(longest_pod, "pod name")
    targets = [
        *(jobset.spec.success_policy.target_replicated_jobs or [] if jobset.spec.success_policy else []),
        *(
            target
            for rule in (jobset.spec.failure_policy.rules or [] if jobset.spec.failure_policy else [])
            for target in rule.target_replicated_jobs or []
        ),
    ]
    problems += [f"targetReplicatedJobs: {t!r} is not a replicatedJob" for t in targets if t not in names]
    if jobset.spec.failure_policy is not None:
        rules = jobset.spec.failure_policy.rules or []
        rule_names = [rule.name for rule in rules]
        if len(set(rule_names)) != len(rule_names):
            problems.append(f"failurePolicy.rules: names must be unique ({rule_names})")
        for rule in rules:
            reasons = rule.on_job_failure_reasons or []
            if len(set(reasons)) != len(reasons):
                problems.append(f"failurePolicy.rules[{rule.name}].onJobFailureReasons: items must be unique")
            patterns = rule.on_job_failure_message_patterns or []
            if len(set(patterns)) != len(patterns):  # kubebuilder UniqueItems, as on the reasons
                problems.append(
                    f"failurePolicy.rules[{rule.name}].onJobFailureMessagePatterns: items must be unique"
                )
            for pattern in patterns:
                # Not the webhook's (it accepts any string): the controller skips a pattern that does not
                # compile, so the rule would silently never match. Python's re stands in for RE2 here.
                try:
                    re.compile(pattern)
                except re.error as error:
                    problems.append(
                        f"failurePolicy.rules[{rule.name}].onJobFailureMessagePatterns: {pattern!r} is not a "
                        f"regular expression ({error}); JobSet's controller would skip it"
                    )
    return problems


def job_template_as_job(manifest: dict[str, Any], replicated_job: str) -> dict[str, Any]:
    """The replicated Job's template as the batch/v1 Job the JobSet controller creates from it (job index
    0), for kubernetes-validate: a JobTemplateSpec's spec is a JobSpec."""
    rjob = next(r for r in manifest["spec"]["replicatedJobs"] if r["name"] == replicated_job)
    metadata = dict(rjob["template"].get("metadata") or {})
    metadata.update(
        name=f"{manifest['metadata']['name']}-{replicated_job}-0",
        namespace=manifest["metadata"].get("namespace"),
    )
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": rjob["template"]["spec"]}
