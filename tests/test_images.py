"""The Dockerfiles in images/, parsed and checked (they cannot be built in the test environment: no docker,
no network): bases pinned by tag and digest, multi-stage, a numeric non-root USER that matches the Job
pods, HOME=/tmp for a read-only root filesystem, OCI labels, no credentials baked in, no torch in the
operator image, and make targets that build them."""

from __future__ import annotations

import re
import shlex
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from ftrecipe.controller.manifests import NON_ROOT_ID

ROOT = Path(__file__).resolve().parents[1]
IMAGES = ROOT / "images"
DOCKERFILES = {"operator": IMAGES / "operator" / "Dockerfile", "trainer": IMAGES / "trainer" / "Dockerfile"}
PINNED = re.compile(r"^[a-z0-9./_-]+(:[0-9]+)?/?[a-z0-9./_-]*:[\w][\w.-]{0,127}@sha256:[a-f0-9]{64}$")
SECRET_WORDS = ("KEY", "TOKEN", "PASSWORD", "SECRET", "CREDENTIAL", "PASSWD")
SECRET_FILES = re.compile(
    r"(^|/)(\.env|\.netrc|\.npmrc|\.pypirc|\.aws|\.ssh|id_rsa|id_ed25519|credentials)\b"
)
OCI_LABELS = {
    "org.opencontainers.image.title",
    "org.opencontainers.image.description",
    "org.opencontainers.image.version",
    "org.opencontainers.image.revision",
    "org.opencontainers.image.created",
    "org.opencontainers.image.licenses",
}


@dataclass
class Stage:
    base: str  # the FROM image with build arguments substituted
    name: str | None
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [rest for kw, rest in self.instructions if kw == keyword]


@dataclass
class Dockerfile:
    global_args: dict[str, str]
    stages: list[Stage]

    @property
    def final(self) -> Stage:
        return self.stages[-1]


def instructions(text: str) -> list[tuple[str, str]]:
    """(KEYWORD, rest) per instruction: comments dropped, backslash continuations joined."""
    found: list[tuple[str, str]] = []
    pending = ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        line, pending = pending + line, ""
        keyword, _, rest = line.partition(" ")
        found.append((keyword.upper(), rest.strip()))
    assert not pending, "the Dockerfile ends inside a continued line"
    return found


def assignments(rest: str) -> dict[str, str]:
    """`A=1 B="two words"` (ENV, LABEL, ARG) as a dict; an ARG without a default maps to ''."""
    out = {}
    for word in shlex.split(rest):
        key, _, value = word.partition("=")
        out[key] = value
    return out


def substitute(text: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m[1], m[0]), text)


def parse(path: Path) -> Dockerfile:
    global_args: dict[str, str] = {}
    stages: list[Stage] = []
    for keyword, rest in instructions(path.read_text()):
        if keyword == "FROM":
            words = rest.split()
            name = words[2] if len(words) == 3 and words[1].upper() == "AS" else None
            stages.append(Stage(substitute(words[0], global_args), name))
        elif not stages:
            assert keyword == "ARG", f"{path}: only ARG may come before the first FROM, not {keyword}"
            global_args.update(assignments(rest))
        else:
            stages[-1].instructions.append((keyword, rest))
    return Dockerfile(global_args, stages)


@pytest.fixture(params=sorted(DOCKERFILES), ids=sorted(DOCKERFILES))
def image(request: pytest.FixtureRequest) -> tuple[str, Dockerfile]:
    name: str = request.param
    return name, parse(DOCKERFILES[name])


def test_bases_are_pinned_by_tag_and_digest(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    seen: list[str] = []
    for stage in dockerfile.stages:
        if stage.base in seen:  # an earlier stage used as a base
            continue
        assert PINNED.match(stage.base), f"{name}: FROM {stage.base} is not pinned as image:tag@sha256:…"
        if stage.name:
            seen.append(stage.name)
    for default in dockerfile.global_args.values():
        if "/" in default or ":" in default:
            assert PINNED.match(default), f"{name}: ARG default {default} is an unpinned image"


def test_multi_stage_with_a_named_build_stage(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    assert len(dockerfile.stages) >= 2, f"{name}: build and runtime stages expected"
    assert dockerfile.stages[0].name == "build"
    copies = " ".join(dockerfile.final.all("COPY"))
    assert "--from=build" in copies, f"{name}: the runtime stage takes its build output from the build stage"


def test_runs_as_the_job_pods_non_root_user(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    users = dockerfile.final.all("USER")
    assert users, f"{name}: the runtime stage sets no USER"
    assert re.fullmatch(r"\d+(:\d+)?", users[-1]), f"{name}: USER must be numeric (runAsNonRoot checks it)"
    assert [int(part) for part in users[-1].split(":")] == [NON_ROOT_ID, NON_ROOT_ID]
    # USER is the last word on privileges: nothing runs as root after it.
    keywords = [kw for kw, _ in dockerfile.final.instructions]
    assert "RUN" not in keywords[keywords.index("USER") :]


def test_works_with_a_read_only_root_filesystem(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    env: dict[str, str] = {}
    for rest in dockerfile.final.all("ENV"):
        env.update(assignments(rest))
    assert env["HOME"] == "/tmp", f"{name}: HOME must be on the writable /tmp volume"
    assert env["XDG_CACHE_HOME"].startswith("/tmp/")
    assert env["PYTHONDONTWRITEBYTECODE"] == "1"
    assert dockerfile.final.all("WORKDIR")[-1] == "/workspace"
    # A passwd entry for the uid: ssh (git sources) and torch look the running user up.
    run = " ".join(dockerfile.final.all("RUN"))
    assert f"useradd --uid {NON_ROOT_ID} --gid {NON_ROOT_ID} --home-dir /tmp" in run


def test_oci_labels(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    labels: dict[str, str] = {}
    for rest in dockerfile.final.all("LABEL"):
        labels.update(assignments(rest))
    assert set(labels) >= OCI_LABELS, f"{name}: missing {sorted(OCI_LABELS - set(labels))}"
    assert labels["org.opencontainers.image.version"] == "${VERSION}"
    assert labels["org.opencontainers.image.revision"] == "${REVISION}"


def test_no_credentials_baked_in(image: tuple[str, Dockerfile]) -> None:
    name, dockerfile = image
    names = list(dockerfile.global_args)
    for stage in dockerfile.stages:
        for keyword, rest in stage.instructions:
            if keyword in ("ENV", "ARG"):
                names += list(assignments(rest))
            if keyword in ("COPY", "ADD"):
                for source in shlex.split(rest)[:-1]:
                    assert not SECRET_FILES.search(source), f"{name}: {keyword} {rest} copies a secret file"
            assert keyword != "ADD", f"{name}: use COPY (ADD fetches URLs and unpacks archives)"
            assert "--mount=type=secret" not in rest or keyword == "RUN"
    for variable in names:
        assert not any(word in variable.upper() for word in SECRET_WORDS), (
            f"{name}: {variable} looks like a secret"
        )


def test_operator_image_has_no_training_stack() -> None:
    dockerfile = parse(DOCKERFILES["operator"])
    installs = [
        install.strip()
        for stage in dockerfile.stages
        for rest in stage.all("RUN")
        for install in re.findall(r"pip install ([^&;|]*)", rest)
    ]
    assert installs == ["."], "the package alone, without extras"
    # The build fails if a dependency ever pulls torch in.
    assert 'python -c "import torch"' in " ".join(dockerfile.stages[0].all("RUN"))
    assert "slim" in dockerfile.stages[0].base
    # git and ssh for `fetch-inputs` with git sources (it runs in this image as every Job's init container).
    assert "git openssh-client" in " ".join(dockerfile.final.all("RUN"))


def test_trainer_image_installs_the_train_extra_on_the_cuda_torch() -> None:
    dockerfile = parse(DOCKERFILES["trainer"])
    base, runtime = dockerfile.stages[0].base, dockerfile.final.base
    assert base.startswith("pytorch/pytorch:") and "-devel@" in base
    assert runtime.startswith("pytorch/pytorch:") and "-runtime@" in runtime
    # Same PyTorch and CUDA in both stages: flash-attn is built against the devel image's torch.
    assert base.split("@")[0].removesuffix("-devel") == runtime.split("@")[0].removesuffix("-runtime")
    run = " ".join(dockerfile.final.all("RUN"))
    assert "[train]" in run and "--constraint /tmp/torch-constraint.txt" in run
    build_args = {}
    for rest in dockerfile.stages[0].all("ARG"):
        build_args.update(assignments(rest))
    assert build_args["FLASH_ATTN"] == "false", "flash attention is opt-in"
    assert "flash-attn==${FLASH_ATTN_VERSION}" in " ".join(dockerfile.stages[0].all("RUN"))


@pytest.mark.parametrize("name", sorted(DOCKERFILES))
def test_build_context_is_limited(name: str) -> None:
    ignore = (DOCKERFILES[name].parent / "Dockerfile.dockerignore").read_text().splitlines()
    rules = [line.strip() for line in ignore if line.strip() and not line.startswith("#")]
    assert rules[0] == "*", "start from nothing and let only what the build copies in"
    allowed = {rule.removeprefix("!").rstrip("/") for rule in rules if rule.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "operator"}
    copied = {
        word.rstrip("/").removeprefix("./")
        for _, rest in instructions(DOCKERFILES[name].read_text())
        if _ == "COPY" and "--from" not in rest
        for word in shlex.split(rest)[:-1]
    }
    assert copied <= allowed


def test_make_targets_build_each_image() -> None:
    makefile = (ROOT / "Makefile").read_text()
    for target, dockerfile in (("image-operator", "operator"), ("image-trainer", "trainer")):
        recipe = re.search(rf"^{target}:.*\n((?:\t.*\n)+)", makefile, flags=re.MULTILINE)
        assert recipe, f"no `make {target}`"
        assert f"-f images/{dockerfile}/Dockerfile" in recipe[1]
        assert recipe[1].rstrip().endswith(".")  # the repository root is the build context
    assert "ftrecipe-trainer:$(IMAGE_TAG)" in makefile and "/ftrecipe:$(IMAGE_TAG)" in makefile
