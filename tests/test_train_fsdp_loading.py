"""Under `parallelism: fsdp` only global rank 0 reads the base model's weights; every other rank, on any
node, builds the model on `meta` and receives its shards from rank 0's broadcast (`fsdp.reads_weights`,
`fsdp.build_on_meta`), and the other nodes fetch no weight file (`trainer.resolve_base_model`).

- which processes read the weights: global rank 0 under sharded fsdp; every process under ddp, with a
  4-bit base (bitsandbytes quantizes on each GPU) or without a launcher;
- the model built on `meta` has the loaded model's parameters (names, shapes, dtypes), all on `meta`, and
  its non-persistent buffers (rotary `inv_freq`, which nothing broadcasts) equal to the loaded ones; tied
  embeddings stay tied; a rank that does not read the weights loads a folder without weight files, and a
  hub id from a cache without them (offline);
- an S3 base model fetched by such a node: its config, tokenizer, generation config and chat template,
  not its weights, and a weight file an older run left in the folder is removed;
- two "nodes" (two `ftrecipe train --nodes 2` launches, one CPU rank each, own work folders) with the
  base model on S3: the node without global rank 0 fetches no weight file, yet the run logs the loss of
  one process with the same global batch at every step and publishes its adapter (1e-6 each, as
  tests/test_train_fsdp.py). Node 1's peak memory is not asserted: the tiny model's weights (0.5 MB) are
  lost in the ranks' ~1 GB of torch and transformers.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from support.training_runs import (
    TWO_PROCESS_SETTINGS,
    ReferenceRun,
    adapter,
    assert_same_losses,
    largest_difference,
    logged_losses,
    train_argv,
)

# The two-process runs of tests/test_train_fsdp.py and test_train_multinode (24 equal-length examples,
# global batch 4, 2 epochs, no LoRA dropout), compared with the same shared one-process reference.
STEPS = 12
LOSS_TOLERANCE = 1e-6  # float32 on the CPU, another grouping of the same sums (tests/test_train_fsdp.py)
WEIGHT_TOLERANCE = 1e-6
RUN_TIMEOUT = 300

# What the tiny model's folder holds besides its weights (model.safetensors): all a rank needs to build
# the model on meta and to tokenize.
NOT_WEIGHTS = [
    "chat_template.jinja",
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())


# ------------------------------------------------------------------------------------------ who reads


def test_only_global_rank_0_reads_the_weights_under_fsdp() -> None:
    from ftrecipe.training.fsdp import reads_weights

    rank_0 = {"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "16"}
    node_0_rank_3 = {"RANK": "3", "LOCAL_RANK": "3", "WORLD_SIZE": "16"}
    node_1_local_0 = {"RANK": "8", "LOCAL_RANK": "0", "WORLD_SIZE": "16"}
    assert reads_weights("fsdp", True, False, rank_0)
    assert not reads_weights("fsdp", True, False, node_0_rank_3)
    assert not reads_weights("fsdp", True, False, node_1_local_0)  # another node's local rank 0 too
    for env in (rank_0, node_0_rank_3, node_1_local_0):
        assert reads_weights("ddp", True, False, env)  # each rank holds the whole model
        assert reads_weights("fsdp", True, True, env)  # 4-bit: quantized on each rank's GPU as it loads
    assert reads_weights("fsdp", False, False, {})  # one process without a launcher trains unsharded


def test_weight_files_are_told_from_the_rest() -> None:
    from ftrecipe.training.fsdp import is_weight_file

    weights = [
        "model.safetensors",
        "model-00001-of-00030.safetensors",
        "pytorch_model-00001-of-00002.bin",
        "original/consolidated.00.pth",
        "model.gguf",
    ]
    assert all(is_weight_file(name) for name in weights)
    others = [*NOT_WEIGHTS, "model.safetensors.index.json", "tokenizer.model", "special_tokens_map.json"]
    assert not any(is_weight_file(name) for name in others)


# ------------------------------------------------------------------------------------------ on meta


def test_the_model_built_on_meta_is_the_loaded_one_without_weights(tiny_model: Path) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ftrecipe.training.fsdp import build_on_meta

    loaded = AutoModelForCausalLM.from_pretrained(str(tiny_model), dtype=torch.float32)
    built = build_on_meta(AutoConfig.from_pretrained(str(tiny_model)), torch.float32, "sdpa")
    assert {param.device.type for param in built.parameters()} == {"meta"}
    want = {name: (p.shape, p.dtype) for name, p in loaded.named_parameters()}
    assert {name: (p.shape, p.dtype) for name, p in built.named_parameters()} == want
    # non-persistent buffers: real, and what from_pretrained gives (accelerate copies them from each rank)
    buffers = dict(built.named_buffers())
    assert sorted(buffers) == ["model.rotary_emb.inv_freq", "model.rotary_emb.original_inv_freq"]
    inv_freq = buffers["model.rotary_emb.inv_freq"]
    assert inv_freq.device.type == "cpu" and inv_freq.dtype == torch.float32
    # head dim 16, rope theta 10000 (the tiny model's config): 10000 ** (-2i / 16); zeros, or meta, would
    # make every position alike
    assert torch.allclose(inv_freq, torch.tensor([10000.0 ** (-i / 8) for i in range(8)]), rtol=1e-6)
    for name, buffer in loaded.named_buffers():
        assert torch.equal(buffers[name], buffer), name
    assert not built.training  # as from_pretrained leaves it

    config = AutoConfig.from_pretrained(str(tiny_model))
    config.tie_word_embeddings = True
    tied = build_on_meta(config, torch.bfloat16, "sdpa")
    assert tied.lm_head.weight is tied.model.embed_tokens.weight
    assert tied.lm_head.weight.dtype == torch.bfloat16


def _other_node_rank(monkeypatch: pytest.MonkeyPatch) -> None:
    """This process as rank 1 of 2 under torchrun (another node's local rank 0); what load_model sets in
    the environment is put back afterwards."""
    for key, value in {"RANK": "1", "LOCAL_RANK": "0", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "false")
    monkeypatch.setenv("FSDP_CPU_RAM_EFFICIENT_LOADING", "false")


def test_a_rank_that_does_not_read_weights_loads_a_folder_without_them(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftrecipe.training.config import load_train_config
    from ftrecipe.training.trainer import BaseModelRef, TrainError, load_model

    folder = tmp_path / "no-weights"
    folder.mkdir()
    for name in NOT_WEIGHTS:
        (folder / name).write_bytes((tiny_model / name).read_bytes())
    base = BaseModelRef(str(folder), None, str(folder), str(folder))
    config = load_train_config(None, ["parallelism=fsdp"])
    _other_node_rank(monkeypatch)
    model = load_model(config, base)
    assert {param.device.type for param in model.parameters()} == {"meta"}
    assert model.model.rotary_emb.inv_freq.device.type == "cpu"
    monkeypatch.setenv("RANK", "0")  # global rank 0 does read them: there are none here
    with pytest.raises(TrainError, match="no-weights"):
        load_model(config, base)


def test_a_rank_that_does_not_read_weights_asks_the_hub_for_none(
    tiny_model: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A hub id from a cache holding the files without the weights, offline: enough for such a rank."""
    import huggingface_hub.constants

    from ftrecipe.training.config import load_train_config
    from ftrecipe.training.trainer import BaseModelRef, TrainError, load_model

    cache = tmp_path / "hub"
    revision = "0123456789abcdef0123456789abcdef01234567"
    snapshot = cache / "models--acme--tiny" / "snapshots" / revision
    snapshot.mkdir(parents=True)
    for name in NOT_WEIGHTS:
        (snapshot / name).write_bytes((tiny_model / name).read_bytes())
    (cache / "models--acme--tiny" / "refs").mkdir()
    (cache / "models--acme--tiny" / "refs" / "main").write_text(revision, encoding="utf-8")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    base = BaseModelRef("acme/tiny", None, "acme/tiny", "hf:acme/tiny")
    config = load_train_config(None, ["parallelism=fsdp"])
    _other_node_rank(monkeypatch)
    model = load_model(config, base)
    assert {param.device.type for param in model.parameters()} == {"meta"}
    monkeypatch.setenv("RANK", "0")
    with pytest.raises(TrainError, match="hf:acme/tiny"):
        load_model(config, base)


def test_a_node_without_global_rank_0_fetches_no_weight_file_from_s3(
    tiny_model: Path, tmp_path: Path, s3_bucket: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from ftrecipe.storage import publish_bundle
    from ftrecipe.training.trainer import resolve_base_model

    for key, value in {**s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}.items():
        monkeypatch.setenv(key, value)
    uri = f"s3://{s3_bucket.bucket}/base/"
    publish_bundle(tiny_model, uri, producer="test", inputs_hash="m")
    stale = tmp_path / "node1" / "base_model" / "model.safetensors"  # an older run's, as rank 0 then
    stale.parent.mkdir(parents=True)
    stale.write_bytes(b"old weights")
    base = resolve_base_model(uri, tmp_path / "node1", weights=False)
    assert base.load_from == str(tmp_path / "node1" / "base_model") and base.model_id == uri
    assert _files(tmp_path / "node1" / "base_model") == NOT_WEIGHTS
    resolve_base_model(uri, tmp_path / "node0")  # global rank 0's node: everything
    assert _files(tmp_path / "node0" / "base_model") == sorted([*NOT_WEIGHTS, "model.safetensors"])


# ------------------------------------------------------------------------------------------ two nodes


@pytest.mark.slow
def test_two_fsdp_nodes_train_as_one_process_while_only_global_rank_0_has_the_weights(
    tiny_model: Path,
    equal_length_data: Path,
    one_process_reference: ReferenceRun,
    tmp_path: Path,
    s3_bucket: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Two "nodes", one CPU rank each, base model on S3, each fetching onto its own work folder."""
    from ftrecipe.storage import publish_bundle

    data = equal_length_data
    s3_env = {**s3_bucket.env(), "FTRECIPE_S3_ADDRESSING_STYLE": "path"}
    for key, value in s3_env.items():
        monkeypatch.setenv(key, value)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    base = f"s3://{s3_bucket.bucket}/base/"
    publish_bundle(tiny_model, base, producer="test", inputs_hash="m")

    nodes, port = [], _free_port()
    for rank in (0, 1):
        settings = (*TWO_PROCESS_SETTINGS, "lora.dropout=0", "parallelism=fsdp", "checkpointEverySteps=1000")
        argv = [sys.executable, "-m", "ftrecipe.cli.main"]
        argv += train_argv(data, base, tmp_path / "out", tmp_path / f"node{rank}", *settings)
        argv += ["--nodes", "2", "--node-rank", str(rank), "--rendezvous", f"127.0.0.1:{port}"]
        with (
            (tmp_path / f"node{rank}.out").open("wb") as out,
            (tmp_path / f"node{rank}.err").open("wb") as err,
        ):
            # a session each: torchrun and its rank are killed with the launcher if the test fails
            nodes.append(subprocess.Popen(argv, stdout=out, stderr=err, env=env, start_new_session=True))
    try:
        codes = [node.wait(timeout=RUN_TIMEOUT) for node in nodes]
    finally:
        for node in nodes:
            if node.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(node.pid, signal.SIGKILL)
                node.wait()
    logs = [(tmp_path / f"node{rank}.out", tmp_path / f"node{rank}.err") for rank in (0, 1)]
    assert codes == [0, 0], [err.read_text(encoding="utf-8")[-3000:] for _, err in logs]

    # global rank 0 reports; the rendezvous decides which node has it (both have one host name here)
    reporting = [
        rank for rank, (out, _) in enumerate(logs) if '"event": "progress"' in out.read_text(encoding="utf-8")
    ]
    assert len(reporting) == 1, reporting
    other = tmp_path / f"node{1 - reporting[0]}"
    assert _files(other / "inputs" / "base_model") == NOT_WEIGHTS
    assert list(other.rglob("*.safetensors")) == []  # no weight file anywhere on that node's disk
    holder = tmp_path / f"node{reporting[0]}" / "inputs" / "base_model"
    assert _files(holder) == sorted([*NOT_WEIGHTS, "model.safetensors"])

    losses = logged_losses(tmp_path / "out")
    assert [step for step, train, _ in losses if train is not None] == list(range(1, STEPS + 1))
    reference = one_process_reference.out
    assert_same_losses(losses, logged_losses(reference), LOSS_TOLERANCE)
    assert largest_difference(adapter(tmp_path / "out"), adapter(reference)) <= WEIGHT_TOLERANCE
