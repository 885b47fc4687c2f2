"""`parallelism: fsdp`: the base model's weights sharded across every rank (FSDP2, through accelerate).

With `ddp` every GPU holds the whole base model; LoRA still needs all of it in memory, so a base model
whose weights do not fit one GPU (70B in bf16: ~140 GB) cannot train that way. Under `fsdp` each rank
keeps 1/world_size of every weight and all-gathers one decoder layer at a time while computing it.

How, with the installed libraries (transformers 5.24, accelerate 1.16, peft 0.21, torch 2.13):

- transformers' `fsdp` / `fsdp_config` arguments make accelerate's `FullyShardedDataParallelPlugin`;
  version 2 (`fully_shard`, per-parameter DTensors, what peft supports without `use_orig_params`), one
  FSDP unit per decoder layer (`transformer_layer_cls_to_wrap`, the model's `_no_split_modules`), the
  embeddings and the final norm with the head in units of their own (accelerate does that);
- loading: global rank 0 alone reads the weights, into host memory; every other rank, on its node and on
  the others, builds the model on the `meta` device from its config (`build_on_meta`), and accelerate
  broadcasts rank 0's weights shard by shard when it wraps the model (`cpu_ram_efficient_loading`): no
  rank ever holds the whole model on its GPU, and the nodes without rank 0 fetch the model's config,
  tokenizer, generation config and chat template but no weight file (`reads_weights`, `is_weight_file`).
  transformers' own version of this keys on the local rank and, in 5.24, reads the weights on every rank
  anyway (memory-mapped: untouched pages cost nothing, but a dtype conversion, a bf16 checkpoint loaded in
  fp16 or an fp32 one in bf16, copies the whole model on every rank), and it needs them on every node's
  disk. Non-persistent buffers (rotary `inv_freq`) are in no state dict and nothing broadcasts them:
  accelerate keeps each rank's own, so the meta-built model gets real ones, computed by the model's
  `_init_weights` as `from_pretrained` computes rank 0's. A 4-bit (QLoRA) base is loaded onto each rank's
  GPU instead (4-bit 70B is ~40 GB; bitsandbytes quantizes as it loads, and accelerate broadcasts no
  4-bit weights), so every node fetches it, with its packed weights stored in the compute dtype
  (`bnb_4bit_quant_storage`), which is what lets `fully_shard` shard them;
- gradient checkpointing is the model's own (transformers' `gradient_checkpointing_enable`, non-reentrant,
  as under ddp), not FSDP's `activation_checkpointing`: that one wraps each decoder layer in torch's
  `checkpoint_wrapper`, whose `_checkpoint_wrapped_module` in the module names peft 0.21 does not strip
  when it picks the adapter's weights out of a state dict (it strips FSDP1's `_fsdp_wrapped_module` only),
  so the published adapter came out empty (tried on two CPU ranks). With the model's own, a recomputed
  layer's forward gathers its weights as any forward does (tested: the losses and adapter of a run
  without checkpointing);
- checkpoints are sharded (`SHARDED_STATE_DICT`, adapter only: each rank writes its shard of the LoRA
  weights and of the optimizer state with torch.distributed.checkpoint), so they resume on the same world
  size; the trainer refuses another one in one line;
- the published adapter is gathered: the full LoRA weights (frozen base weights left out) on rank 0, saved
  with peft's `save_pretrained` as one file set, loadable by plain peft in one process.

accelerate turns its FSDP plugin on for accelerator devices only (`AcceleratorState`: MULTI_GPU and the
like, not MULTI_CPU). CPU ranks (gloo) get it from `enable_fsdp_on_cpu`, so the sharded path runs, and is
tested, without a GPU.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, MutableMapping
from typing import Any, Final, Literal

from ftrecipe.training.launch import is_main_process

Parallelism = Literal["ddp", "fsdp"]

FSDP_VERSION: Final = 2
# What accelerate and transformers read while the model loads (before the Trainer exists to set them).
LOADING_ENV: Final = {"ACCELERATE_USE_FSDP": "true", "FSDP_CPU_RAM_EFFICIENT_LOADING": "true"}
# Weight files of a saved model (Hugging Face layouts, Meta's original/*.pth, GGUF, TF/Flax): what the
# nodes without global rank 0 do not fetch under fsdp.
WEIGHT_FILE_SUFFIXES: Final = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf", ".h5", ".msgpack")


def shards(parallelism: Parallelism, launched: bool) -> bool:
    """Whether the weights are sharded: fsdp in processes a launcher started (torchrun sets WORLD_SIZE).

    One process without a launcher trains unsharded (transformers refuses FSDP outside a distributed run,
    and one rank has nothing to share with); under torchrun even one rank takes the FSDP path (the GPU
    benchmark on one GPU).
    """
    return parallelism == "fsdp" and launched


def decoder_layer_classes(model: Any) -> list[str]:
    """Class names of the model's decoder layers: one FSDP unit each.

    transformers models name the blocks that must stay on one device in `_no_split_modules`
    (`LlamaDecoderLayer`, ...); those present in the model, else every class ending in `DecoderLayer`.
    Empty when neither is found (the caller refuses: FSDP would wrap the whole model as one unit, which
    gathers every weight at once and saves nothing).
    """
    present = {type(module).__name__ for module in model.modules()}
    declared = [name for name in getattr(model, "_no_split_modules", None) or [] if name in present]
    if declared:
        return sorted(set(declared))
    return sorted(name for name in present if name.endswith("DecoderLayer"))


def fsdp_arguments(layer_classes: list[str], quantized: bool) -> dict[str, Any]:
    """transformers' TrainingArguments for FSDP2 over `layer_classes` (merged into the SFTConfig)."""
    return {
        "fsdp": True,
        "fsdp_config": {
            "version": FSDP_VERSION,
            "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
            "transformer_layer_cls_to_wrap": list(layer_classes),
            "reshard_after_forward": True,
            # rank 0 holds the weights in host memory, the others on meta; accelerate skips it for 4-bit
            "cpu_ram_efficient_loading": not quantized,
            "state_dict_type": "SHARDED_STATE_DICT",
            "activation_checkpointing": False,  # the model's own instead (see the module docstring)
        },
    }


def training_arguments(
    model: Any, parallelism: Parallelism, launched: bool, quantized: bool
) -> dict[str, Any]:
    """The SFTConfig arguments `parallelism` adds: none unless the weights are sharded (`shards`).

    ValueError, one line, for a model without recognisable decoder layers.
    """
    if not shards(parallelism, launched):
        return {}
    layers = decoder_layer_classes(model)
    if not layers:
        raise ValueError(
            f"parallelism fsdp: no decoder layer class found in {type(model).__name__} (neither "
            "_no_split_modules nor a *DecoderLayer module) to shard by; use parallelism ddp"
        )
    return fsdp_arguments(layers, quantized)


def reads_weights(parallelism: Parallelism, launched: bool, quantized: bool, env: Mapping[str, str]) -> bool:
    """Whether this process reads the base model's weights (and its node needs them on disk).

    Every process does, except under sharded fsdp (`shards`) without quantization: there global rank 0
    alone reads them and every other rank, on any node, builds the model on `meta` (`build_on_meta`) and
    receives its shards from rank 0's broadcast. A 4-bit base is quantized by bitsandbytes on each rank's
    own GPU as it loads, so every rank reads it (accelerate does no broadcast for 4-bit weights).
    """
    if quantized or not shards(parallelism, launched):
        return True
    return is_main_process(env)


def is_weight_file(path: str) -> bool:
    """A saved model's weight file (safetensors shards, PyTorch pickles, ...), which a rank that builds the
    model on `meta` never opens; config, tokenizer, generation config and chat template are not."""
    return path.lower().endswith(WEIGHT_FILE_SUFFIXES)


def build_on_meta(model_config: Any, dtype: Any, attention: str) -> Any:
    """The model of `model_config` with every parameter (and persistent buffer) on `meta`: no weights read.

    What a rank that gets its weights from rank 0's broadcast needs. Its non-persistent buffers (rotary
    `inv_freq`) are real tensors on the CPU: accelerate's FSDP2 preparation copies those from each rank's
    own model (they are in no state dict, so nothing broadcasts them). Their values come from the model's
    `_init_weights`, exactly as on rank 0: `from_pretrained` also builds on `meta`, gives non-persistent
    buffers empty tensors and fills them with `_init_weights` (transformers 5.24).
    """
    import torch
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(  # type: ignore[no-untyped-call]
            model_config, dtype=dtype, attn_implementation=attention
        )
    owners = {}
    for name, buffer in list(model.named_non_persistent_buffers()):
        owner_name, _, leaf = name.rpartition(".")
        owner = model.get_submodule(owner_name)
        owner.register_buffer(leaf, torch.zeros_like(buffer, device="cpu"), persistent=False)
        owners[owner_name] = owner
    with torch.no_grad():
        for owner in owners.values():
            model._init_weights(owner)  # meta parameters of the owner stay meta: nothing to write there
    model.eval()  # as from_pretrained leaves it (the Trainer switches modes itself)
    return model


def loading_env(quantized: bool) -> dict[str, str]:
    """Environment for loading under fsdp: accelerate's FSDP with `cpu_ram_efficient_loading` (rank 0's
    weights broadcast when the model is wrapped).

    Not for a 4-bit base: bitsandbytes quantizes on the GPU each rank loads onto.
    """
    return {} if quantized else dict(LOADING_ENV)


def apply_loading_env(quantized: bool, environ: MutableMapping[str, str] = os.environ) -> None:
    environ.update(loading_env(quantized))


def keep_4bit_layout_on_cpu(model: Any) -> int:
    """Stop bitsandbytes repacking 4-bit weights for CPU inference; returns the layers changed.

    In eval mode on a CPU with AVX512-BF16, bitsandbytes' Linear4bit repacks its weight in place and marks
    the weight's quant_state as repacked. Under FSDP the forward sees the all-gathered copy: the copy is
    repacked, the shared quant_state marked, and training after an evaluation read the weights wrongly
    (the loss jumped from 5.24 to 5.92 on two CPU ranks). CPU only: CUDA never repacks.
    """
    changed = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            changed += 1
    return changed


def enable_fsdp_on_cpu(accelerator: Any, plugin_args: Mapping[str, Any] | None) -> bool:
    """Turn accelerate's FSDP plugin on for CPU ranks (gloo), which its AcceleratorState leaves at DDP.

    Returns whether it did (False: FSDP already on, not asked for, or not a multi-process CPU run).
    """
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin

    state = accelerator.state
    if plugin_args is None or getattr(state, "fsdp_plugin", None) is not None:
        return False
    if state.distributed_type != DistributedType.MULTI_CPU:
        return False
    state.fsdp_plugin = FullyShardedDataParallelPlugin(**plugin_args)
    state.distributed_type = DistributedType.FSDP
    return True


def gather_adapter(model: Any) -> dict[str, Any]:
    """The full trainable (LoRA) weights, on the CPU of rank 0; empty on the other ranks.

    Every rank must call it (an all-gather per weight). The frozen base weights are left out: gathering a
    70B base into rank 0's host memory would need 140 GB for nothing.
    """
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

    options = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    return dict(get_model_state_dict(model, options=options))


class GatheredAdapter:
    """A peft model whose `save_pretrained` writes the gathered weights (not the rank's shards)."""

    def __init__(self, model: Any, state_dict: Mapping[str, Any]) -> None:
        self.model = model
        self.state_dict = dict(state_dict)

    def save_pretrained(self, path: str, **kwargs: Any) -> None:
        self.model.save_pretrained(path, state_dict=self.state_dict, **kwargs)
