"""`parallelism: fsdp` (issue 22): the base model's weights sharded across the ranks (FSDP2 via accelerate).

On the CPU with two gloo ranks under torchrun (accelerate enables its FSDP plugin on accelerator devices
only; `training.fsdp.enable_fsdp_on_cpu` turns it on for CPU ranks, so this is the same sharded path a GPU
run takes, on another device):

- two FSDP ranks with 2 examples each log the same loss at every step as one process with 2 x 2
  accumulation (the same global batch) and publish the same adapter; the published adapter is one file
  set that plain peft loads in one process;
- a run stopped by SIGTERM leaves a sharded checkpoint (each rank's part of every LoRA weight, written
  with torch.distributed.checkpoint); resumed on the same world size it ends with the losses and the
  adapter of the uninterrupted FSDP run; on another world size it is refused in one line naming the
  checkpoint and both world sizes;
- fsdp with 8-bit quantization is refused in the recipe, the CRD and the trainer's config.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from ftrecipe.api import RecipeError, parse_recipe
from ftrecipe.api.crd import custom_resource_definition
from support.crd_schema import api_server_violations
from support.training_runs import (
    TWO_PROCESS_SETTINGS,
    ReferenceRun,
    adapter,
    assert_same_losses,
    largest_difference,
    logged_losses,
    train_in_process,
)

ROOT = Path(__file__).resolve().parents[1]

STEPS = 12  # 24 examples, a global batch of 4, 2 epochs
# the one-process reference's (training_runs.one_process_reference) but 2 x 1 accumulation; no dropout
SETTINGS = [*TWO_PROCESS_SETTINGS, "lora.dropout=0"]
# Float32 on the CPU. Two ranks reduce-scatter the gradients of two halves where one process accumulates
# them: another grouping of the same sums (observed: equal to the last bit; allowed: the 7th digit).
LOSS_TOLERANCE = 1e-6
WEIGHT_TOLERANCE = 1e-6
RESUME_TOLERANCE = 1e-5  # as tests/test_train_resume.py
RUN_TIMEOUT = 300


def _train(data: Path, model: Path, root: Path, *extra: str, work: str = "work") -> list[str]:
    argv = ["train", "--data", str(data), "--base-model", str(model), "--out", str(root / "out")]
    argv += ["--work-dir", str(root / work)]
    for item in (*SETTINGS, *extra):
        argv += ["--set", item]
    return argv


def _env() -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _launcher(argv: list[str]) -> list[str]:
    """`ftrecipe train` on a pod with two GPUs: torchrun with two ranks (here CPU ranks, gloo), run by
    `run_launched` as the CLI does."""
    from ftrecipe.training.launch import launch_command

    command = launch_command(argv, visible_gpus=2, env={})
    assert command is not None
    code = (
        "import sys; from ftrecipe.training.trainer import run_launched; sys.exit(run_launched(sys.argv[1:]))"
    )
    return [sys.executable, "-c", code, *command]


def _one_process(argv: list[str]) -> list[str]:
    return [sys.executable, "-m", "ftrecipe.cli.main", *argv]


def _run(command: list[str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=RUN_TIMEOUT)


def _checkpoint_steps(folder: Path) -> list[int]:
    if not folder.is_dir():
        return []
    return sorted(int(p.name.removeprefix("step-")) for p in folder.iterdir() if p.name.startswith("step-"))


# --------------------------------------------------------------------------------------------- validation


def _minimal(**training: Any) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((ROOT / "examples" / "recipes" / "minimal.yaml").read_text())
    manifest["spec"]["training"].update(training)
    return manifest


FSDP_8BIT = (
    "parallelism fsdp with quantization 8bit: bitsandbytes 8-bit weights cannot be sharded "
    "(FSDP supports 4-bit QLoRA only); use quantization 4bit, or parallelism ddp"
)


def test_fsdp_with_8bit_is_refused_in_one_line_everywhere() -> None:
    from ftrecipe.training.config import ConfigError, load_train_config

    training = {"parallelism": "fsdp", "method": "qlora", "quantization": "8bit", "gpus": 2}
    with pytest.raises(RecipeError) as caught:
        parse_recipe(_minimal(**training), "recipe.yaml")
    assert caught.value.lines == [f"recipe.yaml: spec.training: {FSDP_8BIT}"]
    violations = api_server_violations(custom_resource_definition(), _minimal(**training))
    assert any(FSDP_8BIT in violation for violation in violations), violations
    with pytest.raises(ConfigError) as refused:
        load_train_config(None, ["parallelism=fsdp", "quantization=8bit"])
    assert str(refused.value) == f"invalid training config: training: {FSDP_8BIT}"


@pytest.mark.parametrize(
    "training",
    [
        {"parallelism": "fsdp", "method": "qlora", "quantization": "4bit", "gpus": 2},
        {"parallelism": "ddp", "method": "qlora", "quantization": "8bit", "gpus": 2},
        {"parallelism": "fsdp", "gpus": 2},
    ],
    ids=["fsdp-4bit", "ddp-8bit", "fsdp-unquantized"],
)
def test_what_fsdp_supports_passes(training: dict[str, Any]) -> None:
    assert api_server_violations(custom_resource_definition(), _minimal(**training)) == []
    assert parse_recipe(_minimal(**training)).spec.training.parallelism == training["parallelism"]


def test_training_yml_carries_fsdp_to_the_trainer(tmp_path: Path) -> None:
    """The contract: phases/inputs writes `parallelism` into training.yml, training/config reads it."""
    from ftrecipe.phases.inputs import training_config
    from ftrecipe.training.config import load_train_config

    spec = parse_recipe(_minimal(parallelism="fsdp", gpus=4, nodes=2)).spec
    (tmp_path / "training.yml").write_text(yaml.safe_dump(training_config(spec)), encoding="utf-8")
    assert "parallelism: fsdp" in (tmp_path / "training.yml").read_text(encoding="utf-8")
    assert load_train_config(tmp_path / "training.yml").parallelism == "fsdp"
    default = parse_recipe(_minimal()).spec
    (tmp_path / "default.yml").write_text(yaml.safe_dump(training_config(default)), encoding="utf-8")
    assert load_train_config(tmp_path / "default.yml").parallelism == "ddp"


# --------------------------------------------------------------------------------------------- pure parts


def test_fsdp_arguments_shard_each_decoder_layer(tiny_model: Path) -> None:
    from transformers import AutoModelForCausalLM

    from ftrecipe.training.fsdp import training_arguments

    model = AutoModelForCausalLM.from_pretrained(str(tiny_model))
    assert training_arguments(model, "ddp", True, False) == {}
    assert training_arguments(model, "fsdp", False, False) == {}  # one process, no launcher: unsharded
    assert training_arguments(model, "fsdp", True, False) == {
        "fsdp": True,
        "fsdp_config": {
            "version": 2,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
            "reshard_after_forward": True,
            "cpu_ram_efficient_loading": True,
            "state_dict_type": "SHARDED_STATE_DICT",
            # the model's own gradient checkpointing (peft cannot save through FSDP's checkpoint_wrapper)
            "activation_checkpointing": False,
        },
    }
    quantized = training_arguments(model, "fsdp", True, True)
    assert quantized["fsdp_config"]["cpu_ram_efficient_loading"] is False  # 4-bit loads onto each GPU


def test_a_model_without_decoder_layers_is_refused() -> None:
    import torch

    from ftrecipe.training.fsdp import training_arguments

    with pytest.raises(ValueError, match=r"^parallelism fsdp: no decoder layer class found in Sequential"):
        training_arguments(torch.nn.Sequential(torch.nn.Linear(2, 2)), "fsdp", True, False)


def test_the_inputs_hash_holds_fsdp_but_not_nodes(tiny_model: Path) -> None:
    from ftrecipe.training.config import load_train_config
    from ftrecipe.training.trainer import BaseModelRef, inputs_hash

    base = BaseModelRef(str(tiny_model), None, str(tiny_model), str(tiny_model))
    ddp = inputs_hash(load_train_config(None, []), base, "data", world_size=4)
    assert inputs_hash(load_train_config(None, ["parallelism=ddp", "nodes=2"]), base, "data", 4) == ddp
    assert inputs_hash(load_train_config(None, ["parallelism=fsdp"]), base, "data", 4) != ddp


def test_a_checkpoint_of_another_world_size_alone_is_named_so() -> None:
    from ftrecipe.training.trainer import world_size_refusal

    def hash_for(size: int) -> str:
        return f"hash-{size}"

    refusal = world_size_refusal("s3://b/out/checkpoints/step-4", "hash-2", 2, 1, hash_for, "fsdp")
    assert refusal is not None
    assert str(refusal) == (
        "s3://b/out/checkpoints/step-4: a checkpoint written by 2 processes, this run has 1: its FSDP "
        "shards (one per process) resume only on the same world size; run on 2 GPUs in all (nodes x gpus) "
        "to resume, or delete it to start over"
    )
    assert "the global batch and the schedule" in str(
        world_size_refusal("x", "hash-8", 8, 4, hash_for, "ddp")
    )
    assert world_size_refusal("x", "other", 2, 1, hash_for, "fsdp") is None  # more than the world size
    assert world_size_refusal("x", "hash-2", None, 1, hash_for, "fsdp") is None  # not recorded
    assert world_size_refusal("x", "hash-2", 2, 2, hash_for, "fsdp") is None


def test_the_memory_estimate_holds_one_share_of_the_weights_under_fsdp() -> None:
    """Llama-3.1-70B's shape, 1 x 4096 tokens, bf16, no checkpointing (the unset gradientCheckpointing's
    question). Parameters: 80 x (2 x 8192^2 + 2 x 8192 x 1024 + 3 x 8192 x 28672 + 2 x 8192) + 8192
    + 2 x 128256 x 8192 = 70,553,706,496; activations 4096 x 80 x (12 x 8192 + 4 x 28672) x 2 bytes
    = 139,586,437,120 bytes."""
    from ftrecipe.training.trainer import ModelShape, training_memory_bytes

    shape = ModelShape(
        layers=80, hidden=8192, intermediate=28672, vocab=128256, kv_hidden=1024, tied_embeddings=False
    )
    assert shape.parameters() == 70_553_706_496
    whole = training_memory_bytes(shape, 4096, "none", 2, False)
    assert whole == 70_553_706_496 * 2 + 139_586_437_120
    # 8 ranks: 141,107,412,992 / 8 = 17,638,426,624, and one layer gathered:
    # (70,553,706,496 - 2 x 128256 x 8192) / 80 x 2 bytes = 1,711,309,004.8
    sharded = training_memory_bytes(shape, 4096, "none", 2, False, weight_shards=8)
    assert sharded == int(17_638_426_624 + 1_711_309_004.8 + 139_586_437_120)


# --------------------------------------------------------------------------------------------- two ranks


@pytest.fixture(scope="module")
def data(equal_length_data: Path) -> Path:
    """24 training and 4 validation examples of one token length (training_runs.write_equal_length_data)."""
    return equal_length_data


@pytest.fixture(scope="module")
def one_process(one_process_reference: ReferenceRun) -> Path:
    """One process, no sharding, 2 examples x 2 accumulation steps on `data`: the reference (shared with
    test_train_multinode). Its bundle folder."""
    return one_process_reference.out


@pytest.fixture(scope="module")
def sharded_run(
    tiny_model: Path, data: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, subprocess.CompletedProcess[str]]:
    """Two FSDP ranks, 2 examples each, uninterrupted, with the model's own gradient checkpointing: its
    bundle folder and the launch's outputs.

    One launch serves the same-global-batch, gradient-checkpointing and published-adapter tests (each
    torchrun launch of two ranks costs ~15 s here). Checkpointing changes no loss and no weight, so this is
    also the uninterrupted run for the runs without it (the resume tests); FSDP without checkpointing is
    held to one process by test_qlora_4bit_shards_too (1e-6) and the resume tests.
    """
    root = tmp_path_factory.mktemp("fsdp-two")
    argv = _train(
        data,
        tiny_model,
        root,
        "parallelism=fsdp",
        "checkpointEverySteps=1000",
        "hyperparameters.gradientCheckpointing=true",
    )
    done = _run(_launcher(argv))
    assert done.returncode == 0, done.stderr[-3000:]
    return root / "out", done


@pytest.fixture(scope="module")
def sharded(sharded_run: tuple[Path, subprocess.CompletedProcess[str]]) -> Path:
    """The uninterrupted two-rank FSDP run's bundle folder."""
    return sharded_run[0]


@pytest.mark.slow
def test_two_fsdp_ranks_train_as_one_process_with_the_same_global_batch(
    one_process: Path, sharded: Path
) -> None:
    losses = logged_losses(sharded)
    assert [step for step, train, _ in losses if train is not None] == list(range(1, STEPS + 1))
    assert_same_losses(losses, logged_losses(one_process), LOSS_TOLERANCE)
    assert largest_difference(adapter(sharded), adapter(one_process)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_gradient_checkpointing_under_fsdp_changes_nothing_but_memory(
    one_process: Path, sharded_run: tuple[Path, subprocess.CompletedProcess[str]]
) -> None:
    """The model's own (non-reentrant) checkpointing on sharded layers: the same losses and adapter.

    FSDP's `activation_checkpointing` instead left the published adapter empty (peft does not see through
    torch's checkpoint_wrapper), which this catches as well.
    """
    out, done = sharded_run
    assert '"gradient_checkpointing": true' in done.stdout
    assert_same_losses(logged_losses(out), logged_losses(one_process), LOSS_TOLERANCE)
    assert largest_difference(adapter(out), adapter(one_process)) <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_qlora_4bit_shards_too(tiny_model: Path, data: Path, tmp_path: Path) -> None:
    """A 4-bit base (bitsandbytes' CPU backend here) under FSDP: the packed weights, stored in the compute
    dtype, shard like any weight (accelerate leaves out, with a warning, those stored as uint8, bitsandbytes'
    default), and two ranks train as one process with the same global batch.

    The reference has no validation split: evaluating on the CPU switches bitsandbytes to its repacked
    inference kernel for the rest of the run (4e-5 in the loss after it). The sharded run does evaluate at
    the end of epoch 1, with that repacking off (`fsdp.keep_4bit_layout_on_cpu`; left on, the gathered copy
    was repacked and training after the evaluation went wrong: 5.92 instead of 5.24 at step 7), and must
    go on exactly as if it had not.
    """
    qlora = ("method=qlora", "quantization=4bit", "checkpointEverySteps=1000")
    train_only = tmp_path / "train-only"
    train_only.mkdir()
    (train_only / "train.jsonl").write_bytes((data / "train.jsonl").read_bytes())
    reference = _train(
        train_only, tiny_model, tmp_path / "one", *qlora, "hyperparameters.gradientAccumulationSteps=2"
    )
    one = train_in_process(reference)  # one process: no launcher, no process of its own needed
    assert one.code == 0, one.stderr[-3000:]
    two = _run(_launcher(_train(data, tiny_model, tmp_path / "two", *qlora, "parallelism=fsdp")))
    assert two.returncode == 0, two.stderr[-3000:]
    assert "Params4bit" not in two.stderr, two.stderr[-3000:]  # none left out of the sharding
    got = logged_losses(tmp_path / "two" / "out")
    assert [step for step, _, evaluation in got if evaluation is not None] == [6, 12]
    trained = [row for row in got if row[1] is not None]
    assert_same_losses(trained, logged_losses(tmp_path / "one" / "out"), LOSS_TOLERANCE)
    difference = largest_difference(adapter(tmp_path / "two" / "out"), adapter(tmp_path / "one" / "out"))
    assert difference <= WEIGHT_TOLERANCE


@pytest.mark.slow
def test_the_published_adapter_loads_with_plain_peft_in_one_process(
    tiny_model: Path, one_process: Path, sharded: Path
) -> None:
    """One file set (no shards), the whole LoRA weights: loaded on the base model as any adapter is."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    assert sorted(p.name for p in sharded.iterdir() if "adapter" in p.name) == [
        "adapter_config.json",
        "adapter_model.safetensors",
    ]
    saved = adapter(sharded)
    assert len(saved) == 2 * 7 * 2  # lora_A and lora_B of 7 projections in each of 2 layers
    assert saved["base_model.model.model.layers.1.mlp.up_proj.lora_A.weight"].shape == (16, 64)
    assert saved["base_model.model.model.layers.1.mlp.up_proj.lora_B.weight"].shape == (128, 16)
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(str(tiny_model)), str(sharded))
    loaded = {
        name.replace(".default", ""): tensor for name, tensor in model.state_dict().items() if "lora_" in name
    }
    reference = adapter(one_process)
    assert largest_difference(loaded, reference) <= WEIGHT_TOLERANCE
    assert all(float(tensor.abs().max()) > 0 for name, tensor in loaded.items() if "lora_B" in name)


@pytest.mark.slow
def test_a_sharded_checkpoint_resumes_on_the_same_world_size_only(
    tiny_model: Path, data: Path, sharded: Path, tmp_path: Path
) -> None:
    from torch.distributed.checkpoint.filesystem import FileSystemReader

    from ftrecipe.training.trainer import EXIT_PREEMPTED

    argv = _train(data, tiny_model, tmp_path, "parallelism=fsdp", "checkpointEverySteps=1000")
    process = subprocess.Popen(
        _launcher(argv), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env()
    )
    assert process.stdout is not None
    try:
        for line in process.stdout:  # the kubelet's SIGTERM, to `ftrecipe train`, once step 3 is done
            if line.startswith('{"event": "progress"') and json.loads(line)["step"] >= 3:
                process.send_signal(signal.SIGTERM)
                break
        _, stderr = process.communicate(timeout=RUN_TIMEOUT)
    finally:
        process.kill()
    assert process.returncode == EXIT_PREEMPTED, stderr[-3000:]
    (step,) = _checkpoint_steps(tmp_path / "out" / "checkpoints")
    assert 3 <= step < STEPS
    checkpoint = tmp_path / "out" / "checkpoints" / f"step-{step}"
    # each rank wrote its own shard of the adapter: every LoRA weight is in two pieces, one per rank
    shards = checkpoint / "pytorch_model_fsdp_0"
    assert {"__0_0.distcp", "__1_0.distcp", ".metadata"} <= {p.name for p in shards.iterdir()}
    metadata = FileSystemReader(str(shards)).read_metadata().state_dict_metadata
    lora = {key: item for key, item in metadata.items() if "lora_A" in key}
    assert len(lora) == 14 and all(len(item.chunks) == 2 for item in lora.values()), lora  # type: ignore[union-attr]
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= {p.name for p in checkpoint.iterdir()}

    # another world size: one line naming the checkpoint and both sizes, before any training
    expected = (
        "a checkpoint written by 2 processes, this run has 1: its FSDP shards (one per process) resume only "
        "on the same world size; run on 2 GPUs in all (nodes x gpus) to resume, or delete it to start over"
    )
    refused = train_in_process(argv)  # the same work folder: its checkpoint is named
    assert refused.code == 2, refused.stderr[-3000:]
    assert (
        refused.stderr.strip().splitlines()[-1] == f"error: {tmp_path / 'work' / 'checkpoints'}: {expected}"
    )
    fresh_pod = _train(
        data, tiny_model, tmp_path, "parallelism=fsdp", "checkpointEverySteps=1000", work="pod"
    )
    refused = train_in_process(fresh_pod)  # a new pod: the durable checkpoint is named
    assert refused.code == 2, refused.stderr[-3000:]
    assert refused.stderr.strip().splitlines()[-1] == f"error: {checkpoint}: {expected}"

    resumed = _run(_launcher(argv))
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from step {step}" in resumed.stdout.splitlines()
    assert_same_losses(logged_losses(tmp_path / "out"), logged_losses(sharded), RESUME_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(sharded)) <= WEIGHT_TOLERANCE
    assert _checkpoint_steps(tmp_path / "out" / "checkpoints") == []


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _two_nodes(argv: list[str], root: Path) -> list[subprocess.Popen[str]]:
    """`ftrecipe train --nodes 2` once per node (one process each), each with its own work folder (disk:
    the later --work-dir wins)."""
    port = _free_port()
    nodes = []
    for rank in (0, 1):
        group = ["--work-dir", str(root / f"node{rank}"), "--nodes", "2", "--node-rank", str(rank)]
        command = _one_process([*argv, *group, "--rendezvous", f"127.0.0.1:{port}"])
        nodes.append(
            subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
        )
    return nodes


def _finish(nodes: list[subprocess.Popen[str]]) -> list[tuple[int, str, str]]:
    """Each node's exit code, stdout and stderr (every process killed if still there at the end)."""
    try:
        outputs = [node.communicate(timeout=RUN_TIMEOUT) for node in nodes]
        return [(node.returncode, out, err) for node, (out, err) in zip(nodes, outputs, strict=True)]
    finally:
        for node in nodes:
            node.kill()


@pytest.mark.slow
def test_fsdp_across_two_nodes_resumes_from_the_shards_of_both_disks(
    tiny_model: Path, data: Path, one_process: Path, tmp_path: Path
) -> None:
    """Two "nodes" (one rank each, own disks): each rank writes its shard on its own disk, the other node
    sends its shard into global rank 0's copy before it is published, and a group restarted on fresh
    disks resumes from it and ends where one process with the same global batch ends.

    The SIGTERM follows the step-5 checkpoint, so the stop lands on step 6, epoch 1's last (its evaluation
    runs before the checkpoint), or on a later step when the machine is slow: any step resumes exactly.
    """
    from ftrecipe.training.trainer import EXIT_PREEMPTED

    argv = _train(data, tiny_model, tmp_path, "parallelism=fsdp", "checkpointEverySteps=5")
    nodes = _two_nodes(argv, tmp_path / "first")
    published = tmp_path / "out" / "checkpoints" / "step-5" / "_SUCCESS"
    deadline = time.monotonic() + RUN_TIMEOUT
    while not published.exists() and all(node.poll() is None for node in nodes):
        assert time.monotonic() < deadline, "no checkpoint at step 5"
        time.sleep(0.02)
    nodes[1].send_signal(signal.SIGTERM)  # node 1's `ftrecipe train`, as its kubelet would
    for code, _, stderr in _finish(nodes):
        assert code == EXIT_PREEMPTED, stderr[-3000:]
    steps = _checkpoint_steps(tmp_path / "out" / "checkpoints")
    assert steps and steps[-1] < STEPS, steps
    shards = tmp_path / "out" / "checkpoints" / f"step-{steps[-1]}" / "pytorch_model_fsdp_0"
    assert {"__0_0.distcp", "__1_0.distcp"} <= {p.name for p in shards.iterdir()}

    again = _two_nodes(argv, tmp_path / "restarted")  # the JobSet's restart: new pods, empty disks
    finished = _finish(again)
    for code, _, stderr in finished:
        assert code == 0, stderr[-3000:]
    assert any(f"resuming from step {steps[-1]}" in stdout.splitlines() for _, stdout, _ in finished)
    assert_same_losses(logged_losses(tmp_path / "out"), logged_losses(one_process), RESUME_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(one_process)) <= WEIGHT_TOLERANCE


# --------------------------------------------------------------------------------------------- benchmark


def _benchmark(tmp_path: Path, *argv: str) -> dict[str, Any]:
    out = tmp_path / "train_gpu.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "train_gpu.py"), "--parallelism", "fsdp", *argv]
    done = subprocess.run(
        [*command, "--json", str(out)], cwd=ROOT, capture_output=True, text=True, env=_env()
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    data: dict[str, Any] = json.loads(out.read_text())
    return data


@pytest.mark.slow
def test_the_gpu_benchmark_plans_fsdp_over_eight_gpus(tmp_path: Path) -> None:
    """The 8B plan for 8 ranks, on a machine without a GPU: ftrecipe alone, 8-bit refused by the rule."""
    data = _benchmark(tmp_path, "--shape", "llama-8b", "--tests", "2", "--nproc", "8", "--dry-run")
    assert data["dry_run"] is True and data["runs"] == [] and data["params"]["ranks"] == 8
    plan = {item["variant"]: item for item in data["plan"]}
    assert all(item["sides"] == ["ftrecipe"] for item in plan.values())
    assert plan["qlora-8bit"]["problem"] == FSDP_8BIT
    assert plan["lora"]["problem"] is None
    # activations of 2 x 4096 tokens without checkpointing, 8192 x 32 layers x (12 x 4096 + 4 x 14336)
    # x 2 bytes = 52.0 GiB; the bf16 weights 8.03e9 x 2 bytes = 14.96 GiB / 8 ranks = 1.87 GiB; one layer
    # gathered (8.03e9 - 2 x 128256 x 4096) / 32 x 2 bytes = 0.41 GiB: 54.3 GiB
    assert plan["lora"]["estimated_gib_per_gpu_without_checkpointing"] == pytest.approx(54.3, abs=0.05)


@pytest.mark.slow
def test_the_gpu_benchmark_runs_fsdp_on_cpu_ranks(tmp_path: Path) -> None:
    data = _benchmark(tmp_path, "--shape", "tiny", "--tests", "4", "--variants", "lora")
    (run,) = data["runs"]
    assert run["state"] == "ok" and run["ranks"] == 2 and run["steps"] >= 1, run
    assert run["tokens_per_s"] > 0 and run["gpu_peak_gb_rank0"] is None  # no GPU here
