"""One typed configuration tree, loaded from YAML with `section.key=value` overrides.

Every field is validated (types are strict: `"3"` is not an int, `2.0` is not an int) and every
cross-field rule is checked here, so that a bad value fails in milliseconds on the login node,
not minutes later after process groups and DeepSpeed engines have started.

A YAML file may name `base:` files (a path or a list, relative to the file) that are merged
underneath it; presets in `configs/` use this to share a model shape between runs.
"""

import dataclasses
import difflib
import re
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    ConfigDict,
    Field,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    TypeAdapter,
    ValidationError,
)
from pydantic.dataclasses import dataclass

_STRICT = ConfigDict(extra="forbid")
PositiveInt = Annotated[StrictInt, Field(gt=0)]
NonNegInt = Annotated[StrictInt, Field(ge=0)]
PositiveFloat = Annotated[StrictFloat, Field(gt=0, allow_inf_nan=False)]
NonNegFloat = Annotated[StrictFloat, Field(ge=0, allow_inf_nan=False)]
Fraction = Annotated[StrictFloat, Field(ge=0, le=1)]
Beta = Annotated[StrictFloat, Field(ge=0, lt=1)]


class _YamlLoader(yaml.SafeLoader):
    """YAML 1.1 reads `1e-4` as a string (it wants `1.0e-4`); here it is the float people mean."""


_YamlLoader.yaml_implicit_resolvers = {k: list(v) for k, v in yaml.SafeLoader.yaml_implicit_resolvers.items()}
_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
    list("-+0123456789"),
)


def _yaml(text: str):
    return yaml.load(text, Loader=_YamlLoader)


class ConfigError(ValueError):
    """A configuration problem, phrased for the person who wrote the config."""


def _field(default_factory):
    return dataclasses.field(default_factory=default_factory)


@dataclass(config=_STRICT)
class DataSource:
    """One sharded dataset (a folder, or a URL template with `{shard}`) and its mixing weight."""

    path: StrictStr
    weight: PositiveFloat = 1.0


@dataclass(config=_STRICT)
class DataConfig:
    sources: list[DataSource] = _field(list)
    seq_len: PositiveInt = 256
    seed: NonNegInt = 1234
    num_workers: NonNegInt = 1
    # Shuffle buffer: the samples of this many shards are permuted together.
    shuffle_shards: PositiveInt = 4
    on_error: Literal["raise", "skip"] = "raise"
    verify_sha256: StrictBool = True


@dataclass(config=_STRICT)
class RopeScaling:
    """Rotary frequencies stretched to a context longer than the model was trained on (the
    names and formulas of Hugging Face's `rope_parameters`, so exports carry them unchanged)."""

    # none; linear (position interpolation); llama3 (Llama 3.1: long wavelengths stretched by
    # `factor`, short ones kept, a smooth ramp between); yarn (NTK-by-parts ramp between
    # beta_fast and beta_slow rotations, attention scaled by 0.1 ln(factor) + 1).
    type: Literal["none", "linear", "llama3", "yarn"] = "none"
    factor: PositiveFloat = 1.0
    # the context the model was trained on before scaling (llama3, yarn); 0 = not set
    original_max_seq_len: NonNegInt = 0
    low_freq_factor: PositiveFloat = 1.0  # llama3
    high_freq_factor: PositiveFloat = 4.0  # llama3
    beta_fast: PositiveFloat = 32.0  # yarn
    beta_slow: PositiveFloat = 1.0  # yarn


@dataclass(config=_STRICT)
class MoEConfig:
    """Mixture-of-experts feed-forward (Mixtral routing: softmax over the experts, the top_k
    taken, their weights renormalised to sum to one), dist_llm/model/moe.py."""

    num_experts: NonNegInt = 0  # 0 = a dense model
    top_k: PositiveInt = 2
    # Each expert takes at most capacity_factor * tokens * top_k / num_experts routes of a
    # micro-batch in training (the rest pass through the residual only); null = dropless.
    capacity_factor: PositiveFloat | None = None
    # The experts' hidden size; 0 = model.ffn_hidden.
    expert_hidden: NonNegInt = 0
    # Qwen2-MoE's shared expert: one SwiGLU MLP of this hidden size that every token passes
    # through, scaled by a sigmoid gate; 0 = none.
    shared_expert_hidden: NonNegInt = 0
    # MoE in layers i with (i + 1) % every == 0 (Qwen2-MoE's decoder_sparse_step); 1 = all.
    every: PositiveInt = 1
    # Renormalise the top_k weights to sum to one (Mixtral: true; Qwen2-MoE's norm_topk_prob).
    normalize_top_k: StrictBool = True
    # Load-balancing loss (Switch Transformer; Mixtral's router_aux_loss_coef) and router
    # z-loss (ST-MoE) coefficients; both added to the training loss, averaged over MoE layers.
    aux_loss_coef: NonNegFloat = 0.01
    z_loss_coef: NonNegFloat = 0.0

    def is_moe_layer(self, layer: int) -> bool:
        return self.num_experts > 0 and (layer + 1) % self.every == 0


@dataclass(config=_STRICT)
class ModelConfig:
    vocab_size: PositiveInt = 32000
    dim: PositiveInt = 512
    n_layers: PositiveInt = 8
    n_heads: PositiveInt = 8
    n_kv_heads: PositiveInt = 8
    ffn_hidden: PositiveInt = 1408
    # 0 = dim // n_heads; set explicitly when heads were pruned (n_heads * head_dim != dim).
    head_dim: NonNegInt = 0
    max_seq_len: PositiveInt = 2048
    rope_theta: PositiveFloat = 10000.0
    rope_scaling: RopeScaling = _field(RopeScaling)
    moe: MoEConfig = _field(MoEConfig)
    norm_eps: PositiveFloat = 1e-5
    tie_embeddings: StrictBool = False
    init_std: PositiveFloat = 0.02
    # What a token attends to in a packed row: "document" = the earlier tokens of its own
    # document only (rows pack unrelated documents; see model/attention.py), "causal" = all
    # earlier tokens. Rows without document ids (generation, raw text) are causal either way.
    attention: Literal["causal", "document"] = "document"
    # Rotary positions restart at 0 at each document (Megatron's --reset-position-ids).
    reset_positions: StrictBool = False
    # auto = flex_attention (compiled, skips cross-document blocks) on CUDA, SDPA with a dense
    # mask elsewhere (flex has no CPU backward in torch 2.13). How, not what: never in a checkpoint check.
    attention_kernel: Literal["auto", "sdpa", "flex"] = "auto"

    @property
    def head_size(self) -> int:
        return self.head_dim or self.dim // self.n_heads

    @property
    def expert_hidden(self) -> int:
        return self.moe.expert_hidden or self.ffn_hidden


@dataclass(config=_STRICT)
class ParallelConfig:
    tensor: PositiveInt = 1
    pipeline: PositiveInt = 1
    # Split the norm regions along the sequence across the tensor-parallel group (Megatron's SP).
    sequence_parallel: StrictBool = False
    # Context parallelism: each training sequence split over this many ranks, attention through
    # Ulysses' all-to-all (heads for positions), parallel/context.py.
    context: PositiveInt = 1
    # Expert parallelism: each MoE layer's experts split over this many ranks (carved out of
    # the data-parallel ones), tokens exchanged by all-to-all, parallel/expert.py.
    expert: PositiveInt = 1
    zero_stage: Annotated[StrictInt, Field(ge=0, le=3)] = 1
    offload_optimizer: StrictBool = False


@dataclass(config=_STRICT)
class OptimConfig:
    lr: PositiveFloat = 3e-4
    min_lr: NonNegFloat = 3e-5
    weight_decay: NonNegFloat = 0.1
    beta1: Beta = 0.9
    beta2: Beta = 0.95
    eps: PositiveFloat = 1e-8
    grad_clip: NonNegFloat = 1.0
    warmup_steps: NonNegInt = 100
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    decay_fraction: Fraction = 0.2  # wsd: share of steps spent decaying
    # AdamW's kernel: "auto" = fused where torch has it for the device (CUDA, CPU), else foreach.
    # Each is deterministic on the same hardware, so resume stays bit-exact with any of them.
    implementation: Literal["auto", "fused", "foreach", "for-loop"] = "auto"


@dataclass(config=_STRICT)
class TrainConfig:
    steps: PositiveInt = 1000
    micro_batch_size: PositiveInt = 8
    grad_accum: PositiveInt = 1
    # auto: bf16 where the hardware has bf16 matrix units, fp32 elsewhere (dist_llm/precision.py).
    dtype: Literal["auto", "fp32", "bf16", "fp16"] = "auto"
    seed: StrictInt = 0
    activation_checkpointing: StrictBool = False
    compile: StrictBool = False
    out_dir: StrictStr = "runs/default"
    # A collective that waits longer than this fails the run (a dead or hung rank), see docs/launching.md.
    collective_timeout_s: PositiveInt = 1800
    # Wall-clock budget: at the first step boundary past it the run saves, reports and exits 0
    # (continue later with a larger budget). 0 = no budget.
    max_minutes: NonNegFloat = 0.0
    # Under SLURM the job's end time is a second deadline: this many minutes before it the run
    # saves and requeues, as on SLURM's own time-limit warning. 0 = no such deadline.
    slurm_margin_minutes: NonNegFloat = 5.0


@dataclass(config=_STRICT)
class CheckpointConfig:
    every: NonNegInt = 500
    keep: PositiveInt = 3
    resume: StrictStr = "auto"  # "auto", "never", or a checkpoint folder
    init_from: StrictStr = ""
    # On resume: "exact" continues the data stream where it stopped (same data-parallel size);
    # "restart" starts it afresh (to change the data-parallel size; samples repeat).
    data_state: Literal["exact", "restart"] = "exact"
    # Copy the state to host memory, go on training, and write it in a background thread.
    async_save: StrictBool = False


@dataclass(config=_STRICT)
class LoggingConfig:
    every: PositiveInt = 10
    val_every: NonNegInt = 200
    val_batches: NonNegInt = 20
    tensorboard: StrictBool = True
    # For MFU: peak FLOP/s of one device in TFLOP/s; 0 = a known GPU's data sheet, or measured on CPU.
    peak_tflops: NonNegFloat = 0.0


@dataclass(config=_STRICT)
class DistillConfig:
    teacher: StrictStr = ""  # checkpoint of the frozen teacher
    alpha: Fraction = 0.5  # weight of the soft (KL) term; 1 - alpha goes to cross-entropy
    temperature: PositiveFloat = 2.0


# The block linears LoRA can adapt, by the short names of Hugging Face's Llama modules.
LORA_TARGETS = ("q", "k", "v", "o", "gate", "up", "down")


@dataclass(config=_STRICT)
class LoraConfig:
    """LoRA adapters (through peft) on the block linears: only they are trained (train/lora.py)."""

    rank: NonNegInt = 0  # 0 = no adapters (full fine-tuning)
    alpha: PositiveFloat = 16.0  # the update is scaled by alpha / rank
    dropout: Fraction = 0.0
    target: list[Literal["q", "k", "v", "o", "gate", "up", "down"]] = _field(lambda: list(LORA_TARGETS))


@dataclass(config=_STRICT)
class DPOConfig:
    """`dist-llm dpo`: direct preference optimization on {prompt, chosen, rejected} pairs."""

    data: StrictStr = ""  # JSONL of pairs (train/dpo.py)
    beta: PositiveFloat = 0.1
    # Conservative DPO: the chance that a pair's preference label is flipped (0 = plain DPO).
    label_smoothing: Annotated[StrictFloat, Field(ge=0, lt=0.5)] = 0.0
    # sigmoid = DPO; ipo = IPO (Azar et al. 2023): (h - 1 / (2 beta))^2, a margin it does not overshoot
    loss: Literal["sigmoid", "ipo"] = "sigmoid"
    # The frozen reference: "" = checkpoint.init_from (the initial policy); with LoRA the base
    # model with its adapters disabled, which needs no second copy.
    reference: StrictStr = ""


@dataclass(config=_STRICT)
class Config:
    data: DataConfig = _field(DataConfig)
    model: ModelConfig = _field(ModelConfig)
    parallel: ParallelConfig = _field(ParallelConfig)
    optim: OptimConfig = _field(OptimConfig)
    train: TrainConfig = _field(TrainConfig)
    checkpoint: CheckpointConfig = _field(CheckpointConfig)
    logging: LoggingConfig = _field(LoggingConfig)
    distill: DistillConfig = _field(DistillConfig)
    lora: LoraConfig = _field(LoraConfig)
    dpo: DPOConfig = _field(DPOConfig)


_ADAPTER = TypeAdapter(Config)
_CLI = "command line"


# ---------------------------------------------------------------- loading


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read `path` (and its bases), apply `section.key=value` overrides, validate everything."""
    raw: dict = {}
    origins: dict[str, str] = {}
    if path is not None:
        raw = _read_yaml_tree(Path(path), origins, seen=())
    for item in overrides:
        key, value = _parse_override(item)
        _set_dotted(raw, key, value)
        origins[key] = _CLI
    try:
        config = _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, origins)) from None
    problems = check(config)
    if problems:
        lines = [f"  {key}: {msg} [{_origin(key, origins)}]" for key, msg in problems]
        raise ConfigError("invalid configuration:\n" + "\n".join(lines))
    return config


def config_to_dict(config: Config) -> dict:
    return dataclasses.asdict(config)


def config_from_dict(raw: dict) -> Config:
    """Rebuild a config saved with `config_to_dict` (e.g. from a checkpoint)."""
    try:
        return _ADAPTER.validate_python(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(exc, {})) from None


def dump_yaml(config: Config) -> str:
    return yaml.safe_dump(config_to_dict(config), sort_keys=False)


def _read_yaml_tree(path: Path, origins: dict[str, str], seen: tuple[Path, ...]) -> dict:
    path = path.resolve()
    if path in seen:
        raise ConfigError(f"{path}: 'base' chain loops back to itself ({' -> '.join(map(str, seen))})")
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    try:
        data = _yaml(path.read_text(encoding="utf-8")) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: top level must be a mapping of sections, got {type(data).__name__}")
    bases = data.pop("base", [])
    if not (isinstance(bases, str) or (isinstance(bases, list) and all(isinstance(b, str) for b in bases))):
        raise ConfigError(f"{path}: 'base' must be a file name or a list of file names, got {bases!r}")
    merged: dict = {}
    for base in [bases] if isinstance(bases, str) else bases:
        merged = _deep_merge(merged, _read_yaml_tree(path.parent / base, origins, (*seen, path)))
    for key in _leaf_keys(data):
        parts = key.split(".")
        for i in range(1, len(parts) + 1):  # sections too, so errors about a section find the file
            origins[".".join(parts[:i])] = str(path)
    return _deep_merge(merged, data)


def _deep_merge(low: dict, high: dict) -> dict:
    out = dict(low)
    for key, value in high.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _deep_merge(out[key], value)
        else:
            out[key] = value
    return out


def _leaf_keys(tree: Any, prefix: str = "") -> list[str]:
    if isinstance(tree, dict):
        return [k for key, value in tree.items() for k in _leaf_keys(value, f"{prefix}{key}.")] or [
            prefix[:-1]
        ]
    if isinstance(tree, list):
        return [k for i, value in enumerate(tree) for k in _leaf_keys(value, f"{prefix}{i}.")] or [
            prefix[:-1]
        ]
    return [prefix[:-1]]


def _parse_override(item: str) -> tuple[str, Any]:
    key, sep, text = item.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override '{item}' must look like section.key=value (e.g. train.steps=100)")
    try:
        value = _yaml(text) if text else ""
    except yaml.YAMLError as exc:
        raise ConfigError(f"override '{item}': value is not valid YAML: {exc}") from None
    return key, value


def _set_dotted(tree: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node: Any = tree
    for i, part in enumerate(parts[:-1]):
        nxt = _child(node, part, key)
        if nxt is None:
            if parts[i + 1].isdigit():
                raise ConfigError(
                    f"override {key}: '{'.'.join(parts[: i + 1])}' is not set, so it has no item {parts[i + 1]}"
                )
            nxt = {}
            _assign(node, part, nxt, key)
        elif not isinstance(nxt, (dict, list)):
            raise ConfigError(f"override {key}: '{'.'.join(parts[: i + 1])}' is a value, not a section")
        node = nxt
    _assign(node, parts[-1], value, key)


def _child(node: Any, part: str, key: str) -> Any:
    if isinstance(node, list):
        return node[_list_index(node, part, key)]
    return node.get(part)


def _assign(node: Any, part: str, value: Any, key: str) -> None:
    if isinstance(node, list):
        node[_list_index(node, part, key)] = value
    else:
        node[part] = value


def _list_index(node: list, part: str, key: str) -> int:
    if not part.isdigit() or int(part) >= len(node):
        raise ConfigError(f"override {key}: '{part}' is not an index of a list with {len(node)} items")
    return int(part)


# ---------------------------------------------------------------- errors


def _origin(key: str, origins: dict[str, str]) -> str:
    while key:
        if key in origins:
            return origins[key]
        key = key.rpartition(".")[0]
    return "default"


def _describe(exc: ValidationError, origins: dict[str, str]) -> str:
    lines = []
    for err in exc.errors():
        key = ".".join(str(p) for p in err["loc"])
        where = _origin(key, origins)
        if err["type"] == "unexpected_keyword_argument":
            lines.append(f"  {key}: unknown key{_suggest(err['loc'])} [{where}]")
        else:
            lines.append(f"  {key}: {err['msg']} (got {err.get('input')!r}) [{where}]")
    return "invalid configuration:\n" + "\n".join(lines)


def _suggest(loc: tuple) -> str:
    """Name the valid keys of the section the unknown key was found in."""
    cls: Any = Config
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        fields = {f.name: f for f in dataclasses.fields(cls)}
        if part not in fields:
            return ""
        cls = fields[part].type
        if typing.get_origin(cls) is list:
            cls = typing.get_args(cls)[0]
        if not dataclasses.is_dataclass(cls):
            return ""
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(str(loc[-1]), names, n=1)
    hint = f"; did you mean '{close[0]}'?" if close else ""
    return f"{hint} (valid: {', '.join(names)})"


# ---------------------------------------------------------------- cross-field rules


def _rope_problems(r: RopeScaling) -> list[tuple[str, str]]:
    key = "model.rope_scaling"
    if r.type in ("llama3", "yarn") and not r.original_max_seq_len:
        return [(f"{key}.original_max_seq_len", f"{r.type} needs the context the model was trained on")]
    if r.type == "llama3" and r.high_freq_factor <= r.low_freq_factor:
        return [
            (
                f"{key}.high_freq_factor",
                f"{r.high_freq_factor} must exceed low_freq_factor={r.low_freq_factor}",
            )
        ]
    if r.type != "none" and r.factor < 1:
        return [(f"{key}.factor", f"{r.factor} shrinks the context; scaling takes a factor >= 1")]
    return []


def check(config: Config) -> list[tuple[str, str]]:
    """Rules that involve more than one field. Returns (key, message) pairs; empty when valid."""
    m, p, o, t = config.model, config.parallel, config.optim, config.train
    problems = []
    if not m.head_dim and m.dim % m.n_heads:
        problems.append(("model.dim", f"{m.dim} is not divisible by model.n_heads={m.n_heads}"))
    elif m.head_size % 2:
        problems.append(("model.head_dim", f"head size {m.head_size} must be even for rotary embeddings"))
    if m.n_heads % m.n_kv_heads:
        problems.append(("model.n_kv_heads", f"{m.n_kv_heads} must divide model.n_heads={m.n_heads}"))
    if config.data.seq_len > m.max_seq_len:
        problems.append(("data.seq_len", f"{config.data.seq_len} exceeds model.max_seq_len={m.max_seq_len}"))
    problems += _rope_problems(m.rope_scaling)
    problems += _moe_problems(config)
    if m.n_heads % p.tensor or m.n_kv_heads % p.tensor:
        problems.append(
            (
                "parallel.tensor",
                f"{p.tensor} must divide model.n_heads={m.n_heads} and model.n_kv_heads={m.n_kv_heads} "
                "(each rank holds whole heads)",
            )
        )
    if p.sequence_parallel and config.data.seq_len % p.tensor:
        problems.append(
            (
                "parallel.sequence_parallel",
                f"data.seq_len={config.data.seq_len} must divide by parallel.tensor={p.tensor}",
            )
        )
    problems += _context_problems(config)
    if p.pipeline > m.n_layers:
        problems.append(("parallel.pipeline", f"{p.pipeline} stages but only model.n_layers={m.n_layers}"))
    if p.pipeline > 1 and p.zero_stage != 1:
        problems.append(
            (
                "parallel.zero_stage",
                f"{p.zero_stage} with parallel.pipeline={p.pipeline}: set 1. DeepSpeed refuses ZeRO-2/3 with "
                "pipelines, and with ZeRO-0 its pipeline computes a wrong gradient-clipping norm",
            )
        )
    if t.dtype in ("bf16", "fp16") and p.zero_stage == 0:
        problems.append(
            (
                "parallel.zero_stage",
                f"{t.dtype} with ZeRO-0 runs DeepSpeed's unfused fp16-style optimizer and trains badly; "
                "use parallel.zero_stage=1 (or train.dtype=fp32)",
            )
        )
    if p.offload_optimizer and p.zero_stage == 0:
        problems.append(
            ("parallel.offload_optimizer", "needs parallel.zero_stage >= 1 (ZeRO owns the offload)")
        )
    if o.min_lr > o.lr:
        problems.append(("optim.min_lr", f"{o.min_lr} is larger than optim.lr={o.lr}"))
    if o.warmup_steps >= t.steps:
        problems.append(("optim.warmup_steps", f"{o.warmup_steps} is not below train.steps={t.steps}"))
    if config.lora.rank and p.tensor * p.pipeline > 1:
        problems.append(
            (
                "parallel.tensor",
                f"lora.rank={config.lora.rank} with parallel.tensor={p.tensor}, parallel.pipeline={p.pipeline}: "
                "peft adapts nn.Linear layers, which tensor-parallel and pipeline layouts replace; set both "
                "to 1 (ZeRO 1-3 shard a LoRA run instead)",
            )
        )
    if config.lora.rank and p.context > 1:
        problems.append(
            (
                "parallel.context",
                f"{p.context} with lora.rank={config.lora.rank}: LoRA under context parallelism is not "
                "tested yet; set parallel.context=1 (ZeRO 1-3 shard a LoRA run)",
            )
        )
    ffn_targets = sorted({"gate", "up", "down"} & set(config.lora.target))
    if config.lora.rank and config.model.moe.num_experts and ffn_targets:
        problems.append(
            (
                "lora.target",
                f"{ffn_targets} on a mixture-of-experts model: its experts are stacked weights, not the "
                "nn.Linear layers peft adapts; target the attention linears only (q, k, v, o)",
            )
        )
    if config.dpo.loss == "ipo" and config.dpo.label_smoothing:
        problems.append(("dpo.label_smoothing", "is for dpo.loss=sigmoid; IPO has none: set it to 0"))
    if config.lora.rank and not config.lora.target:
        problems.append(("lora.target", "is empty: name at least one of " + ", ".join(LORA_TARGETS)))
    if config.checkpoint.resume not in ("auto", "never") and not config.checkpoint.resume:
        problems.append(("checkpoint.resume", "must be 'auto', 'never' or a checkpoint folder"))
    return problems


def context_splits_heads(heads: int, kv_heads: int, cp: int) -> bool:
    """Whether Ulysses can give each of `cp` ranks whole heads: cp divides the query heads, and
    the key/value heads divide over the ranks or (fewer of them than ranks) each is copied to
    cp / kv_heads ranks, as its queries are spread over as many (parallel/context.py)."""
    return heads % cp == 0 and (kv_heads % cp == 0 or cp % kv_heads == 0)


def _context_problems(config: Config) -> list[tuple[str, str]]:
    """Ulysses splits each rank's heads over the context group after its all-to-all, and the
    sequence before it: both must divide evenly."""
    m, p, cp = config.model, config.parallel, config.parallel.context
    if cp == 1:
        return []
    problems = []
    heads, kv_heads = m.n_heads // p.tensor, m.n_kv_heads // p.tensor
    if not context_splits_heads(heads, kv_heads, cp):
        per_rank = f" per tensor-parallel rank (parallel.tensor={p.tensor})" if p.tensor > 1 else ""
        problems.append(
            (
                "parallel.context",
                f"{cp} must divide the {heads} query heads{per_rank}, and divide or be a multiple of its "
                f"{kv_heads} key/value heads: Ulysses gives each context rank whole heads (key/value heads "
                "are copied when there are fewer than context ranks)",
            )
        )
    if config.data.seq_len % cp:
        problems.append(
            (
                "parallel.context",
                f"{cp} must divide data.seq_len={config.data.seq_len} (each rank gets a chunk)",
            )
        )
    if p.pipeline > 1:
        problems.append(
            (
                "parallel.context",
                f"{cp} with parallel.pipeline={p.pipeline}: context parallelism does not combine with pipelines "
                "yet (DeepSpeed's pipeline builds its own process grid); use parallel.pipeline=1",
            )
        )
    if p.sequence_parallel:
        problems.append(
            (
                "parallel.context",
                f"{cp} with parallel.sequence_parallel=true is not supported yet; turn one of them off",
            )
        )
    return problems


def _moe_problems(config: Config) -> list[tuple[str, str]]:
    m, p, moe, ep = config.model, config.parallel, config.model.moe, config.parallel.expert
    key = "model.moe"
    if not moe.num_experts:
        if ep > 1:
            return [("parallel.expert", f"{ep} needs a mixture-of-experts model: set model.moe.num_experts")]
        return []
    problems = []
    if moe.top_k > moe.num_experts:
        problems.append((f"{key}.top_k", f"{moe.top_k} exceeds model.moe.num_experts={moe.num_experts}"))
    if moe.every > m.n_layers:
        problems.append(
            (f"{key}.every", f"{moe.every} leaves no MoE layer in model.n_layers={m.n_layers}; use 1 for all")
        )
    if moe.num_experts % ep:
        problems.append(
            (
                "parallel.expert",
                f"{ep} must divide model.moe.num_experts={moe.num_experts} (whole experts per rank)",
            )
        )
    for other, size in (("tensor", p.tensor), ("pipeline", p.pipeline), ("context", p.context)):
        if size > 1:
            problems.append(
                (
                    f"parallel.{other}",
                    f"{size} with a mixture-of-experts model (model.moe.num_experts={moe.num_experts}) is not "
                    f"supported yet; use parallel.{other}=1 with data and expert parallelism (parallel.expert)",
                )
            )
    if p.zero_stage == 3:
        # Measured at dp2 without expert parallelism: the weights drift 4e-5 from one process
        # in 10 fp32 steps (ZeRO 1-2: within 1e-5); not supported until that is understood.
        problems.append(
            (
                "parallel.zero_stage",
                f"3 with a mixture-of-experts model (model.moe.num_experts={moe.num_experts}) is not "
                "supported yet; set 1 or 2",
            )
        )
    return problems
