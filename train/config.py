"""TrainConfig: the model and memory configs plus optim / data / schedule / recipe / deepspeed sections.

A YAML file (configs/train/<name>.yaml) with CLI overrides ``--set section.key=value``. The run
directory fixes what the data decides: vocab_size (its tokenizer), k and depth (its tree);
``resolve`` fills them in, so a config file is valid for any run.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, field

from index.config import ConfigError, apply_overrides, build, find_yaml, read_yaml, section
from index.routing import RoutingConfig
from train.data import nonempty_l1
from train.memory import MemoryConfig
from train.model import ModelConfig, load_model_config

CONFIG_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "train")
RECIPES = ("cotrain", "memory_only", "anchor_only")


@dataclass
class OptimGroup:
    """AdamW hyper-parameters and LR schedule of one parameter group (anchor or memory)."""

    lr: float
    weight_decay: float
    warmup_steps: int = 0
    decay: str = "cosine"  # cosine | constant
    min_lr_ratio: float = 0.1


@dataclass
class OptimConfig:
    anchor: OptimGroup = field(default_factory=lambda: OptimGroup(lr=3e-3, weight_decay=0.05))
    memory: OptimGroup = field(default_factory=lambda: OptimGroup(lr=1e-4, weight_decay=1e-3))  # the paper's
    betas: tuple[float, float] = (0.9, 0.95)
    eps: float = 1e-8
    # Anchor (by DeepSpeed) and memory (train/distributed.py) are each clipped by their own global norm.
    grad_clip: float = 1.0


@dataclass
class DataConfig:
    batch_size: int = 8  # sequences per rank per step
    seed: int = 0
    shuffle_buffer: int = (
        16384  # sequences per shuffle window (train/data.py): loader memory ~ this x (seq_len+1) x 4 B
    )
    # each level-1 subtree an independent stream: its blocks a function of its sequences alone (docs/DESIGN.md)
    isolated: bool = False


@dataclass
class ScheduleConfig:
    max_steps: int = 100
    log_every: int = 10
    checkpoint_every: int = 0  # 0: only at the end
    save: bool = True  # final checkpoint and export (benchmarks turn it off)
    log_batches: bool = False  # write each rank's seq_ids per step to OUT/batches/ (audit of what was read)


@dataclass
class RecipeConfig:
    name: str = "cotrain"  # cotrain | memory_only (frozen anchor) | anchor_only (dense baseline)
    init_anchor: str | None = None  # an exported model directory whose anchor starts the run
    init_memory: str | None = None  # an exported model directory whose bank starts the run (hmem.learn)
    # the first tree level whose blocks train; shallower fetched blocks stay as they are (hmem.learn trains the
    # leaves: a level-1 block is shared by a whole subtree, whose other facts a few new documents would overwrite)
    memory_from_level: int = 1

    def __post_init__(self):
        if self.name not in RECIPES:
            raise ValueError(f"recipe.name {self.name!r}; one of {RECIPES}")

    @property
    def trains_anchor(self) -> bool:
        return self.name != "memory_only"

    @property
    def uses_memory(self) -> bool:
        return self.name != "anchor_only"


@dataclass
class DeepSpeedConfig:
    zero_stage: int = 2
    config: str | None = None  # a ds_config JSON used as is instead of the generated one
    # None: bf16 on GPU, fp32 on CPU. A frozen anchor (memory_only) runs under bf16 autocast with fp32 weights;
    # on a CPU that pays only with native bf16 (AVX512-BF16, AMX)
    bf16: bool | None = None


@dataclass
class TrainConfig:
    model: ModelConfig
    memory: MemoryConfig
    optim: OptimConfig = field(default_factory=OptimConfig)
    data: DataConfig = field(default_factory=DataConfig)
    schedule: ScheduleConfig = field(default_factory=ScheduleConfig)
    recipe: RecipeConfig = field(default_factory=RecipeConfig)
    deepspeed: DeepSpeedConfig = field(default_factory=DeepSpeedConfig)
    routing: RoutingConfig = field(default_factory=RoutingConfig)  # what a prompt fetches; exported as the default
    model_preset: str = "demo"

    def __post_init__(self):
        if self.model.hf:  # a transformers base (train/hf.py): frozen, FFN units hooked onto its MLPs
            if self.recipe.name != "memory_only" or self.recipe.init_anchor or self.memory.kind != "ffn":
                raise ValueError(
                    f"model.hf ({self.model.hf}) trains FFN memory on the frozen base: set recipe.name="
                    f"memory_only (not {self.recipe.name}), no recipe.init_anchor, memory.kind=ffn "
                    f"(not {self.memory.kind})"
                )
        elif self.recipe.name == "memory_only" and not self.recipe.init_anchor:
            raise ValueError(
                "recipe memory_only freezes the anchor: set recipe.init_anchor to an exported model "
                "directory, or model.hf to a transformers checkpoint"
            )
        if self.recipe.init_memory and not self.recipe.uses_memory:
            raise ValueError(f"recipe.init_memory {self.recipe.init_memory}: recipe {self.recipe.name} has no memory")
        if not 1 <= self.recipe.memory_from_level <= self.memory.depth:
            raise ValueError(
                f"recipe.memory_from_level {self.recipe.memory_from_level}: the tree has levels 1..{self.memory.depth}"
            )
        if self.data.isolated:
            self.check_isolated()

    def check_isolated(self) -> None:
        """data.isolated: nothing a subtree's blocks depend on may be shared with other subtrees."""
        fix = None
        if self.recipe.name != "memory_only":
            fix = f"a frozen anchor: set recipe.name=memory_only (not {self.recipe.name})"
        elif self.memory.p_generic != 0:
            fix = f"memory.p_generic=0 (not {self.memory.p_generic}): the generic blocks, shared by all, stay untrained"
        elif self.memory.store != "ram":
            fix = "memory.store=ram (the disk store's prefetcher reads one batch a step)"
        if fix:
            raise ValueError(f"data.isolated trains each level-1 subtree on its own and needs {fix}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def ds_config(self, bf16: bool) -> dict:
        """The DeepSpeed config generated from this one (anchor only: the bank is not DeepSpeed's)."""
        return {
            "train_micro_batch_size_per_gpu": self.data.batch_size,
            "gradient_accumulation_steps": 1,
            "gradient_clipping": self.optim.grad_clip,
            # elastic: ZeRO-1/2 optimizer partitions saved so that another world size can load them
            "zero_optimization": {
                "stage": self.deepspeed.zero_stage,
                **({"elastic_checkpoint": True} if self.deepspeed.zero_stage in (1, 2) else {}),
            },
            "bf16": {"enabled": bf16},
            "steps_per_print": 10**9,  # the trainer logs
        }


def check_world(cfg: TrainConfig, manifest: dict, world_size: int) -> None:
    """What the number of ranks decides, refused before the launch: data.isolated needs each level-1 subtree on
    exactly one rank (level-1 ownership, train/data.py assign_subtrees)."""
    n = len(nonempty_l1(manifest))
    if cfg.data.isolated and world_size > n:
        raise ConfigError(
            f"data.isolated: {world_size} ranks but the run has {n} non-empty level-1 subtrees, and each must be "
            f"on one rank: launch at most {n} ranks (or set data.isolated=false)"
        )


def load_config(path: str | None, overrides: list[str], manifest: dict) -> TrainConfig:
    """configs/train/demo.yaml (or ``path``) + overrides, resolved against a run's manifest."""
    path = find_yaml(path or "demo", CONFIG_DIR, "train config")
    raw = apply_overrides(read_yaml(path), overrides)
    model_raw = section(raw, "model", path)
    preset = model_raw.pop("preset", "demo")
    if model_raw.get("hf"):  # a transformers checkpoint decides the architecture
        from train.hf import model_config

        preset, model = "hf", model_config(model_raw.pop("hf"), model_raw)
        if model.vocab_size < int(manifest["vocab_size"]):
            raise ConfigError(
                f"{path}: model.hf {model.hf}: vocabulary {model.vocab_size} < the run's "
                f"{manifest['vocab_size']}; pack the run with the model's tokenizer "
                "(jobs/cluster_corpus.py --tokenizer DIR)"
            )
    else:
        model_raw["vocab_size"] = int(manifest["vocab_size"])  # the run's tokenizer decides
        model = load_model_config(preset, **model_raw)
    if model.max_seq_len < int(manifest["seq_len"]):
        raise ConfigError(
            f"{path}: model max_seq_len {model.max_seq_len} < the run's seq_len {manifest['seq_len']}; "
            f"--set model.max_seq_len={manifest['seq_len']}"
        )
    mem_raw = section(raw, "memory", path)
    mem_raw.update(k=int(manifest["k"]), depth=int(manifest["depth"]))  # the run's tree decides
    try:
        memory = build(MemoryConfig, mem_raw, path, key="memory")
    except ConfigError as e:
        example = ",".join(str(max(1, 64 >> 2 * i)) for i in range(int(manifest["depth"])))
        raise ConfigError(
            f"{e} (the run's tree has depth {manifest['depth']}: give one rank per level, "
            f"e.g. --set memory.ranks=[{example}])"
        ) from e
    return build(TrainConfig, raw, path, fixed=dict(model=model, memory=memory, model_preset=preset))
