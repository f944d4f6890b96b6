"""`--trainer.strategy fsdp_qlora`: the 4-bit base sharded across processes (FSDP2), the LoRA adapters replicated.

Built on Lightning's `ModelParallelStrategy`, which applies torch's FSDP2 (`fully_shard`), not on `FSDPStrategy`
(FSDP1), because:
- FSDP1 flattens each wrapped module's parameters into one tensor of one dtype, so bitsandbytes' packed 4-bit weights
  must be stored in the dtype of the norms and adapters beside them (`bnb_4bit_quant_storage`, the trap Answer.AI's
  FSDP-QLoRA work documents). FSDP2 shards each parameter on its own (a DTensor, dim 0): uint8 4-bit blocks next to
  fp32 norms shard as they are (https://docs.pytorch.org/docs/stable/distributed.fsdp.fully_shard.html), and its one
  dtype rule is for trainable parameters only (torch `_fsdp_param_group._init_mp_dtypes`).
- Lightning refuses the name `fsdp` and `FSDPStrategy` itself on a CPU (`_check_strategy_and_fallback`), so FSDP1
  could not be tested here; `ModelParallelStrategy` runs on CPU processes (gloo) and CUDA (NCCL) with the same code.

What is sharded: every parameter of the base (4-bit blocks, embeddings, norms, LM head), one FSDP unit per decoder
layer (the classes the model lists in `_no_split_modules`), one for the rest of the decoder, one for the LM head; the
4-bit quantization state (absmax, codebooks: about 3% of a 4-bit base's bytes) stays whole on every rank, as it is an
attribute of the layer, not a parameter. What is not: the LoRA adapters (`ignored_params`), a fraction of a percent
of the base; their gradients are averaged across processes after each backward, as DDP does. So checkpoints, the
saved `adapter/`, exact resume and the optimizer are those of one process or DDP: plain tensors, nothing to gather.

Each rank first loads the whole 4-bit base on its device and then shards it: the peak while loading is one 4-bit base
per device; the steady state, measured and logged per rank (`base weights X of Y resident (sharded over N)`), is
about 1/N of it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import torch
from lightning.pytorch.strategies import ModelParallelStrategy, Strategy, StrategyRegistry
from torch import nn
from torch.distributed.tensor import DTensor
from torch.utils.data import Sampler

from alignment.data.samplers import ShardSampler
from alignment.errors import ConfigError

log = logging.getLogger(__name__)

STRATEGY_NAME = "fsdp_qlora"
# precisions that keep the adapters fp32 over a 4-bit base; "*-true" would cast the adapters (and try the base)
PRECISIONS = ("32-true", "32", "bf16-mixed", "16-mixed")


class FSDPQLoRAStrategy(ModelParallelStrategy):
    """FSDP2 over the frozen 4-bit base of a PreferenceModule's `policy`, data parallel over every process."""

    strategy_name = STRATEGY_NAME
    forwards_in_step = True  # every forward gathers the layers from all processes: none may skip one

    def __init__(self, **kwargs) -> None:
        # checkpoints hold the adapters only: one file written by rank 0, through the run's CheckpointIO
        super().__init__(save_distributed_checkpoint=False, **kwargs)

    def setup_environment(self) -> None:
        # one mesh dimension over all processes: the base is sharded across nodes too (no tensor parallelism); the
        # sizes are only known now, and ModelParallelStrategy reads them here
        world = self.num_nodes * self.num_processes
        self._data_parallel_size = world  # private API, checked on lightning 2.6: see above
        self._tensor_parallel_size = 1  # private API, checked on lightning 2.6: see above
        super().setup_environment()

    def setup(self, trainer) -> None:
        policy = getattr(self.lightning_module, "policy", None)
        if policy is None:
            raise ConfigError(f"--trainer.strategy {STRATEGY_NAME}: the model builds no policy to shard")
        shard_base(policy, self.device_mesh["data_parallel"])
        resident, total = base_bytes(policy)
        log.info("rank %d: base weights %s of %s resident (sharded over %d)", self.global_rank, mib(resident),
                 mib(total), self.world_size)  # fmt: skip
        super().setup(trainer)

    def backward(self, closure_loss: torch.Tensor, optimizer, *args, **kwargs) -> torch.Tensor:
        loss = super().backward(closure_loss, optimizer, *args, **kwargs)
        average_gradients(self.lightning_module.parameters(), self.world_size)
        return loss

    def process_dataloader(self, dataloader):
        """Validation in equal numbers of batches per process: every forward gathers the layers from all of them."""
        sampler = getattr(dataloader, "sampler", None)
        if not isinstance(sampler, ShardSampler) or getattr(dataloader, "batch_size", None) is None:
            return dataloader
        batches = EvenBatches(len(sampler.dataset), dataloader.batch_size, num_replicas=self.world_size,
                              rank=self.global_rank)  # fmt: skip
        return type(dataloader)(dataloader.dataset, batch_sampler=batches, collate_fn=dataloader.collate_fn,
                                num_workers=dataloader.num_workers, pin_memory=dataloader.pin_memory)  # fmt: skip

    # ---- checkpoints: the adapters and their optimizer are plain, replicated tensors ------------------------------

    @property
    def lightning_restore_optimizer(self) -> bool:
        return True

    def lightning_module_state_dict(self) -> dict:
        # the base's shards are left out (PreferenceModule keeps the adapters alone anyway): nothing is gathered
        state = self.lightning_module.state_dict()
        return {name: value for name, value in state.items() if not isinstance(value, DTensor)}

    def optimizer_state(self, optimizer) -> dict:
        return Strategy.optimizer_state(self, optimizer)

    def save_checkpoint(self, checkpoint: dict, filepath: str | Path, storage_options=None) -> None:
        Strategy.save_checkpoint(self, checkpoint, filepath, storage_options)

    def load_checkpoint(self, checkpoint_path: str | Path, weights_only: bool | None = None) -> dict:
        return Strategy.load_checkpoint(self, checkpoint_path, weights_only)

    def load_model_state_dict(self, checkpoint, strict: bool = True) -> None:
        Strategy.load_model_state_dict(self, checkpoint, strict)

    def load_optimizer_state_dict(self, checkpoint) -> None:
        Strategy.load_optimizer_state_dict(self, checkpoint)


def shard_base(policy: nn.Module, mesh) -> None:
    """`fully_shard` every decoder layer, the rest of the decoder and the LM head of `policy` (a PeftModel); the
    trainable parameters (LoRA) stay whole. The decoder and the head are units of their own because the lean and
    packed log-prob paths call the decoder without the head (`alignment.model.packing`)."""
    from torch.distributed.fsdp import fully_shard

    model = policy.get_base_model()
    layers = decoder_layers(model)
    decoder, head = model.get_decoder(), model.get_output_embeddings()
    tied = head is not None and head.weight is model.get_input_embeddings().weight
    if tied:
        raise ConfigError(
            f"--trainer.strategy {STRATEGY_NAME}: {type(model).__name__} shares its input embeddings with its LM head "
            "(tie_word_embeddings), which fsdp_qlora cannot shard yet; use --trainer.strategy ddp"
        )
    trainable = {p for p in policy.parameters() if p.requires_grad}
    units = [*layers, decoder] + ([head] if head is not None else [])
    for unit in units:
        fully_shard(unit, mesh=mesh, ignored_params={p for p in unit.parameters() if p in trainable})


def decoder_layers(model: nn.Module) -> list[nn.Module]:
    """The model's repeated blocks: the modules whose classes it lists in `_no_split_modules` (what transformers and
    accelerate keep whole on one device); a ConfigError when it lists none or none is found."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    layers = [m for m in model.modules() if type(m).__name__ in names]
    if not layers:
        raise ConfigError(
            f"--trainer.strategy {STRATEGY_NAME}: cannot find the layers of {type(model).__name__} to shard (its "
            f"_no_split_modules is {sorted(names) or 'empty'}); use --trainer.strategy ddp for this base"
        )
    return layers


def average_gradients(parameters, world_size: int) -> None:
    """All-reduce the gradients of the replicated (non-DTensor) trainable parameters to their mean, in one message."""
    grads = [p.grad for p in parameters if p.requires_grad and p.grad is not None and not isinstance(p, DTensor)]
    if world_size == 1 or not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    torch.distributed.all_reduce(flat)
    flat /= world_size
    for grad, part in zip(grads, flat.split([g.numel() for g in grads]), strict=True):
        grad.copy_(part.view_as(grad))


def base_bytes(policy: nn.Module) -> tuple[int, int]:
    """(bytes resident on this rank, bytes of the whole base): every frozen parameter (a DTensor's local shard) and
    each 4-bit layer's quantization state, which is whole on every rank."""
    resident = total = 0
    for param in policy.parameters():
        if param.requires_grad:
            continue
        local = param.to_local() if isinstance(param, DTensor) else param
        resident += local.numel() * local.element_size()
        total += param.numel() * param.element_size()
    for state in _quant_states(policy):
        size = sum(t.numel() * t.element_size() for t in _state_tensors(state))
        resident, total = resident + size, total + size
    return resident, total


def _quant_states(policy: nn.Module) -> Iterator:
    """Each 4-bit layer's QuantState once (PEFT's LoRA wrapper reaches its base layer's weight too)."""
    seen = set()
    for module in policy.modules():
        state = getattr(module, "quant_state", None) or getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None and hasattr(state, "absmax") and id(state) not in seen:
            seen.add(id(state))
            yield state


def _state_tensors(state) -> Iterator[torch.Tensor]:
    """absmax, codebook, offset of a bitsandbytes QuantState, and those of its nested state (double quantization)."""
    for name in ("absmax", "code", "offset"):
        value = getattr(state, name, None)
        if isinstance(value, torch.Tensor):
            yield value
    nested = getattr(state, "state2", None)
    if nested is not None:
        yield from _state_tensors(nested)


def mib(size: int) -> str:
    """`3.1 MiB`, `2890.4 MiB`; three significant digits under 10 MiB (a tiny model's 0.171 MiB)."""
    value = size / 2**20
    return f"{value:.1f} MiB" if value >= 10 else f"{value:.3g} MiB"


class EvenBatches(Sampler[list[int]]):
    """Batches of positions 0..n-1 for one of `num_replicas` processes, each item once, every process the same
    number of batches (sizes differ by at most one): what `ShardSampler` gives DDP, but in step, since under FSDP a
    process with one batch fewer would leave the others waiting in the layers' all-gather."""

    def __init__(self, n: int, batch_size: int, *, num_replicas: int, rank: int):
        rounds = max(1, min(-(-n // (batch_size * num_replicas)), n // num_replicas))
        parts = torch.arange(n).tensor_split(rounds * num_replicas)
        self.batches = [part.tolist() for part in parts[rank::num_replicas]]

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches)


def check_strategy(trainer, load_in_4bit: bool) -> None:
    """One-line refusals of a strategy that cannot work, before anything loads: `trainer` is the parsed
    `--trainer.*` namespace."""
    strategy, accelerator = trainer.get("strategy"), str(trainer.get("accelerator") or "auto")
    name = strategy if isinstance(strategy, str) else type(strategy).__name__
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if name in ("fsdp", "FSDPStrategy") or (name.startswith("fsdp_") and name != STRATEGY_NAME):
        why = "Lightning's fsdp needs a GPU" if on_cpu else "Lightning's fsdp cannot shard a bitsandbytes 4-bit base"
        if on_cpu or load_in_4bit:
            raise ConfigError(f"--trainer.strategy {name}: {why}; use --trainer.strategy {STRATEGY_NAME}")
        return
    if name != STRATEGY_NAME:
        return
    devices, nodes = trainer.get("devices"), trainer.get("num_nodes") or 1
    count = _device_count(devices, on_cpu)
    if count is not None and count * nodes < 2:
        raise ConfigError(
            f"--trainer.strategy {STRATEGY_NAME} shards the base across processes and this run has one "
            f"(--trainer.devices {devices}, --trainer.num_nodes {nodes}): give --trainer.devices 2 or more"
        )
    precision = str(trainer.get("precision") or "32-true")
    if precision not in PRECISIONS:
        raise ConfigError(
            f"--trainer.precision {precision} with --trainer.strategy {STRATEGY_NAME}: the 4-bit base and fp32 "
            f"adapters need one of {', '.join(p for p in PRECISIONS if p != '32')}"
        )


def _device_count(devices, on_cpu: bool) -> int | None:
    if isinstance(devices, (list, tuple)):
        return len(devices)
    if isinstance(devices, str) and devices.lstrip("-").isdigit():
        devices = int(devices)
    if devices == "auto" or devices == -1:
        return 1 if on_cpu else torch.cuda.device_count()
    return devices if isinstance(devices, int) else None


StrategyRegistry.register(
    STRATEGY_NAME, FSDPQLoRAStrategy, description="FSDP2 over a 4-bit base, LoRA adapters replicated", override=True
)
