"""`ftrecipe train`: LoRA fine-tuning with TRL's SFTTrainer, resumable, writing a servable bundle.

The flow: resolve the data and base model (local folders, s3:// bundles, or hf:ORG/NAME[@REV]), load the
model in the precision this GPU has natively, hand TRL the records as prompt-completion chats and the
LoRA config (`training.sft`: TRL tokenizes with the chat template, loss on completion tokens only,
too-long examples dropped, the LM head only where the labels are), train with padding-free or
length-grouped batches, evaluate on the validation split every `evalEverySteps` and at each epoch end,
checkpoint every `checkpointEverySteps`, and publish the adapter bundle with the storage module's atomic
protocol.

Checkpoints must outlive the pod: the Trainer writes one into `<work>/checkpoints/checkpoint-<N>/`, it is
renamed to `step-<N>` once complete, then published as a bundle of its own to `<out>/checkpoints/step-<N>/`
(its `_SUCCESS` marks it complete; the last `KEEP_CHECKPOINTS` are kept, older ones are emptied). A rerun
with the same inputs, on any machine, fetches the latest complete one of this run (same inputs hash) into
the work folder and resumes from it. The adapter bundle at `<out>` lists only its own files, so the
checkpoint bundles beside it survive its publication; once it is published they are deleted (a copy of
the adapter's prefix must not carry them). SIGTERM (a preempted pod) is recorded from the start; at the
next step end that every rank agrees on (`agreed_stop`), a checkpoint is saved and published and the run
exits with `EXIT_PREEMPTED`. Each epoch's data order comes from `seed + epoch` (`sampling`), so a resumed
run continues exactly where the interrupted one was.

Several GPUs or nodes: the CLI re-runs itself under torchrun (`launch.launch_command`). Each node's local
rank 0 fetches the inputs and the checkpoint onto its own disk; global rank 0 alone publishes, after the
other nodes sent it their parts of each checkpoint (`gather_checkpoint_files`).
"""

from __future__ import annotations

import contextlib
import datetime
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Literal

from ftrecipe.hashing import stable_hash
from ftrecipe.training.bundle import (
    KEEP_CHECKPOINTS,
    BundleInfo,
    data_provenance,
    write_bundle,
    write_loss_curve,
)
from ftrecipe.training.config import TrainConfig
from ftrecipe.training.data import DataError, Splits, dataset_hash, ensure_chat_template, find_splits
from ftrecipe.training.launch import (
    EXIT_PREEMPTED as EXIT_PREEMPTED,  # 128 + SIGTERM: a checkpoint was written, rerun to resume
)
from ftrecipe.training.launch import (
    RANK_REPORTS_ENV,
    RankFailure,
    is_main_process,
    is_node_main_process,
    pod_outcome,
)

RANK_WAIT_SECONDS = 7200  # how long ranks wait for one another (collectives, rank 0's downloads)
CHECKPOINT_PREFIX = "step-"
CHECKPOINTS_DIR = "checkpoints"  # under the work folder, and under --out (the durable copies)
CHECKPOINT_METRICS = "ftrecipe-metrics.jsonl"  # metrics.jsonl up to the checkpoint, inside it
CHECKPOINT_PRODUCER = "ftrecipe train (checkpoint)"
MERGED_DIR = "merged"  # --merge: the full merged model, inside the bundle
_STEP_DIR = re.compile(r"^step-(\d+)$")
# Spec fields that do not change the trained weights: a work folder stays resumable across them.
_NOT_IN_HASH = {
    "checkpoint_every_steps",
    "active_deadline_seconds",
    "resources",
    "node_selector",
    "tolerations",
    "affinity",
    "priority_class_name",
    "gpus",
    "base_model",
    "nodes",  # nodes x gpus is the world size, which the hash holds
    "parallelism",  # in the hash only when not ddp (`inputs_hash`): ddp runs keep their hashes
}


class TrainError(Exception):
    """A problem the user can fix (bad input, missing model, no GPU): reported as one line, exit 2."""


class Preempted(Exception):
    """SIGTERM arrived; a checkpoint was saved."""


class StopSignal:
    """SIGTERM recorded from the very start of a run (before the inputs are fetched and the model loads),
    and acted on at the next step end, when every rank agrees (`agreed_stop`).

    Installed early because the process may be PID 1 of its container, where a signal without a handler is
    ignored: a pod preempted while loading its model would otherwise sit out its grace period.
    """

    def __init__(self) -> None:
        self.received = False  # by this process
        self.agreed = False  # by every rank: training stops (set by `agree`)
        self._previous: Any = None

    def agree(self, device: Any = None) -> bool:
        """Whether to stop now: asked of every rank at the same point (`agreed_stop`)."""
        self.agreed = self.agreed or agreed_stop(self.received, device)
        return self.agreed

    def _record(self, signum: int, frame: FrameType | None) -> None:
        self.received = True
        _sigterm_received.append(time.time())

    def __enter__(self) -> StopSignal:
        self._previous = signal.signal(signal.SIGTERM, self._record)
        return self

    def __exit__(self, exc_type: type[BaseException] | None, *rest: object) -> None:
        # A preempted rank is on its way out (EXIT_PREEMPTED). The torchrun agent sends SIGTERM to the ranks
        # left once one has exited: it must not cut rank 0's report short, so there the handler stays. In
        # one process (a caller such as a test goes on living) the previous handler comes back.
        if exc_type is not Preempted or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
            signal.signal(signal.SIGTERM, self._previous)


def agreed_stop(requested: bool, device: Any = None) -> bool:
    """Whether any rank was asked to stop: the flags all-reduced (max); the flag itself in one process.

    Every rank calls this at the same point (each step end), so all stop at the same step and save one
    checkpoint together; a rank stopping alone would leave the others waiting in a collective.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return requested
    import torch

    flag = torch.tensor([1 if requested else 0], dtype=torch.int32, device=device)
    dist.all_reduce(flag, op=dist.ReduceOp.MAX)
    return bool(flag.item())


# When this process got SIGTERM (process-wide, as the signal is): a rank that then fails was being stopped
# (by torchrun, after another rank failed), so its failure is not the root cause (`launch.RankFailure`).
_sigterm_received: list[float] = []


def sigterm_received() -> bool:
    """Whether this process got a SIGTERM while a `StopSignal` was in place."""
    return bool(_sigterm_received)


Emit = Callable[[dict[str, Any]], None]


def _no_event(event: dict[str, Any]) -> None:
    """Ranks other than 0 report nothing."""


def print_event(event: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(event) + "\n")
    sys.stdout.flush()


@dataclass
class TrainOptions:
    data: str
    base_model: str
    out: str
    config: TrainConfig
    work_dir: Path | None = None
    adapter_name: str | None = None
    merge: bool = False


@dataclass
class TrainResult:
    steps: int
    resumed_from: int | None
    train_examples: int
    dropped_too_long: int
    final_eval_loss: float | None
    out: str
    metrics: list[dict[str, Any]] = field(default_factory=list)

    def figures(self) -> dict[str, Any]:
        """What the operator shows in status.training (via the termination message)."""
        losses = [m["train_loss"] for m in self.metrics if m.get("train_loss") is not None]
        last_train = losses[-1] if losses else None
        return {
            "step": self.steps,
            "total_steps": self.steps,
            "resumed_from": self.resumed_from,
            "train_examples": self.train_examples,
            "dropped_too_long": self.dropped_too_long,
            "train_loss": last_train,
            "eval_loss": self.final_eval_loss,
            "adapter_uri": self.out,
        }

    def summary(self) -> str:
        loss = "n/a" if self.final_eval_loss is None else f"{self.final_eval_loss:.4f}"
        return (
            f"trained {self.steps} steps on {self.train_examples} examples "
            f"({self.dropped_too_long} dropped as too long), eval_loss {loss}; adapter published to {self.out}"
        )


# --------------------------------------------------------------------------------------------- inputs


@dataclass(frozen=True)
class BaseModelRef:
    """Where the weights are loaded from, and how the bundle names them."""

    load_from: str  # a local folder or a hub id
    revision: str | None
    model_id: str  # what goes into run.json / vllm serve
    source: str  # what the user passed


def _is_s3(text: str) -> bool:
    return text.startswith("s3://")


def fetch_input(
    uri: str, target: Path, what: str, fetch: bool = True, only: Callable[[str], bool] | None = None
) -> Path:
    """The complete bundle at `uri` in `target` (verified); TrainError naming `what` and the URI.

    `fetch=False`: a rank other than its node's local rank 0, which fetched it onto this node's disk first.
    `only`: the files (manifest paths) this node needs; the others are neither fetched nor kept.
    """
    from ftrecipe.storage import StorageError, fetch_bundle

    if not fetch:
        if not target.is_dir():
            raise TrainError(f"{what} {uri}: not in {target} on this node; its local rank 0 fetches it first")
        return target
    try:
        manifest = fetch_bundle(uri, target, only=only)
    except StorageError as exc:
        raise TrainError(f"{what} {uri}: {exc}") from None
    # A reused work folder may hold an older bundle's files (a val.jsonl, a weight shard): drop them.
    wanted = {
        target.joinpath(*item.path.split("/")) for item in manifest.files if only is None or only(item.path)
    }
    for path in sorted(target.rglob("*"), reverse=True):
        if path.is_file() and path not in wanted:
            path.unlink()
    return target


def resolve_data(data: str, work_dir: Path, fetch: bool = True) -> Splits:
    folder = fetch_input(data, work_dir / "data", "data", fetch) if _is_s3(data) else Path(data)
    try:
        return find_splits(folder)
    except DataError as exc:
        raise TrainError(str(exc)) from None


def resolve_base_model(
    base_model: str, work_dir: Path, fetch: bool = True, weights: bool = True
) -> BaseModelRef:
    """Where the base model loads from; an S3 one fetched into `work_dir` first.

    `weights=False` (a node whose ranks build the model on `meta` under fsdp: `fsdp.reads_weights`):
    an S3 model's weight files are not fetched, only what builds the model and tokenizes (config,
    tokenizer, generation config, chat template). A hub model is read from the hub by each rank as it
    loads, so such a node's ranks ask it for those files alone; a local folder is read in place.
    """
    if base_model.startswith("hf:"):
        name, _, revision = base_model[3:].partition("@")
        if not name:
            raise TrainError(f"--base-model {base_model}: expected hf:ORG/NAME[@REVISION]")
        return BaseModelRef(name, revision or None, name, base_model)
    if _is_s3(base_model):
        from ftrecipe.training.fsdp import is_weight_file

        only = None if weights else (lambda path: not is_weight_file(path))
        folder = fetch_input(base_model, work_dir / "base_model", "base model", fetch, only)
        return BaseModelRef(str(folder), None, base_model, base_model)
    folder = Path(base_model)
    if not folder.is_dir():
        raise TrainError(f"{base_model}: base model folder not found")
    if not (folder / "config.json").is_file():
        raise TrainError(f"{base_model}: not a saved model (no config.json); use save_pretrained's output")
    return BaseModelRef(str(folder.resolve()), None, str(folder.resolve()), base_model)


def inputs_hash(config: TrainConfig, base: BaseModelRef, data_hash: str, world_size: int) -> str:
    """What a checkpoint must share with the run that resumes it: the settings that change the weights,
    the base model, the data, and the number of processes with the batch each takes (together they make
    the global batch, hence the schedule and which examples each step sees)."""
    dumped = config.model_dump(mode="json", by_alias=True, exclude=_NOT_IN_HASH)
    if config.parallelism != "ddp":  # another checkpoint layout (fsdp: one shard per process)
        dumped["parallelism"] = config.parallelism
    return stable_hash(
        {
            "training": dumped,
            "baseModel": base.model_id,
            "revision": base.revision,
            "data": data_hash,
            "worldSize": world_size,
            "perDeviceBatch": config.hyperparameters.batch_size,
        }
    )


def latest_checkpoint(checkpoints: Path) -> tuple[int, Path] | None:
    """The highest `step-<N>` holding a trainer_state.json (i.e. written completely)."""
    if not checkpoints.is_dir():
        return None
    found: list[tuple[int, Path]] = []
    for child in checkpoints.iterdir():
        match = _STEP_DIR.match(child.name)
        if match and child.is_dir() and (child / "trainer_state.json").is_file():
            found.append((int(match.group(1)), child))
    return max(found) if found else None


def prune_local_checkpoints(checkpoints: Path, keep: int) -> list[int]:
    """Delete the `step-<N>` folders under `checkpoints` but the last `keep`; returns the steps kept."""
    steps = sorted(
        int(match.group(1))
        for child in (checkpoints.iterdir() if checkpoints.is_dir() else ())
        if child.is_dir() and (match := _STEP_DIR.match(child.name))
    )
    for step in steps[: max(0, len(steps) - keep)]:
        shutil.rmtree(checkpoints / f"{CHECKPOINT_PREFIX}{step}", ignore_errors=True)
    return steps[max(0, len(steps) - keep) :]


def world_size_refusal(
    where: str,
    recorded_hash: str | None,
    recorded_world_size: Any,
    world_size: int,
    hash_for_world_size: Callable[[int], str] | None,
    parallelism: str,
) -> TrainError | None:
    """The one-line error for a checkpoint that differs from this run in its world size alone, else None.

    `hash_for_world_size` gives this run's inputs hash for another world size: equal to the checkpoint's
    for the world size it was written with means nothing else differs.
    """
    if hash_for_world_size is None or not isinstance(recorded_world_size, int):
        return None
    if recorded_world_size == world_size or hash_for_world_size(recorded_world_size) != recorded_hash:
        return None
    why = (
        "its FSDP shards (one per process) resume only on the same world size"
        if parallelism == "fsdp"
        else "the global batch and the schedule follow the world size"
    )
    return TrainError(
        f"{where}: a checkpoint written by {recorded_world_size} processes, this run has {world_size}: {why}; "
        f"run on {recorded_world_size} GPUs in all (nodes x gpus) to resume, or delete it to start over"
    )


def _prepare_work_dir(
    work_dir: Path,
    run_hash: str,
    world_size: int = 1,
    hash_for_world_size: Callable[[int], str] | None = None,
    parallelism: str = "ddp",
) -> None:
    work_dir.mkdir(parents=True, exist_ok=True)
    marker = work_dir / "run_inputs.json"
    if marker.is_file():
        recorded = json.loads(marker.read_text(encoding="utf-8"))
        previous = recorded.get("inputs_hash")
        if previous != run_hash and latest_checkpoint(work_dir / "checkpoints") is not None:
            refusal = world_size_refusal(
                str(work_dir / CHECKPOINTS_DIR),
                previous,
                recorded.get("world_size"),
                world_size,
                hash_for_world_size,
                parallelism,
            )
            raise refusal or TrainError(
                f"{work_dir}: holds checkpoints of a run with other data, model or settings; "
                "use another --work-dir or delete it"
            )
    marker.write_text(
        json.dumps({"inputs_hash": run_hash, "world_size": world_size}) + "\n", encoding="utf-8"
    )
    checkpoints = work_dir / "checkpoints"
    if checkpoints.is_dir():  # what a killed save left: Trainer's own name, never renamed to step-N
        for child in checkpoints.iterdir():
            if child.name.startswith("checkpoint-"):
                shutil.rmtree(child, ignore_errors=True)


# --------------------------------------------------------------------------------------------- model


def bitsandbytes_problem() -> str | None:
    """Why bitsandbytes cannot quantize on this machine's device (CUDA if there is one, else CPU), or None.

    Tried for real: a small 4-bit and 8-bit quantization, which is what loading the model does.
    """
    import torch

    device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        with contextlib.redirect_stdout(sys.stderr):  # its import notes must not break the JSON lines
            import bitsandbytes.functional as bnb_functional

            sample = torch.randn(64, 64, device=device)
            bnb_functional.quantize_4bit(sample, quant_type="nf4")
            bnb_functional.int8_vectorwise_quant(sample.half() if device == "cuda" else sample)
    except Exception as exc:  # ImportError, RuntimeError "no backend", NotImplementedError...
        return f"bitsandbytes cannot run on {device}: {type(exc).__name__}: {_line(exc)}"
    return None


def _check_quantization(config: TrainConfig) -> None:
    if config.quantization == "none":
        return
    problem = bitsandbytes_problem()
    if problem is not None:
        raise TrainError(
            f"quantization {config.quantization} needs bitsandbytes, but {problem}; "
            "set quantization: none to train in full precision"
        )


def hub_error_message(source: str, exc: BaseException) -> str:
    """One line for a base model that could not be loaded, told apart by the hub's answer.

    401/403 (gated or private repositories; the hub answers 401 to anonymous requests for missing ones
    too), 404 (no such repository, revision or file), no connection at all, or anything else.
    """
    from huggingface_hub import errors

    name = source[3:].partition("@")[0] if source.startswith("hf:") else source
    chain: list[BaseException] = []
    current: BaseException | None = exc
    while current is not None and current not in chain:
        chain.append(current)
        current = current.__cause__ or current.__context__
    for item in chain:
        status = None
        if isinstance(item, errors.HfHubHTTPError) and item.response is not None:
            status = item.response.status_code
        if isinstance(item, errors.GatedRepoError) or status in (401, 403):
            return (
                f"base model {source}: gated or private: set HF_TOKEN (tokenSecretRef in the recipe) "
                f"with access to {name}"
            )
    for item in chain:  # a local-cache miss (offline) subclasses the not-found errors: first
        if isinstance(item, errors.OfflineModeIsEnabled | errors.LocalEntryNotFoundError | ConnectionError):
            return (
                f"base model {source}: hub unreachable (no connection, or HF_HUB_OFFLINE set): {_line(item)}"
            )
        if type(item).__module__.split(".")[0] in {"httpx", "httpx2", "requests", "urllib3"} and any(
            word in type(item).__name__ for word in ("Connect", "Timeout", "Network")
        ):
            return f"base model {source}: hub unreachable: {_line(item)}"
    for item in chain:
        status = None
        if isinstance(item, errors.HfHubHTTPError) and item.response is not None:
            status = item.response.status_code
        if isinstance(item, errors.RevisionNotFoundError):
            return f"base model {source}: revision not found on the hub: {_line(item)}"
        if isinstance(item, errors.RepositoryNotFoundError | errors.EntryNotFoundError) or status == 404:
            return f"base model {source}: not found on the hub (check ORG/NAME): {_line(item)}"
    return f"base model {source}: not found, gated or unreachable: {_line(exc)}"


def load_tokenizer(base: BaseModelRef) -> tuple[Any, bool]:
    from transformers import AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(base.load_from, revision=base.revision)
    except OSError as exc:
        raise TrainError(hub_error_message(base.source, exc)) from None
    added = ensure_chat_template(tokenizer)
    return tokenizer, added


def _line(exc: BaseException) -> str:
    return " ".join(str(exc).split())[:400]


@dataclass(frozen=True)
class Precision:
    """How the model is loaded and trained on this machine: weights dtype, attention kernels, autocast."""

    dtype: Literal["bfloat16", "float16", "float32"]
    attention: Literal["flash_attention_2", "sdpa"]
    mixed_precision: Literal["bf16", "fp16"] | None  # TrainingArguments' bf16= / fp16=

    def torch_dtype(self) -> Any:
        import torch

        return getattr(torch, self.dtype)


def choose_precision(
    cuda: bool, compute_capability: tuple[int, int] | None, flash_attention: bool
) -> Precision:
    """bf16 where the GPU has it natively (compute capability 8.0+: Ampere and newer), else fp16 autocast
    with a gradient scaler; float32 on the CPU.

    `torch.cuda.is_bf16_supported()` is not asked: it also says yes where bf16 is only emulated (T4,
    V100), which is several times slower than fp16 there. Flash attention 2 when installed and the GPU
    can run it (its kernels need Ampere too); PyTorch's SDPA kernels otherwise.
    """
    if not cuda:
        return Precision("float32", "sdpa", None)
    ampere = compute_capability is not None and compute_capability >= (8, 0)
    attention: Literal["flash_attention_2", "sdpa"] = (
        "flash_attention_2" if flash_attention and ampere else "sdpa"
    )
    if ampere:
        return Precision("bfloat16", attention, "bf16")
    return Precision("float16", attention, "fp16")


def machine_precision() -> Precision:
    """`choose_precision` for this process's device (the GPU LOCAL_RANK picks, under torchrun)."""
    import torch

    if not torch.cuda.is_available():
        return choose_precision(False, None, _has_flash_attention())
    device = int(os.environ.get("LOCAL_RANK", "0"))
    capability = tuple(torch.cuda.get_device_capability(device))
    return choose_precision(True, (capability[0], capability[1]), _has_flash_attention())


def device_map_for(cuda: bool, quantized: bool, env: Mapping[str, str]) -> dict[str, int] | str | None:
    """Where `from_pretrained` puts the weights: straight onto this process's GPU (`LOCAL_RANK` under
    torchrun), so no rank first builds the whole model in host memory; bitsandbytes' CPU backend for a
    quantized model without a GPU; else nowhere in particular (the CPU)."""
    if cuda:
        return {"": int(env.get("LOCAL_RANK", "0"))}
    return "cpu" if quantized else None


def embeddings_to_compute_dtype(model: Any, dtype: Any) -> None:
    """Input embeddings and lm_head back to `dtype` after `prepare_model_for_kbit_training`.

    peft casts every non-quantized weight to float32 there; norms are small, but an 8B model's embeddings
    and lm_head (2 × 128k × 4096) grow by 2 GB that way, and LoRA gains nothing from it.
    """
    for module in (model.get_input_embeddings(), model.get_output_embeddings()):
        if module is not None:
            module.to(dtype)


@dataclass(frozen=True)
class ModelShape:
    """What the memory estimate needs of a model's config."""

    layers: int
    hidden: int
    intermediate: int
    vocab: int
    kv_hidden: int
    tied_embeddings: bool

    @classmethod
    def from_config(cls, config: Any) -> ModelShape:
        text = config.get_text_config() if hasattr(config, "get_text_config") else config
        hidden = int(text.hidden_size)
        heads = int(getattr(text, "num_attention_heads", 1) or 1)
        kv_heads = int(getattr(text, "num_key_value_heads", heads) or heads)
        head_dim = int(getattr(text, "head_dim", None) or hidden // heads)
        return cls(
            layers=int(text.num_hidden_layers),
            hidden=hidden,
            intermediate=int(getattr(text, "intermediate_size", 4 * hidden) or 4 * hidden),
            vocab=int(text.vocab_size),
            kv_hidden=kv_heads * head_dim,
            tied_embeddings=bool(getattr(config, "tie_word_embeddings", False)),
        )

    def parameters(self) -> int:
        attention = 2 * self.hidden * self.hidden + 2 * self.hidden * self.kv_hidden
        mlp = 3 * self.hidden * self.intermediate
        norms = 2 * self.hidden
        embeddings = self.vocab * self.hidden * (1 if self.tied_embeddings else 2)
        return self.layers * (attention + mlp + norms) + self.hidden + embeddings


WEIGHT_BYTES = {"none": 2.0, "8bit": 1.0, "4bit": 0.56}  # per parameter, compute dtype 16-bit; nf4 + scales
MEMORY_HEADROOM = 0.8  # of the GPU: CUDA context, allocator fragmentation, optimizer state, eval batches


def training_memory_bytes(
    shape: ModelShape,
    tokens: int,
    quantization: str,
    dtype_bytes: int,
    full_logits: bool,
    weight_shards: int = 1,
) -> int:
    """Weights plus what backward keeps of one micro-batch of `tokens` without gradient checkpointing.

    Per token and layer, the inputs of the norms, projections and activations a Llama-shaped block saves
    (~12 hidden + 4 intermediate values with LoRA's extra inputs; attention by flash/SDPA kernels keeps
    no tokens × tokens scores). The full logits (and their float32 softmax) when the loss builds them.
    `weight_shards` > 1 (fsdp): each GPU holds that share of the weights, plus one decoder layer gathered.
    """
    weights = shape.parameters() * WEIGHT_BYTES[quantization] * dtype_bytes / 2
    if weight_shards > 1:
        layer = (shape.parameters() - shape.vocab * shape.hidden * 2) / shape.layers
        weights = weights / weight_shards + layer * WEIGHT_BYTES[quantization] * dtype_bytes / 2
    activations = tokens * shape.layers * (12 * shape.hidden + 4 * shape.intermediate) * dtype_bytes
    logits = tokens * shape.vocab * (dtype_bytes + 8) if full_logits else 0
    return int(weights + activations + logits)


def choose_gradient_checkpointing(setting: bool | None, device_memory: int | None, needed: int) -> bool:
    """The recipe's choice when it made one; else on only when a micro-batch would not fit without it.

    No GPU (`device_memory` None): off, recomputing would only cost time.
    """
    if setting is not None:
        return setting
    if device_memory is None:
        return False
    return needed > MEMORY_HEADROOM * device_memory


def gradient_checkpointing_for(config: TrainConfig, base: BaseModelRef, precision: Precision) -> bool:
    """`choose_gradient_checkpointing` for the free memory of this process's GPU and the base model's config."""
    hp = config.hyperparameters
    if hp.gradient_checkpointing is not None:
        return hp.gradient_checkpointing
    import torch

    if not torch.cuda.is_available():
        return False
    from transformers import AutoConfig

    try:
        model_config = AutoConfig.from_pretrained(base.load_from, revision=base.revision)
    except OSError as exc:
        raise TrainError(hub_error_message(base.source, exc)) from None
    device = int(os.environ.get("LOCAL_RANK", "0"))
    needed = training_memory_bytes(
        ModelShape.from_config(model_config),
        tokens=hp.batch_size * hp.max_seq_length,
        quantization=config.quantization,
        dtype_bytes=4 if precision.dtype == "float32" else 2,
        full_logits=hp.loss_logits == "all",
        # fsdp under torchrun: this GPU's share of the weights
        weight_shards=int(os.environ.get("WORLD_SIZE", "1")) if config.parallelism == "fsdp" else 1,
    )
    free, _total = torch.cuda.mem_get_info(device)  # before the model loads: what this run can have
    return choose_gradient_checkpointing(None, int(free), needed)


def load_model(
    config: TrainConfig,
    base: BaseModelRef,
    precision: Precision | None = None,
    gradient_checkpointing: bool = False,
) -> Any:
    """The base model in `precision` (this machine's by default), quantized when the config says so.

    A quantized model is prepared for k-bit training (frozen, norms in float32, checkpointing as asked),
    with its embeddings and lm_head kept in the compute dtype. Under `parallelism: fsdp` under torchrun
    global rank 0 alone reads the weights, into host memory, and every other rank builds the model on
    `meta` from its config (`fsdp.build_on_meta`) until accelerate shards it and broadcasts rank 0's
    weights (`training.fsdp`); a 4-bit base loads on every rank and stores its packed weights in the
    compute dtype, so they shard.
    """
    import torch
    from transformers import AutoModelForCausalLM

    from ftrecipe.training.fsdp import apply_loading_env, build_on_meta, reads_weights, shards

    precision = precision or machine_precision()
    quantized = config.quantization != "none"
    launched = "WORLD_SIZE" in os.environ
    sharded = shards(config.parallelism, launched)
    if not reads_weights(config.parallelism, launched, quantized, os.environ):
        from transformers import AutoConfig

        apply_loading_env(quantized)
        try:
            model_config = AutoConfig.from_pretrained(base.load_from, revision=base.revision)
        except OSError as exc:
            raise TrainError(hub_error_message(base.source, exc)) from None
        return build_on_meta(model_config, precision.torch_dtype(), precision.attention)
    kwargs: dict[str, Any] = {
        "revision": base.revision,
        "dtype": precision.torch_dtype(),
        "attn_implementation": precision.attention,
    }
    if quantized:
        from transformers import BitsAndBytesConfig

        if config.quantization == "4bit":
            kwargs["quantization_config"] = BitsAndBytesConfig(  # type: ignore[no-untyped-call]
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_use_double_quant=True,
                bnb_4bit_compute_dtype=kwargs["dtype"],
                **({"bnb_4bit_quant_storage": kwargs["dtype"]} if sharded else {}),
            )
        else:
            kwargs["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)  # type: ignore[no-untyped-call]
    device_map = device_map_for(torch.cuda.is_available(), quantized, os.environ)
    if sharded:
        apply_loading_env(quantized)
        if not quantized:  # the whole model on one GPU is what fsdp avoids: host memory, then shards
            device_map = None
    if device_map is not None:
        kwargs["device_map"] = device_map
    try:
        model = AutoModelForCausalLM.from_pretrained(base.load_from, **kwargs)
    except OSError as exc:
        raise TrainError(hub_error_message(base.source, exc)) from None
    if quantized:
        from peft import prepare_model_for_kbit_training

        # Same checkpointing flavour as the trainer asks for: non-reentrant needs no inputs with grad
        model = prepare_model_for_kbit_training(  # type: ignore[no-untyped-call]
            model,
            use_gradient_checkpointing=gradient_checkpointing,
            gradient_checkpointing_kwargs={"use_reentrant": False},
        )
        embeddings_to_compute_dtype(model, precision.torch_dtype())
        if sharded and not torch.cuda.is_available():
            from ftrecipe.training.fsdp import keep_4bit_layout_on_cpu

            keep_4bit_layout_on_cpu(model)
    return model


def _has_flash_attention() -> bool:
    try:
        import flash_attn  # noqa: F401
    except ImportError:
        return False
    return True


def linear_module_names(model: Any) -> list[str]:
    """Last name component of every linear layer (what LoRA target_modules match), sorted, once each."""
    import torch

    names = set()
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.Linear) or type(module).__name__ in {"Linear8bitLt", "Linear4bit"}:
            names.add(name.rsplit(".", 1)[-1])
    return sorted(names)


ALL_LINEAR = "all-linear"  # peft's own discovery: every linear layer but the output head


def lora_config(model: Any, config: TrainConfig) -> Any:
    """The peft LoraConfig TRL wraps the model with; TrainError naming targets the model does not have."""
    from peft import LoraConfig

    targets = list(config.lora.target_modules)
    if targets != [ALL_LINEAR]:
        existing = linear_module_names(model)
        missing = [t for t in targets if t not in existing]
        if missing:
            raise TrainError(
                f"lora.targetModules {', '.join(missing)} not in the model; its linear modules are: "
                f"{', '.join(existing)} (or [{ALL_LINEAR}])"
            )
    return LoraConfig(
        r=config.lora.r,
        lora_alpha=config.lora.alpha,
        lora_dropout=config.lora.dropout,
        bias=config.lora.bias,
        target_modules=ALL_LINEAR if targets == [ALL_LINEAR] else targets,
        task_type="CAUSAL_LM",
    )


# --------------------------------------------------------------------------------------------- loop


def seed_everything(seed: int) -> None:
    """Python's, numpy's and torch's generators (every device) from `seed`.

    Called before the model is built: LoRA draws its A matrices then, before the Trainer seeds anything.
    """
    from transformers import set_seed

    set_seed(seed)


def _steps_per_epoch(examples: int, config: TrainConfig, world_size: int) -> int:
    hp = config.hyperparameters
    batches = math.ceil(examples / (hp.batch_size * world_size))
    return max(1, math.ceil(batches / hp.gradient_accumulation_steps))


def choose_padding_free(setting: bool | None, attention: str) -> bool:
    """Padding-free micro-batches (TRL `padding_free`) unless the recipe says otherwise.

    The micro-batch is flattened into one row whose position ids restart at each example; the attention
    kernels must keep the examples apart by those boundaries: flash attention's varlen kernels do, at no
    cost. SDPA and eager attention (transformers 5.24) do not: every example would attend to the ones
    before it in the row, so there batches are padded and grouped by length, and asking for padding-free
    is an error. The examples per optimizer step, and so the tokens, are the same either way.
    """
    varlen = attention == "flash_attention_2"
    if setting and not varlen:
        raise TrainError(
            f"hyperparameters.paddingFree needs flash attention 2 (flash-attn installed, an Ampere or newer "
            f"GPU); with {attention} attention the examples of a row would attend to each other: "
            "leave paddingFree empty or set it to false"
        )
    return varlen if setting is None else setting


def _length_grouping(arguments_class: type) -> dict[str, Any]:
    """Length-grouped batches (little padding): the option's name changed in transformers 5."""
    import dataclasses

    names = {f.name for f in dataclasses.fields(arguments_class)}
    if "train_sampling_strategy" in names:
        return {"train_sampling_strategy": "group_by_length"}
    return {"group_by_length": True}


def _gpu_memory_gb() -> float | None:
    import torch

    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 1e9, 3)


def _read_metrics(path: Path) -> list[dict[str, Any]]:
    if not path.is_file():
        return []
    rows = []
    for line in path.read_text(encoding="utf-8").splitlines():
        try:
            rows.append(json.loads(line))
        except ValueError:
            continue  # a line cut by a kill
    return rows


def _truncate_metrics(path: Path, last_step: int) -> None:
    """Drop rows a killed run logged after the checkpoint it resumes from."""
    rows = [row for row in _read_metrics(path) if int(row.get("step", 0)) <= last_step]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")


@contextlib.contextmanager
def _main_process_first(world_size: int, main_process: bool) -> Iterator[None]:
    """The main processes run the block, then the other ranks do. `main_process` is each node's local rank 0
    (`_run_train`): the nodes of a group fetch side by side, each onto its own disk, while a node's ranks
    share its work folder.

    The process group is started here, as the Trainer would start it (NCCL on GPUs, gloo on the CPU):
    accelerate's PartialState, asked before the Trainer, sees no distributed run on a CPU and orders
    nothing, so two ranks raced on the work folder.
    """
    if world_size <= 1:
        yield
        return
    import torch
    import torch.distributed as dist

    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        # The others wait while rank 0 downloads the inputs (an 8B base model from S3 is ~16 GB).
        dist.init_process_group(
            backend="nccl" if torch.cuda.is_available() else "gloo",
            timeout=datetime.timedelta(seconds=RANK_WAIT_SECONDS),
        )
    if not main_process:
        dist.barrier()
    try:
        yield
    finally:
        if main_process:  # also after an error: the others must not wait forever, they fail the same way
            dist.barrier()


def _same_checkpoint_everywhere(step: int | None) -> None:
    """Each node fetched the checkpoint it resumes from on its own: all must have found the same one."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return
    found: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(found, step)
    problem = resume_disagreement(found)
    if problem is not None:
        raise TrainError(problem)


def resume_disagreement(found: list[int | None]) -> str | None:
    """The one-line error when the ranks (by rank) found different steps to resume from, else None."""
    if len(set(found)) <= 1:
        return None
    steps = ", ".join("none" if item is None else str(item) for item in found)
    return (
        f"the ranks found different checkpoints to resume from (by rank: {steps}); one was published "
        "while this run started: rerun"
    )


def gather_checkpoint_files(folder: Path, world_zero: bool, local_zero: bool) -> list[str]:
    """Copy into global rank 0's `folder` the checkpoint files only other nodes have; returns their paths.

    Every rank writes its part of a checkpoint into its own node's copy: its random state
    (`rng_state_<rank>.pth`), under FSDP its shards. A node's disk is its own, and rank 0 publishes from
    its disk alone, so each other node's local rank 0 sends rank 0 what rank 0's copy lacks (a few KB per
    rank for the random states). Ranks on rank 0's node share its disk and send nothing.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return []
    present: list[Any] = [_relative_files(folder) if world_zero else None]
    dist.broadcast_object_list(present, src=0)
    mine: dict[str, bytes] = {}
    if local_zero and not world_zero:
        for name in _relative_files(folder):
            if name not in present[0]:
                mine[name] = (folder / name).read_bytes()
    gathered: list[Any] | None = [None] * dist.get_world_size() if world_zero else None
    dist.gather_object(mine, gathered, dst=0)
    written: list[str] = []
    for files in gathered or []:
        for name, content in sorted(files.items()):
            if name in written:
                continue
            target = folder / name
            target.parent.mkdir(parents=True, exist_ok=True)
            partial = target.with_name(target.name + ".partial")
            partial.write_bytes(content)
            os.replace(partial, target)
            written.append(name)
    return sorted(written)


def _relative_files(folder: Path) -> list[str]:
    if not folder.is_dir():
        return []
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())


def _barrier() -> None:
    """Wait for every rank (several GPUs); nothing to wait for in a single process."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def ends_epoch(epoch: float | None) -> bool:
    """Whether the step that just ended is the last of an epoch, from Trainer's `state.epoch`.

    Trainer sets it to `epoch + batches done / batches in the epoch` at each step end: a whole number
    (exactly: n / n is 1.0) at an epoch's last step, and only there.
    """
    return epoch is not None and epoch > 0 and float(epoch).is_integer()


def _make_callbacks(
    metrics_path: Path,
    checkpoints: Path,
    emit: Emit,
    stop_agreed: Callable[[Any], bool],
    on_checkpoint: Callable[[int, Path], None],
) -> list[Any]:
    from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

    class RunCallback(TrainerCallback):
        """metrics.jsonl, progress events, eval at each epoch end, step-N checkpoints, SIGTERM."""

        def __init__(self) -> None:
            self.started = time.monotonic()
            self.first_step: int | None = None
            self.last_time = time.monotonic()
            self.last_tokens = 0
            self.last_eval: float | None = None
            self.last_train: float | None = None
            self.evaluated_at = -1

        def on_train_begin(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            self.started = self.last_time = time.monotonic()
            self.first_step = state.global_step
            self.last_tokens = int(state.num_input_tokens_seen or 0)

        def on_epoch_end(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            if args.eval_strategy == "no":  # no validation split
                return
            if not ends_epoch(state.epoch):  # a SIGTERM stopped the run mid-epoch: no epoch end to evaluate
                return
            # not twice: evalEverySteps, or a checkpoint (see on_step_end), evaluated at this step already
            if state.global_step != self.evaluated_at:
                control.should_evaluate = True

        def on_evaluate(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            self.evaluated_at = state.global_step

        def on_step_end(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            if stop_agreed(args.device):  # every rank asks at every step end: all stop at the same one
                control.should_save = True
                control.should_training_stop = True
            if control.should_save and args.eval_strategy != "no" and ends_epoch(state.epoch):
                # A checkpoint on an epoch's last step (SIGTERM, checkpointEverySteps, the final step):
                # the epoch's evaluation now, before it (Trainer evaluates, then saves), not after the
                # save at the epoch end. The checkpoint then carries the evaluation's row and the random
                # state after it, so a run resumed from it goes on as the uninterrupted one does.
                control.should_evaluate = True

        def on_save(
            self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any
        ) -> None:
            _barrier()  # every rank has written its part (rng state) of checkpoint-N
            source = Path(str(args.output_dir)) / f"checkpoint-{state.global_step}"
            # other nodes' parts, from their own disks, into the copy rank 0 publishes
            gather_checkpoint_files(source, state.is_world_process_zero, state.is_local_process_zero)
            if state.is_world_process_zero:
                target = checkpoints / f"{CHECKPOINT_PREFIX}{state.global_step}"
                if source.is_dir():
                    if target.exists():
                        shutil.rmtree(target)
                    os.replace(source, target)  # atomic: step-N appears only once complete
                    if metrics_path.is_file():  # the rows so far travel with it (a new pod has none)
                        shutil.copyfile(metrics_path, target / CHECKPOINT_METRICS)
                    on_checkpoint(state.global_step, target)
                    prune_local_checkpoints(checkpoints, KEEP_CHECKPOINTS)  # as the durable copies are
            _barrier()
            if state.is_local_process_zero and not state.is_world_process_zero:
                shutil.rmtree(source, ignore_errors=True)  # another node's disk: its part is in rank 0's

        def on_log(
            self,
            args: TrainingArguments,
            state: TrainerState,
            control: TrainerControl,
            logs: dict[str, Any] | None = None,
            **kwargs: Any,
        ) -> None:
            logs = logs or {}
            if "loss" not in logs and "eval_loss" not in logs:
                return  # the end-of-training summary
            now = time.monotonic()
            tokens = int(state.num_input_tokens_seen or 0)
            tokens_per_second = None
            if "loss" in logs and now > self.last_time:
                tokens_per_second = round((tokens - self.last_tokens) / (now - self.last_time), 2)
                self.last_time, self.last_tokens = now, tokens
            train_loss = logs.get("loss")
            eval_loss = logs.get("eval_loss")
            if train_loss is not None:
                self.last_train = float(train_loss)
            if eval_loss is not None:
                self.last_eval = float(eval_loss)
            row = {
                "step": state.global_step,
                "epoch": round(float(logs.get("epoch", state.epoch or 0.0)), 4),
                "train_loss": train_loss,
                "eval_loss": eval_loss,
                "learning_rate": logs.get("learning_rate"),
                "tokens_per_second": tokens_per_second,
                "gpu_memory_gb": _gpu_memory_gb(),
            }
            if state.is_world_process_zero:
                with metrics_path.open("a", encoding="utf-8") as fh:
                    fh.write(json.dumps(row) + "\n")
                done = state.global_step - (self.first_step or 0)
                remaining = max(0, state.max_steps - state.global_step)
                eta = (now - self.started) / done * remaining if done > 0 else None
                emit(
                    {
                        "event": "progress",
                        "step": state.global_step,
                        "total_steps": state.max_steps,
                        "epoch": row["epoch"],
                        "train_loss": self.last_train,
                        "eval_loss": self.last_eval,
                        "eta_seconds": None if eta is None else round(eta, 1),
                    }
                )

    return [RunCallback()]


# --------------------------------------------------------------------------------------------- checkpoints


class DurableCheckpoints:
    """This run's checkpoint bundles under `<out>/checkpoints/step-<N>/`: list, publish, prune, fetch."""

    def __init__(
        self,
        out: str,
        run_hash: str,
        keep: int = KEEP_CHECKPOINTS,
        world_size: int = 1,
        hash_for_world_size: Callable[[int], str] | None = None,
        parallelism: str = "ddp",
    ) -> None:
        from ftrecipe.storage import StorageError, join, parse_location

        try:
            self.root = join(parse_location(out), CHECKPOINTS_DIR)
        except StorageError as exc:
            raise TrainError(f"--out {out}: {exc}") from None
        self.run_hash = run_hash
        self.keep = keep
        self.steps: list[int] = []  # complete, of this run, ascending
        # recorded in each checkpoint's manifest: a resume on another world size is told apart
        self.world_size = world_size
        self.hash_for_world_size = hash_for_world_size
        self.parallelism = parallelism

    def _location(self, step: int) -> Any:
        from ftrecipe.storage import join

        return join(self.root, f"{CHECKPOINT_PREFIX}{step}")

    def scan(self) -> list[int]:
        """The complete checkpoints of this run; TrainError if one of another run is there."""
        from ftrecipe.storage import StorageError, read_manifest
        from ftrecipe.storage.listing import list_bundles

        steps = []
        try:
            for name in list_bundles(self.root):
                match = _STEP_DIR.match(name)
                if not match:
                    continue
                step = int(match.group(1))
                manifest = read_manifest(self._location(step))
                if manifest is None or not any(f.path == "trainer_state.json" for f in manifest.files):
                    continue  # being published, or pruned
                if manifest.inputs_hash != self.run_hash:
                    refusal = world_size_refusal(
                        str(self._location(step)),
                        manifest.inputs_hash,
                        manifest.metadata.get("world_size"),
                        self.world_size,
                        self.hash_for_world_size,
                        self.parallelism,
                    )
                    raise refusal or TrainError(
                        f"{self._location(step)}: a checkpoint of a run with other data, model or settings; "
                        f"use another --out or delete {self.root}"
                    )
                steps.append(step)
        except StorageError as exc:
            raise TrainError(f"checkpoints under {self.root}: {exc}") from None
        self.steps = sorted(steps)
        return self.steps

    def fetch(self, step: int, target: Path) -> Path:
        return fetch_input(str(self._location(step)), target, "checkpoint")

    def publish(self, step: int, folder: Path) -> None:
        """Publish `folder` as step-N, then delete the checkpoints older than the last `keep`."""
        from ftrecipe.storage import StorageError, delete_bundle, publish_bundle

        try:
            publish_bundle(
                folder,
                self._location(step),
                producer=CHECKPOINT_PRODUCER,
                inputs_hash=self.run_hash,
                metadata={"world_size": self.world_size},
            )
            self.steps = sorted({*self.steps, step})
            while len(self.steps) > self.keep:
                delete_bundle(self._location(self.steps.pop(0)))
        except StorageError as exc:
            raise TrainError(f"publishing checkpoint {step} to {self._location(step)}: {exc}") from None

    def delete_all(self) -> None:
        """Delete every checkpoint under the root: the adapter is published, and a copy of its prefix
        (to a server, to another bucket) would otherwise carry them along."""
        from ftrecipe.storage import LocalLocation, StorageError, delete_bundle
        from ftrecipe.storage.listing import list_bundles

        try:
            for name in list_bundles(self.root):
                if _STEP_DIR.match(name):
                    delete_bundle(self._location(int(name.removeprefix(CHECKPOINT_PREFIX))))
        except StorageError as exc:
            raise TrainError(f"deleting the checkpoints under {self.root}: {exc}") from None
        self.steps = []
        if isinstance(self.root, LocalLocation):
            with contextlib.suppress(OSError):  # not empty: files that are not ours stay, and the folder
                self.root.path.rmdir()


class _CheckpointsAreNotStrangers(logging.Filter):
    """Publishing the adapter to `<out>` sees the checkpoint bundles beside it: they are ours, no warning."""

    def filter(self, record: logging.LogRecord) -> bool:
        args = record.args
        if str(record.msg).startswith("%d object(s) under") and isinstance(args, tuple) and len(args) == 3:
            examples = str(args[2]).split(", ")
            return not all(item.startswith(f"{CHECKPOINTS_DIR}/") for item in examples)
        return True


def _resume_from_durable(
    durable: DurableCheckpoints, checkpoints: Path, fetch: bool = True
) -> tuple[int, Path] | None:
    """Fetch this run's latest durable checkpoint into `checkpoints/step-<N>` (local ones are scratch).

    `fetch=False`: a rank other than its node's local rank 0, which fetched it (and pruned the rest) first.
    """
    steps = durable.scan()
    if not fetch:
        if not steps:
            return None
        return steps[-1], fetch_input(
            str(durable._location(steps[-1])),
            checkpoints / f"{CHECKPOINT_PREFIX}{steps[-1]}",
            "checkpoint",
            False,
        )
    keep = f"{CHECKPOINT_PREFIX}{steps[-1]}" if steps else None
    for child in checkpoints.iterdir():
        if child.is_dir() and child.name != keep and _STEP_DIR.match(child.name):
            shutil.rmtree(child, ignore_errors=True)
    if not steps:
        return None
    folder = durable.fetch(steps[-1], checkpoints / f"{CHECKPOINT_PREFIX}{steps[-1]}")
    return steps[-1], folder


def run_train(options: TrainOptions, emit: Emit = print_event) -> TrainResult:
    """Train, write and publish the bundle. TrainError for user errors, Preempted after SIGTERM."""
    import datasets
    from transformers.utils import logging as hf_logging

    bars = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()  # type: ignore[no-untyped-call]  # stderr stays readable: progress is in the JSON lines
    dataset_bars = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()  # TRL tokenizes with Dataset.map, a bar per step otherwise
    try:
        with warnings.catch_warnings():
            # transformers 5 renamed gradient_checkpointing; the old name keeps 4.x working
            warnings.filterwarnings(
                "ignore", message=".*gradient_checkpointing` is deprecated", category=FutureWarning
            )
            with StopSignal() as stop:  # first: a preemption while fetching or loading counts too
                return _run_train(options, emit, stop)
    finally:
        if bars:
            hf_logging.enable_progress_bar()  # type: ignore[no-untyped-call]
        if dataset_bars:
            datasets.enable_progress_bars()


def _run_train(options: TrainOptions, emit: Emit, stop: StopSignal) -> TrainResult:
    config = options.config
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    main_process = is_main_process(os.environ)
    node_main = is_node_main_process(os.environ)
    if not main_process:
        emit = _no_event  # rank 0 alone reports
    # Under torchrun: each node's local rank 0 fetches the inputs and the checkpoint onto that node's disk
    # (every pod of a node group has its own volume); the node's other ranks then find them there. Under
    # fsdp only global rank 0 reads the base model's weights: the other nodes fetch none (fsdp.reads_weights).
    from ftrecipe.training.fsdp import reads_weights

    weights = reads_weights(
        config.parallelism, "WORLD_SIZE" in os.environ, config.quantization != "none", os.environ
    )
    with _main_process_first(world_size, node_main):
        scratch = options.work_dir or Path(tempfile.gettempdir()) / "ftrecipe-train" / "scratch"
        fetch_dir = (options.work_dir or scratch) / "inputs"
        splits = resolve_data(options.data, fetch_dir, fetch=node_main)
        base = resolve_base_model(options.base_model, fetch_dir, fetch=node_main, weights=weights)
        _check_quantization(config)
        data_hash = dataset_hash(splits)
        run_hash = inputs_hash(config, base, data_hash, world_size)
        work_dir = options.work_dir or Path(tempfile.gettempdir()) / "ftrecipe-train" / run_hash[:12]

        def hash_for_world_size(size: int) -> str:
            return inputs_hash(config, base, data_hash, size)

        _prepare_work_dir(work_dir, run_hash, world_size, hash_for_world_size, config.parallelism)
        checkpoints = work_dir / CHECKPOINTS_DIR
        checkpoints.mkdir(exist_ok=True)
        metrics_path = work_dir / "metrics.jsonl"
        durable = DurableCheckpoints(
            options.out,
            run_hash,
            world_size=world_size,
            hash_for_world_size=hash_for_world_size,
            parallelism=config.parallelism,
        )
        resume = _resume_from_durable(durable, checkpoints, fetch=node_main)
    _same_checkpoint_everywhere(resume[0] if resume else None)

    import torch
    from transformers import IntervalStrategy, PrinterCallback, ProgressCallback
    from trl.trainer.sft_config import SFTConfig

    from ftrecipe.training.sft import FtrecipeSFTTrainer, SplitCounts, read_dataset

    tokenizer, template_added = load_tokenizer(base)
    hp = config.hyperparameters
    try:
        train_records = read_dataset(splits.train)
        val_records = read_dataset(splits.val) if splits.val is not None else None
    except DataError as exc:
        raise TrainError(str(exc)) from None
    if len(train_records) == 0:
        raise TrainError(f"{splits.train}: no training records; point --data at prepare-data's output")
    if val_records is not None and len(val_records) == 0:
        val_records = None

    precision = machine_precision()
    emit(
        {
            "event": "precision",
            "dtype": precision.dtype,
            "attention": precision.attention,
            "mixed_precision": precision.mixed_precision,
        }
    )
    seed_everything(hp.seed)  # LoRA's A matrices are drawn at random: from the seed, not from the clock
    gradient_checkpointing = gradient_checkpointing_for(config, base, precision)
    padding_free = choose_padding_free(hp.padding_free, precision.attention)
    emit(  # what the unset speed settings resolved to on this machine
        {
            "event": "speed",
            "gradient_checkpointing": gradient_checkpointing,
            "padding_free": padding_free,
            "loss_logits": hp.loss_logits,
        }
    )
    model = load_model(config, base, precision, gradient_checkpointing)
    peft_config = lora_config(model, config)  # TRL wraps the model once, after seeding
    from ftrecipe.training.fsdp import training_arguments

    try:  # parallelism fsdp: sharded weights (training.fsdp)
        sharding = training_arguments(
            model, config.parallelism, "WORLD_SIZE" in os.environ, config.quantization != "none"
        )
    except ValueError as exc:
        raise TrainError(str(exc)) from None

    cuda = torch.cuda.is_available()
    # From the records before too-long ones are dropped: it only sets how often progress is logged.
    steps_per_epoch = _steps_per_epoch(len(train_records), config, world_size)
    total_steps = steps_per_epoch * hp.epochs
    has_val = val_records is not None
    args = SFTConfig(
        output_dir=str(checkpoints),
        num_train_epochs=hp.epochs,
        learning_rate=hp.learning_rate,
        per_device_train_batch_size=hp.batch_size,
        per_device_eval_batch_size=hp.batch_size,
        gradient_accumulation_steps=hp.gradient_accumulation_steps,
        warmup_steps=hp.warmup_steps,
        weight_decay=hp.weight_decay,
        lr_scheduler_type=hp.scheduler,
        seed=hp.seed,
        data_seed=hp.seed,
        gradient_checkpointing=gradient_checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if gradient_checkpointing else None,
        **sharding,
        eval_strategy="steps" if has_val else "no",
        eval_steps=hp.eval_every_steps if has_val else None,
        save_strategy="steps",
        save_steps=config.checkpoint_every_steps,
        logging_strategy="steps",
        logging_steps=max(1, min(10, hp.eval_every_steps, total_steps // 20)),
        include_num_input_tokens_seen="non_padding",
        # Padding-free batches have no padding to avoid: length grouping only for padded ones.
        **({} if padding_free else _length_grouping(SFTConfig)),
        padding_free=padding_free,
        max_length=None,  # never cut: FtrecipeSFTTrainer drops what is longer than maxSeqLength
        completion_only_loss=True,
        # Every LoRA weight takes part in every step: without this, Trainer asks DDP to search the graph
        # for unused parameters on each step when gradient checkpointing is off (a slower backward).
        ddp_find_unused_parameters=False,
        bf16=precision.mixed_precision == "bf16",
        fp16=precision.mixed_precision == "fp16",
        use_cpu=not cuda,
        report_to=[],
        disable_tqdm=True,
        save_only_model=False,
        dataloader_num_workers=0,
    )
    trainer = FtrecipeSFTTrainer(
        model=model,
        args=args,
        train_dataset=train_records,
        eval_dataset=val_records,
        processing_class=tokenizer,
        peft_config=peft_config,
        callbacks=_make_callbacks(metrics_path, checkpoints, emit, stop.agree, durable.publish),
        max_seq_length=hp.max_seq_length,
        loss_logits=hp.loss_logits,
        adapters_in_float32=precision.mixed_precision != "bf16",
    )
    train_counts = trainer.counts["train"]
    val_counts = trainer.counts.get("eval", SplitCounts())
    dropped_too_long = train_counts.dropped_too_long + val_counts.dropped_too_long
    emit(
        {
            "event": "data",
            "train_examples": train_counts.kept,
            "val_examples": val_counts.kept,
            "dropped_too_long": dropped_too_long,
            "max_seq_length": hp.max_seq_length,
        }
    )
    if not train_counts.kept:
        raise TrainError(
            f"{splits.train}: no training example fits in maxSeqLength {hp.max_seq_length} "
            f"({train_counts.dropped_too_long} dropped as too long); raise hyperparameters.maxSeqLength"
        )
    if has_val and not val_counts.kept:  # every validation example too long: train without evaluating
        trainer.eval_dataset = None
        trainer.args.eval_strategy = IntervalStrategy.NO
    trainer.remove_callback(PrinterCallback)  # stdout carries JSON lines only
    trainer.remove_callback(ProgressCallback)

    if main_process and resume is not None:
        step, folder = resume
        print(f"resuming from step {step}", flush=True)
        if (folder / CHECKPOINT_METRICS).is_file():  # the rows logged up to it, wherever they were written
            shutil.copyfile(folder / CHECKPOINT_METRICS, metrics_path)
        _truncate_metrics(metrics_path, step)
    elif main_process:
        metrics_path.unlink(missing_ok=True)
    if stop.agree(args.device):  # while fetching or loading: nothing new to save
        raise Preempted("SIGTERM before training began; nothing new to save, rerun to resume")
    trainer.train(resume_from_checkpoint=str(resume[1]) if resume else None)
    if stop.agreed:
        raise Preempted(
            f"stopped at step {trainer.state.global_step} after SIGTERM; checkpoint saved, rerun to resume"
        )

    metrics = _read_metrics(metrics_path)
    evals = [row["eval_loss"] for row in metrics if row.get("eval_loss") is not None]
    adapter: Any = trainer.model
    if trainer.is_fsdp_enabled:  # every rank sends its shards; rank 0 saves the whole adapter
        from ftrecipe.training.fsdp import GatheredAdapter, gather_adapter

        adapter = GatheredAdapter(trainer.model, gather_adapter(trainer.model))
    if not main_process:  # rank 0 writes and publishes the bundle
        if node_main:  # another node's disk: its copy of the checkpoint resumed from is no longer needed
            prune_local_checkpoints(checkpoints, 0)
        return TrainResult(
            steps=trainer.state.global_step,
            resumed_from=resume[0] if resume else None,
            train_examples=train_counts.kept,
            dropped_too_long=dropped_too_long,
            final_eval_loss=evals[-1] if evals else None,
            out=options.out,
            metrics=metrics,
        )
    bundle_dir = work_dir / "bundle"
    if bundle_dir.exists():
        shutil.rmtree(bundle_dir)
    bundle_dir.mkdir()
    write_loss_curve(metrics, bundle_dir / "loss_curve.png")
    info = BundleInfo(
        adapter_name=options.adapter_name or _adapter_name(options.out),
        base_model_id=base.model_id,
        base_model_revision=base.revision,
        base_model_source=base.source,
        dataset_hash=data_hash,
        inputs_hash=run_hash,
        chat_template_added=template_added,
        train_examples=train_counts.kept,
        val_examples=val_counts.kept,
        dropped_too_long=dropped_too_long,
        steps=trainer.state.global_step,
        final_eval_loss=evals[-1] if evals else None,
        serving_dtype=precision.dtype,
        data_provenance=data_provenance(splits.train, data_hash),
        base_max_positions=_max_positions(trainer.model),
    )
    run_metadata = write_bundle(bundle_dir, adapter, tokenizer, config, metrics_path, info)
    if options.merge:
        merge_adapter(base, bundle_dir, bundle_dir / MERGED_DIR)

    from ftrecipe.storage import StorageError, publish_bundle

    quiet = _CheckpointsAreNotStrangers()
    storage_log = logging.getLogger("ftrecipe.storage.bundle")
    storage_log.addFilter(quiet)
    try:
        publish_bundle(
            bundle_dir, options.out, producer="ftrecipe train", inputs_hash=run_hash, metadata=run_metadata
        )
    except StorageError as exc:
        raise TrainError(f"publishing to {options.out}: {exc}") from None
    finally:
        storage_log.removeFilter(quiet)
    durable.delete_all()  # kept only until the adapter is published (docs/training.md)
    prune_local_checkpoints(checkpoints, 0)
    result = TrainResult(
        steps=trainer.state.global_step,
        resumed_from=resume[0] if resume else None,
        train_examples=train_counts.kept,
        dropped_too_long=info.dropped_too_long,
        final_eval_loss=info.final_eval_loss,
        out=options.out,
        metrics=metrics,
    )
    emit({"event": "done", "summary": result.summary(), "steps": result.steps, "out": options.out})
    return result


def merge_adapter(base: BaseModelRef, adapter_dir: Path, target: Path) -> None:
    """Base weights + adapter in one model (`--merge`), for servers without LoRA support.

    The base is loaded again unquantized (merging into 4/8-bit weights would lose the update), in bf16
    on a GPU that has it and float32 otherwise, and saved with the adapter's tokenizer.
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    # fp16 has too little range for merged weights on GPUs without bf16: float32 there, as on the CPU
    dtype = torch.bfloat16 if machine_precision().dtype == "bfloat16" else torch.float32
    model = AutoModelForCausalLM.from_pretrained(base.load_from, revision=base.revision, dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter_dir)).merge_and_unload()
    merged.save_pretrained(str(target), safe_serialization=True)
    AutoTokenizer.from_pretrained(str(adapter_dir)).save_pretrained(str(target))


def _adapter_name(out: str) -> str:
    name = out.rstrip("/").rsplit("/", 1)[-1]
    name = re.sub(r"[^A-Za-z0-9_.-]+", "-", name).strip("-.")
    return name or "ftrecipe-adapter"


def visible_gpus() -> int:
    """CUDA GPUs this process may use (CUDA_VISIBLE_DEVICES applied); 0 without CUDA."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def child_pids(pid: int, proc_root: Path = Path("/proc")) -> list[int]:
    """The direct children of process `pid`, from `<proc_root>/<pid>/task/*/children` (Linux only).

    Empty when the process is gone or has none (or the kernel does not expose the file).
    """
    children: set[int] = set()
    for task in (proc_root / str(pid) / "task").glob("*/children"):
        with contextlib.suppress(OSError):
            children.update(int(child) for child in task.read_text().split())
    return sorted(children)


def signal_ranks(torchrun_pid: int, signum: int, proc_root: Path = Path("/proc")) -> list[int]:
    """Send `signum` to torchrun's workers (its children), or to torchrun itself while it has none.

    Not to torchrun: on SIGTERM its agent gives the workers 30 s (`PContext.close`) before a SIGKILL,
    however long the pod's grace period; ranks signalled directly save and exit, and torchrun follows.
    Returns the pids signalled.
    """
    signalled = []
    for pid in child_pids(torchrun_pid, proc_root) or [torchrun_pid]:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)
            signalled.append(pid)
    return signalled


def _max_positions(model: Any) -> int | None:
    """The base model's context from its config (peft and FSDP wrappers pass `config` through)."""
    positions = getattr(getattr(model, "config", None), "max_position_embeddings", None)
    return positions if isinstance(positions, int) and positions > 0 else None


def run_launched(command: list[str]) -> int:
    """Run `command` (torchrun and its ranks), then report the pod's outcome; returns its exit code.

    SIGTERM goes to torchrun's workers (see `signal_ranks`), SIGINT to torchrun. The handlers are in
    place before the child starts (as PID 1, this process would otherwise ignore a SIGTERM in between);
    one that arrives before the child exists is passed on to torchrun once it does. torchrun exits 1
    whatever its ranks' codes and whichever failed first, so each rank that fails or stops leaves a
    `RankFailure` in the folder `RANK_REPORTS_ENV` names, and `launch.pod_outcome` decides from them: the
    termination message (the rank that failed on its own, e.g. `rank 1 of 2: error: OutOfMemoryError: …`)
    and the exit code (1; 2 for bad input; EXIT_PREEMPTED for a preemption). Each pod of a node group does
    so for its own ranks. When torchrun succeeds, rank 0 has written the report.
    """
    import subprocess

    from ftrecipe.termination import write_report

    print(f"training in several processes: {' '.join(command)}", file=sys.stderr, flush=True)
    state: dict[str, Any] = {"child": None, "pending": [], "sigterm": False}

    def forward(signum: int, frame: FrameType | None) -> None:
        state["sigterm"] = state["sigterm"] or signum == signal.SIGTERM
        if state["child"] is None:
            state["pending"].append(signum)
        elif signum == signal.SIGTERM:
            signal_ranks(state["child"].pid, signum)
        else:
            state["child"].send_signal(signum)

    previous = {sig: signal.signal(sig, forward) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with tempfile.TemporaryDirectory(prefix="ftrecipe-launch-") as folder:
            child = subprocess.Popen(command, env={**os.environ, RANK_REPORTS_ENV: folder})
            state["child"] = child
            for signum in state["pending"]:
                child.send_signal(signum)
            code = child.wait()
            failures = read_rank_failures(Path(folder))
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    outcome = pod_outcome(failures, code if code >= 0 else 128 - code, state["sigterm"])
    if outcome.report is not None:
        write_report(outcome.report)
        if outcome.code != EXIT_PREEMPTED:  # the ranks' own "preempted: …" lines say that one already
            print(outcome.report.message, file=sys.stderr, flush=True)  # the log's last line
    return outcome.code


def record_rank_failure(folder: Path, failure: RankFailure) -> None:
    """Leave this rank's failure for the launcher: written aside, then moved into place whole."""
    target = folder / f"rank-{failure.rank}.json"
    partial = target.with_suffix(".partial")
    with contextlib.suppress(OSError):  # the launcher falls back on torchrun's exit code
        partial.write_text(failure.to_json(), encoding="utf-8")
        partial.replace(target)


def read_rank_failures(folder: Path) -> list[RankFailure]:
    """The failures the ranks left in `folder` (`record_rank_failure`), by rank."""
    found = []
    for path in sorted(folder.glob("rank-*.json")):
        with contextlib.suppress(OSError):
            failure = RankFailure.from_json(path.read_text(encoding="utf-8"))
            if failure is not None:
                found.append(failure)
    return sorted(found, key=lambda failure: failure.rank)
