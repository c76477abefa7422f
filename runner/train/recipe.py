"""The training recipe: ``setup -> train -> cleanup`` (torchtune style), run by ``python -m runner.train.worker``.

- setup: model folder, tokenizer, the dataset check (before any model is loaded), fingerprint / resume check,
  the model for the method (``_build_full``, ``_build_lora``, ``_build_qlora``), tokenized datasets, Trainer.
- train: eval loss and exact match before, ``trainer.train`` (from the last checkpoint on resume), eval after.
- cleanup: adapter (``adapter/``) or full model (``model/``) as safetensors plus the tokenizer, ``report.json``.

Failures are raised as :class:`RunnerError` with a ``kind`` (see ``runner/exitcodes.py``); out-of-memory errors
are tagged with the phase they happened in (load, step, eval). Only rank 0 writes files; all ranks train.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from runner.train import data as rdata
from runner.launch import distributed
from runner.train.callbacks import AdaLoraCallback, MetricsCallback, Progress, StopOnRequest, peak_memory
from runner.errors import RunnerError
from runner.models import generate_batch, load_tokenizer, log_progress, resolve_model_dir
from runner.jobs.runfiles import (DATASET_CHECK_FILE, METRICS_FILE, REPORT_FILE, DatasetSummary, Evaluation,
                                  Fingerprint, Report, Sample, read_model, write_model)
from runner.spec import RunSpec

#: Eval rows used for exact match (greedy generation is the slow part of the report on CPU).
EXACT_MATCH_MAX_ROWS = 64
#: Generated tokens beyond the longest reference answer (answers may be followed by EOS or a little text).
EXACT_MATCH_EXTRA_TOKENS = 8
#: Longest generation for exact match, tokens.
EXACT_MATCH_MAX_NEW_TOKENS = 64
#: Samples shown in report.json.
REPORT_SAMPLES = 4

OPTIMIZERS = {"adamw": "adamw_torch", "adamw-8bit": "adamw_bnb_8bit", "paged-adamw-8bit": "paged_adamw_8bit",
              "sgd": "sgd", "adafactor": "adafactor"}


@dataclass
class Run:
    """Everything the three phases share."""

    spec: RunSpec
    run_dir: Path
    resume: bool = False
    stop_flag: threading.Event = field(default_factory=threading.Event)
    progress: Progress = field(default_factory=Progress)
    is_main: bool = True
    model_dir: Path | None = None
    tokenizer: object = None
    dataset_report: rdata.DatasetReport | None = None
    fmt: str | None = None
    train_rows: list = field(default_factory=list)
    eval_rows: list = field(default_factory=list)
    train_ds: object = None  # tokenized (and packed) datasets.Dataset: the rows the Trainer really iterates
    eval_ds: object = None
    model: object = None
    trainer: object = None
    collator: object = None
    device: str = "cpu"
    precision: str = "fp32"
    notes: list[str] = field(default_factory=list)
    resume_from: str | None = None
    max_steps: int = 0
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)
    train_seconds: float = 0.0
    train_tokens: int = 0
    stopped: bool = False
    adalora: AdaLoraCallback | None = None
    stopper: StopOnRequest | None = None
    metrics: MetricsCallback | None = None


def run(spec: RunSpec, run_dir: Path, *, resume: bool = False, stop_flag: threading.Event | None = None,
        progress: Progress | None = None) -> Run:
    """Train one run end to end; returns the Run (``.stopped`` is True after a stop-and-save request)."""
    state = Run(spec=spec, run_dir=Path(run_dir), resume=resume, stop_flag=stop_flag or threading.Event(),
                progress=progress or Progress(), is_main=int(os.environ.get("RANK", "0")) == 0)
    state.run_dir.mkdir(parents=True, exist_ok=True)
    _setup(state)
    _train(state)
    _cleanup(state)
    return state


# ------------------------------------------------------------------------------------------------------ setup


def _setup(r: Run) -> None:
    import torch

    spec = r.spec
    # the same resolution as the CLI and the Launch page: catalog id -> hub id -> local hub cache, else a
    # safetensors-only download, reported as lines in log.txt (no terminal here for a tqdm bar)
    r.model_dir = resolve_model_dir(spec.model, progress=log_progress(f"download {spec.model}") if r.is_main else None)
    r.tokenizer = load_tokenizer(r.model_dir, spec.trust_remote_code)
    r.dataset_report = rdata.check_dataset(spec.dataset, r.tokenizer, spec.seq_len)
    if r.is_main:
        write_model(r.run_dir / DATASET_CHECK_FILE, dataset_summary(r, errors=True))
    rdata.raise_if_errors(r.dataset_report)
    _check_fingerprint(r)
    r.device = _device(spec)
    r.precision = _precision(spec, r.device, r.notes)
    r.train_rows, r.eval_rows, r.fmt = rdata.split_rows(spec.dataset, spec.seed)
    _tokenize(r)
    r.max_steps = _max_steps(spec, len(r.train_ds))
    torch.manual_seed(spec.seed)
    r.progress.update(phase="load", max_steps=r.max_steps)
    with _oom_as("oom_load"):
        r.model = BUILDERS[spec.method](r)
    r.trainer = _build_trainer(r)


def _device(spec: RunSpec) -> str:
    import torch

    if spec.device == "cuda" and not torch.cuda.is_available():
        raise RunnerError("device is cuda but no CUDA GPU is visible", field="device",
                          fix="set device to auto or cpu, or run on a machine with a GPU")
    if spec.device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        bind_local_gpu()
        return "cuda"
    return "cpu"


def bind_local_gpu() -> int | None:
    """Make this rank's GPU (``LOCAL_RANK``, set by torchrun / accelerate launch) the current CUDA device before
    any model is loaded, and return it (None outside a launched rank). bitsandbytes' loader places a 4-bit model
    on ``torch.cuda.current_device()`` (transformers ``Bnb4BitHfQuantizer.update_device_map``), and the Trainer's
    accelerate state, which would set it, comes after the load: without this every rank of a multi-GPU QLoRA
    run loaded its model onto GPU 0."""
    import torch

    local = os.environ.get("LOCAL_RANK")
    if local is None:
        return None
    torch.cuda.set_device(int(local))
    return int(local)


def _cpu_has_bf16() -> bool:
    """True when this CPU has native bf16 instructions (AVX512-BF16 or AMX), from /proc/cpuinfo flags."""
    try:
        flags = Path("/proc/cpuinfo").read_text()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


def _precision(spec: RunSpec, device: str, notes: list[str]) -> str:
    """The precision the run really uses: bf16/fp16 mixed precision where supported, else fp32."""
    import torch

    want = spec.precision
    if want == "fp32":
        return "fp32"
    if device == "cuda":
        if want == "bf16" and not torch.cuda.is_bf16_supported():
            notes.append("bf16 is not supported on this GPU; used fp16 mixed precision")
            return "fp16"
        return want
    if want == "fp16":
        notes.append("fp16 mixed precision is not used on CPU; trained in fp32")
        return "fp32"
    if not _cpu_has_bf16():
        notes.append("this CPU has no native bf16 (AVX512-BF16/AMX); trained in fp32")
        return "fp32"
    return "bf16"


def _tokenize(r: Run) -> None:
    """Tokenized train (packed when asked) and eval datasets, before the model is built: the step count comes
    from the rows the Trainer will iterate, not from the file's rows (packing folds many into one)."""
    spec, tok = r.spec, r.tokenizer
    r.train_ds = rdata.tokenize_rows(r.train_rows, r.fmt, tok, spec.seq_len, spec.dataset.completion_only_loss,
                                     spec.dataset.packing)
    r.eval_ds = (rdata.tokenize_rows(r.eval_rows, r.fmt, tok, spec.seq_len, spec.dataset.completion_only_loss)
                 if r.eval_rows else None)


def _max_steps(spec: RunSpec, train_examples: int) -> int:
    """Optimizer steps of the run: ``spec.max_steps``, else ``epochs`` passes over ``train_examples`` (the
    tokenized, packed dataset's rows) with the Trainer's own formula (``Trainer.set_initial_training_values``):
    batches per rank = ceil(examples / (micro_batch x world)) (accelerate's even batches per rank), updates per
    epoch = ceil(batches / gradient_accumulation_steps), at least 1; steps = ceil(epochs x updates per epoch).
    So ``state.epoch`` ends at ``epochs`` exactly."""
    if spec.max_steps:
        return spec.max_steps
    world = spec.distribution.world_size
    batches = math.ceil(train_examples / (spec.micro_batch_size * world))
    per_epoch = max(1, math.ceil(batches / spec.gradient_accumulation_steps))
    return max(1, math.ceil(per_epoch * spec.epochs))


# ---------------------------------------------------------------------------------- fingerprint and resume


def fingerprint(r: Run) -> Fingerprint:
    cfg = (r.model_dir / "config.json").read_bytes()
    import hashlib

    return Fingerprint(model=r.spec.model, model_config_sha256=hashlib.sha256(cfg).hexdigest(),
                       method=r.spec.method, peft_variant=r.spec.peft.variant if r.spec.method != "full" else None,
                       dataset_sha256=r.dataset_report.sha256, dataset_path=r.spec.dataset.path, created=time.time())


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = [(int(m.group(1)), p) for p in run_dir.glob("checkpoint-*")
             if (m := re.fullmatch(r"checkpoint-(\d+)", p.name)) and (p / "trainer_state.json").is_file()]
    return max(found)[1] if found else None


def _check_fingerprint(r: Run) -> None:
    path = r.run_dir / "fingerprint.json"
    now = fingerprint(r)
    old = read_model(path, Fingerprint) if r.resume else None
    if old is not None:
        labels = {"model": "base model", "model_config_sha256": "base model config", "method": "method",
                  "peft_variant": "adapter variant", "dataset_sha256": "dataset contents (sha256)"}
        changed = [key for key in labels if getattr(old, key) != getattr(now, key)]
        if changed:
            raise RunnerError(
                "resume refused: " + ", ".join(f"{labels[k]} changed ({getattr(old, k)!r} -> {getattr(now, k)!r})"
                                               for k in changed),
                field=changed[0], kind="resume_refused",
                fix="resume with the same model, method and dataset, or start a new run")
        ckpt = latest_checkpoint(r.run_dir)
        r.resume_from = str(ckpt) if ckpt else None
        if ckpt is None:
            r.notes.append("resume asked but no checkpoint was saved yet; started from step 0")
        return
    if r.is_main:
        write_model(path, now)


# ------------------------------------------------------------------------------------------ model builders


def _load_model(r: Run, **kwargs):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(
        r.model_dir, dtype=kwargs.pop("dtype", torch.float32), use_safetensors=True,
        trust_remote_code=r.spec.trust_remote_code, attn_implementation=r.spec.attention, **kwargs)
    model.config.use_cache = False  # no KV cache while training (it only costs memory)
    if model.config.pad_token_id is None:
        model.config.pad_token_id = r.tokenizer.pad_token_id
    return model


def full_dtype(r: Run):
    """torch dtype full fine-tuning loads the model in: fp32 master weights (mixed precision, the Trainer's
    autocast), or the 16-bit ``master_dtype`` for pure 16-bit runs when the run really trains in that dtype
    (``r.precision`` after the CPU/GPU fallbacks)."""
    import torch

    if pure_16bit(r):
        return {"bf16": torch.bfloat16, "fp16": torch.float16}[r.precision]
    return torch.float32


def pure_16bit(r: Run) -> bool:
    """True for a pure 16-bit full fine-tune: master_dtype bf16/fp16 and the run really uses that precision.
    One process, DDP and FSDP alike: FSDP shards the 16-bit model as loaded when mixed precision is off."""
    return distributed.pure_16bit(r.spec) and r.spec.master_dtype == r.precision


def _build_full(r: Run):
    """Full fine-tuning: every weight trains. master_dtype fp32: fp32 master weights, the Trainer's autocast
    gives the mixed precision. master_dtype bf16/fp16 (pure 16-bit, as torchtune and LLaMA-Factory's pure_bf16):
    the model is loaded in that dtype and ``training_arguments`` turns autocast off, so weights, gradients and
    torch AdamW's moments (``zeros_like(p)``) are all 16-bit and no fp32 master copy exists. Under FSDP the same:
    with mixed precision off (the accelerate config says "no", :func:`training_arguments` makes sure) accelerate
    shards the 16-bit model as loaded (``tests/test_fsdp_pure16.py`` trains so on two ranks).
    ``estimator/memory.py`` counts both (``tests/test_memory_exact.py``, ``tests/test_fsdp_memory.py``)."""
    import torch

    if r.spec.master_dtype != "fp32" and not pure_16bit(r):
        r.notes.append(f"master_dtype {r.spec.master_dtype}: this device trains in {r.precision}; used fp32 "
                       "master weights")
    dtype = full_dtype(r)
    model = _load_model(r, dtype=dtype)
    if dtype != torch.float32:
        r.notes.append(f"pure {r.precision}: weights, gradients and optimizer states in {r.precision}, no autocast")
    model.requires_grad_(True)
    return model


# Distribution strategies whose engine manages the weights' dtype itself (FSDP casts every parameter to its
# MixedPrecisionPolicy param_dtype; DeepSpeed casts the module to 16-bit with its own fp32 master copy): QLoRA
# keeps peft's fp32 upcast for them (``qlora_paper_regime``). One process or DDP runs the model as loaded.
_ENGINE_MANAGED_DTYPE = ("fsdp", "zero2", "zero3")


def lora_base_dtype(r: Run):
    """torch dtype the frozen LoRA base is loaded in: the run's 16-bit dtype when it really trains in
    bf16/fp16 (``r.precision``, after the CPU/GPU fallbacks) on one process, DDP or FSDP, else fp32."""
    import torch

    half = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(r.precision)
    sharding = distributed.estimator_sharding(r.spec)
    # FSDP2 (the runner's FSDP) shards a frozen parameter in its own dtype and upcasts only trainable ones
    # (accelerate fsdp2_prepare_model), so the FSDP base stays 16-bit; DeepSpeed casts the module itself
    if half is None or sharding in ("zero2", "zero3"):
        return torch.float32
    return half


def _build_lora(r: Run):
    """LoRA (rsLoRA/DoRA flags), LoRA+ (optimizer built in the trainer) or AdaLoRA.

    The frozen base is loaded in the run's 16-bit dtype for bf16/fp16 runs (``lora_base_dtype``: 2 B per
    weight, no fp32 copy of weights that never train); peft keeps the adapter weights in fp32
    (``get_peft_model(autocast_adapter_dtype=True)``, its default), so their gradients and AdamW states are
    fp32, and the Trainer's autocast (bf16=True / fp16=True) still runs the matmuls in 16-bit. fp32 runs load
    an fp32 base. ``estimator/memory.py`` counts exactly this regime (``tests/test_recipe_lora_dtype.py``).
    """
    import torch
    from peft import get_peft_model

    dtype = lora_base_dtype(r)
    model = _load_model(r, dtype=dtype)
    if dtype != torch.float32:
        r.notes.append(f"LoRA base loaded in {str(dtype).removeprefix('torch.')} (frozen); adapters in fp32")
    if r.spec.gradient_checkpointing:
        model.enable_input_require_grads()
    return get_peft_model(model, _peft_config(r, model), autocast_adapter_dtype=True)


def load_4bit(r: Run):
    """The QLoRA base as loaded, before its regime's preparation: NF4 with double quantization, compute in bf16
    (fp16 / fp32 where the run uses them), loaded in the compute dtype for the paper's regime, else fp32 (peft's
    upcast), with ``bnb_4bit_quant_storage`` where FSDP/ZeRO-3 shard it. transformers 5's fused MoE experts (3D
    parameters, which bitsandbytes' loader leaves unquantized) are quantized to NF4 as they load, one Linear4bit
    per expert and matrix (``runner/train/experts.py``), so the 16-bit experts never all sit on the GPU, then
    swapped for ``NF4Experts``, as the estimator counts them (``estimator.memory.moe_qlora_load_peak_bytes``).
    Returns (model, compute dtype)."""
    import torch
    from transformers import BitsAndBytesConfig

    from runner.train.experts import quantize_experts_while_loading, quantize_fused_experts

    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise RunnerError("QLoRA needs bitsandbytes, which is not installed", field="method",
                          kind="missing_dependency", fix="pip install 'bitsandbytes>=0.48'") from exc
    compute = torch.bfloat16 if r.precision == "bf16" else torch.float16 if r.precision == "fp16" else torch.float32
    quant = dict(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                 bnb_4bit_compute_dtype=compute)
    storage = distributed.quant_storage_dtype(r.spec) or None
    if storage:
        quant["bnb_4bit_quant_storage"] = storage
    dtype = {"dtype": compute} if qlora_paper_regime(r) else {}  # _load_model's default: fp32
    with quantize_experts_while_loading(compute, storage):
        model = _load_model(r, quantization_config=BitsAndBytesConfig(**quant), **dtype)
    swapped, skipped = quantize_fused_experts(model, compute, storage)
    if swapped:
        r.notes.append(f"QLoRA: the fused experts of {swapped} MoE layers quantized to NF4 while loading (one 4-bit "
                       "Linear per expert and matrix; transformers' 4-bit loader leaves them unquantized)")
    for reason in skipped:
        r.notes.append(f"QLoRA: experts left unquantized in {reason}")
    return model, compute


def _build_qlora(r: Run):
    """QLoRA: the 4-bit base (:func:`load_4bit`), the regime's preparation (the paper's, or peft's
    ``prepare_model_for_kbit_training``), then LoRA on top (Dettmers et al. 2023)."""
    from peft import get_peft_model, prepare_model_for_kbit_training

    model, compute = load_4bit(r)
    name = str(compute).removeprefix("torch.")
    if qlora_paper_regime(r):
        model = prepare_qlora_paper(model, use_gradient_checkpointing=r.spec.gradient_checkpointing)
        r.notes.append(f"QLoRA base: NF4 + double quantization, compute dtype {name}; the paper's regime: norms "
                       f"fp32, embeddings and LM head {name}")
    else:
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=r.spec.gradient_checkpointing)
        r.notes.append(f"QLoRA base: NF4 + double quantization, compute dtype {name}; non-quantized weights fp32 "
                       "(prepare_model_for_kbit_training)")
    return get_peft_model(model, _peft_config(r, model), autocast_adapter_dtype=True)


def qlora_paper_regime(r: Run) -> bool:
    """The QLoRA paper's regime applies: asked for (the default), a 16-bit compute dtype, one process or DDP
    (FSDP/ZeRO-3 flatten parameters and keep peft's fp32 upcast, see ``_ENGINE_MANAGED_DTYPE``)."""
    sharding = distributed.estimator_sharding(r.spec)
    return (r.spec.qlora_regime == "paper" and r.precision in ("bf16", "fp16")
            and sharding not in _ENGINE_MANAGED_DTYPE)


def prepare_qlora_paper(model, use_gradient_checkpointing: bool = False):
    """The QLoRA paper's preparation (artidoro/qlora ``qlora.py``) of a 4-bit model loaded in the compute dtype:
    freeze every weight, cast the modules whose name holds ``norm`` to fp32 and leave embeddings and LM head in
    the compute dtype (peft's ``prepare_model_for_kbit_training`` would upcast them all to fp32).
    ``estimator.trace._norms_to_fp32`` applies the same rule."""
    import torch

    for param in model.parameters():
        param.requires_grad = False
    for name, module in model.named_modules():
        if "norm" in name:
            module.to(torch.float32)
    # the fp32 norms hand fp32 hidden states to the 16-bit plain Linears bitsandbytes leaves unquantized (the LM
    # head, MoE routers such as Mixtral's ``gate``): autocast casts them in training; outside it (generation, the
    # general-text loss, a CPU run) cast them the same way (one 16-bit copy, as autocast). Found by the MoE QLoRA
    # case of benchmarks/gpu_check.py --smoke: Mixtral's router failed with "expected m1 and m2 to have the same
    # dtype". bitsandbytes' Linear4bit (a Linear subclass) casts its input itself.
    def cast(mod, args):
        x = args[0] if args else None
        if torch.is_tensor(x) and x.is_floating_point() and x.dtype != mod.weight.dtype:
            return (x.to(mod.weight.dtype),) + tuple(args[1:])
        return None

    for module in model.modules():
        weight = getattr(module, "weight", None)
        plain = type(module) is torch.nn.Linear or "Router" in type(module).__name__  # transformers' MoE routers
        if plain and isinstance(weight, torch.nn.Parameter) and weight.dtype in (torch.bfloat16, torch.float16):
            module.register_forward_pre_hook(cast)
    if use_gradient_checkpointing:
        model.enable_input_require_grads()  # checkpointed layers need an input that requires grad
    return model


BUILDERS = {"full": _build_full, "lora": _build_lora, "qlora": _build_qlora}


def resolve_targets(model, targets) -> list[str] | str:
    """Module names for a preset (attention-qv, attention, all-linear) or the given list, checked on the model:
    the estimator's resolution (``estimator.params.resolve_targets``), so both count the same modules."""
    from estimator.params import resolve_targets as shared
    from ftcore.errors import UserError

    try:
        return shared(model, targets)
    except UserError as exc:
        raise RunnerError(str(exc), field="peft.target_modules", kind="bad_spec",
                          fix="use a preset (attention-qv, attention, all-linear) or the model's Linear names"
                          ) from exc


def experts_targets(model, targets, **knobs) -> list[str]:
    """peft ``target_parameters`` for the routed experts (the ``all-linear+experts`` preset; else []): the
    estimator's (``estimator.params.experts_targets``), its refusals (QLoRA, DoRA, AdaLoRA, dropout) as RunnerError."""
    from estimator.params import experts_targets as shared
    from ftcore.errors import UserError

    try:
        return shared(model, targets, **knobs)
    except UserError as exc:
        raise RunnerError(str(exc), field="peft.target_modules", kind="bad_spec",
                          fix="use all-linear, or LoRA with dropout 0 for all-linear+experts") from exc


def _peft_config(r: Run, model):
    from peft import AdaLoraConfig, LoraConfig

    p = r.spec.peft
    targets = resolve_targets(model, p.target_modules)
    if p.variant == "adalora":
        experts_targets(model, p.target_modules, method=r.spec.method, adalora=True, dropout=p.dropout)
        if p.use_dora:
            raise RunnerError("AdaLoRA cannot be combined with DoRA", field="peft.use_dora", fix="turn off use_dora")
        if p.adalora_target_r >= p.r:  # equal ranks leave nothing to prune (peft fails in kthvalue)
            raise RunnerError(f"adalora_target_r ({p.adalora_target_r}) must be below the initial rank r ({p.r})",
                              field="peft.adalora_target_r", fix="lower adalora_target_r or raise r")
        # Schedule from the AdaLoRA paper (Zhang et al. 2023): warm up 10% of steps at full rank, prune until
        # the last 20%, then keep the final allocation. deltaT=1: reallocate every step (peft's default is 1).
        total = r.max_steps
        tinit, tfinal = int(0.1 * total), int(0.2 * total)
        if total - tinit - tfinal < 1:
            tinit, tfinal = 0, 0
        return AdaLoraConfig(init_r=p.r, target_r=p.adalora_target_r, lora_alpha=p.alpha, lora_dropout=p.dropout,
                             target_modules=targets, total_step=total, tinit=tinit, tfinal=tfinal, deltaT=1,
                             task_type="CAUSAL_LM")
    # the all-linear+experts preset: peft's target_parameters on the fused routed experts (estimator.params)
    experts = experts_targets(model, p.target_modules, method=r.spec.method, dora=p.use_dora, dropout=p.dropout)
    return LoraConfig(r=p.r, lora_alpha=p.alpha, lora_dropout=p.dropout, target_modules=targets,
                      use_rslora=p.use_rslora, use_dora=p.use_dora, task_type="CAUSAL_LM",
                      **({"target_parameters": experts} if experts else {}))


# ------------------------------------------------------------------------------------------------- trainer



def training_arguments(r: Run):
    from transformers import TrainingArguments

    spec = r.spec
    has_eval = bool(r.eval_rows)
    kwargs = dict(
        output_dir=str(r.run_dir), per_device_train_batch_size=spec.micro_batch_size,
        per_device_eval_batch_size=spec.micro_batch_size,
        gradient_accumulation_steps=spec.gradient_accumulation_steps, learning_rate=spec.learning_rate,
        lr_scheduler_type=spec.lr_scheduler, warmup_steps=spec.warmup_ratio, weight_decay=spec.weight_decay,
        num_train_epochs=spec.epochs, max_steps=r.max_steps, logging_steps=spec.logging_steps,
        save_strategy="steps", save_steps=spec.save_steps, save_total_limit=spec.save_total_limit,
        eval_strategy=("steps" if spec.eval_steps else "epoch") if has_eval else "no",
        eval_steps=spec.eval_steps, seed=spec.seed,
        # pure 16-bit: the weights already are 16-bit; autocast (and fp16's GradScaler) stay off
        bf16=r.precision == "bf16" and not pure_16bit(r), fp16=r.precision == "fp16" and not pure_16bit(r),
        use_cpu=r.device == "cpu", report_to="none", optim=OPTIMIZERS[spec.optimizer],
        remove_unused_columns=False,
        # training tokens summed over all ranks by the Trainer itself (an accelerator.gather per step); padding
        # is not counted (attention_mask, or pad ids in packed batches, runner/train/data.py Collator)
        include_num_input_tokens_seen="non_padding",
        dataloader_num_workers=0, disable_tqdm=True, save_only_model=False,
    )
    if spec.gradient_checkpointing:  # non-reentrant checkpointing works with frozen bases (LoRA) too
        kwargs.update(gradient_checkpointing=True, gradient_checkpointing_kwargs={"use_reentrant": False})
    kwargs.update(distributed.training_args_overrides(spec))
    args = TrainingArguments(**kwargs)
    if pure_16bit(r) and args.mixed_precision != "no":
        # bf16/fp16 are off, so TrainingArguments took ACCELERATE_MIXED_PRECISION from the environment (an
        # accelerate launch with another config): the Accelerator would autocast, and under FSDP upcast every
        # trainable parameter to fp32 (accelerate fsdp2_prepare_model). Pure 16-bit means no mixed precision.
        r.notes.append(f"pure {r.precision}: ignored ACCELERATE_MIXED_PRECISION={args.mixed_precision} from the "
                       "environment (no mixed precision)")
        args.mixed_precision = "no"
    return args


def _build_trainer(r: Run):
    from transformers import Trainer

    spec = r.spec
    tok = r.tokenizer
    r.collator = rdata.Collator(tok.pad_token_id)
    args = training_arguments(r)
    optimizers = (None, None)
    if spec.method != "full" and spec.peft.variant == "loraplus":
        optimizers = (_loraplus_optimizer(r, args), None)
    agree = distributed.any_rank if int(os.environ.get("WORLD_SIZE", "1")) > 1 else None
    r.stopper = StopOnRequest(r.stop_flag, agree)
    r.metrics = MetricsCallback(r.run_dir / METRICS_FILE, r.progress, write=r.is_main)
    callbacks = [r.metrics, r.stopper]
    if spec.method != "full" and spec.peft.variant == "adalora":
        r.adalora = AdaLoraCallback(r.model)
        callbacks.append(r.adalora)
    return Trainer(model=r.model, args=args, train_dataset=r.train_ds, eval_dataset=r.eval_ds, data_collator=r.collator,
                   processing_class=tok, callbacks=callbacks, optimizers=optimizers)


def _loraplus_optimizer(r: Run, args):
    """LoRA+ (Hayou et al. 2024): B matrices learn ``loraplus_lr_ratio`` times faster than A (peft's builder)."""
    import torch
    from peft.optimizers import create_loraplus_optimizer

    return create_loraplus_optimizer(model=r.model, optimizer_cls=torch.optim.AdamW, lr=r.spec.learning_rate,
                                     loraplus_lr_ratio=r.spec.peft.loraplus_lr_ratio,
                                     weight_decay=r.spec.weight_decay)


# -------------------------------------------------------------------------------------------------- train


def _train(r: Run) -> None:
    import torch

    baseline = r.run_dir / "baseline.json"
    r.progress.update(phase="eval_before")
    kept = read_model(baseline, Evaluation) if r.resume else None
    if kept is not None:
        r.before = kept.model_dump()
    else:
        r.before = _evaluate(r)
        if r.is_main:
            write_model(baseline, Evaluation.model_validate(r.before))
    r.progress.update(phase="train")
    distributed.prepare_for_training(r.trainer)  # DDP wrap even though evaluate() ran first
    start = time.perf_counter()
    with _oom_as("oom_step"):
        r.trainer.train(resume_from_checkpoint=r.resume_from)
    r.train_seconds = time.perf_counter() - start
    r.train_tokens = r.metrics.session_tokens(r.trainer.state)  # this session's training tokens, all ranks
    r.stopped = r.stopper.stopped_at is not None and r.trainer.state.global_step < r.trainer.state.max_steps
    if r.stopped:
        return
    r.progress.update(phase="eval_after")
    r.after = _evaluate(r)


def _evaluate(r: Run) -> dict:
    """Eval loss (Trainer.evaluate) and exact match on up to EXACT_MATCH_MAX_ROWS eval rows."""
    import torch

    out: dict = {"eval_loss": None, "exact_match": None, "exact_match_rows": 0, "samples": []}
    out.update(_general_text_loss(r))  # forgetting: loss on the shipped general text (runner/tools/forgetting.py)
    if not r.eval_rows:
        return out
    step = r.trainer.state.global_step
    done = [h["eval_loss"] for h in r.trainer.state.log_history if "eval_loss" in h and h.get("step") == step]
    with _oom_as("oom_eval"):
        if step and done:
            out["eval_loss"] = done[-1]  # the Trainer already evaluated at this step (end of epoch / eval_steps)
        else:
            out["eval_loss"] = r.trainer.evaluate()["eval_loss"]
        out.update(exact_match(r.model, r.tokenizer, r.eval_rows, r.fmt))
    return out


def _general_text_loss(r: Run) -> dict:
    """``general_loss`` / ``general_tokens`` of the model on the shipped general text (runner/tools/forgetting.py).

    Skipped (empty) where weights are sharded across ranks (FSDP, ZeRO): one rank cannot run a forward alone.
    """
    if distributed.estimator_sharding(r.spec) not in ("none", "ddp"):
        return {}
    from runner.tools.forgetting import general_loss

    with _oom_as("oom_eval"):
        loss, tokens = general_loss(r.model, r.tokenizer)
    return {"general_loss": loss, "general_tokens": tokens}


def normalize_answer(text: str) -> str:
    """Exact match compares answers after stripping surrounding whitespace and collapsing inner whitespace."""
    return " ".join(text.split())


def answer_contains(generated: str, reference: str) -> bool:
    """The normalized answer match: the reference appears in the generated answer as whole words, case-insensitive
    (``"negative"`` in ``"The sentiment of this review is negative."``; ``"7"`` is not in ``"17"``). It measures
    whether the model knows the answer even when it words it differently from the label, where exact match also
    measures the answer's format."""
    ref = normalize_answer(reference).casefold()
    if not ref:
        return False
    return re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", normalize_answer(generated).casefold()) is not None


def exact_match(model, tokenizer, rows: list[dict], fmt: str, max_rows: int = EXACT_MATCH_MAX_ROWS) -> dict:
    """Greedy-generate answers for rows with a reference; ``exact_match``: the share equal to the reference (after
    normalize_answer); ``answer_match``: the share containing it (``answer_contains``)."""
    pairs = [(rdata.generation_prompt(row, fmt, tokenizer), rdata.reference_answer(row, fmt)) for row in rows]
    pairs = [(p, a) for p, a in pairs if p is not None and a is not None][:max_rows]
    if not pairs:
        return {}
    longest = max(len(tokenizer(a, add_special_tokens=False)["input_ids"]) for _, a in pairs)
    max_new = min(EXACT_MATCH_MAX_NEW_TOKENS, longest + EXACT_MATCH_EXTRA_TOKENS)
    answers = generate_batch(model, tokenizer, [p for p, _ in pairs], max_new, add_special_tokens=fmt != "messages")
    hits = [normalize_answer(g) == normalize_answer(a) for g, (_, a) in zip(answers, pairs)]
    contained = [answer_contains(g, a) for g, (_, a) in zip(answers, pairs)]
    samples = [{"prompt": p, "reference": a, "generated": g, "match": h}
               for (p, a), g, h in list(zip(pairs, answers, hits))[:REPORT_SAMPLES]]
    return {"exact_match": sum(hits) / len(hits), "answer_match": sum(contained) / len(contained),
            "exact_match_rows": len(hits), "samples": samples}


@contextlib.contextmanager
def _oom_as(kind: str):
    """Turn an out-of-memory error raised inside the block into a RunnerError of ``kind`` (with its fix)."""
    try:
        yield
    except RuntimeError as exc:  # torch.OutOfMemoryError is a RuntimeError; CPU allocators raise plain ones
        if _is_oom(exc):
            raise _oom(kind, exc) from exc
        raise


def _is_oom(exc: BaseException) -> bool:
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        return True
    text = str(exc).lower()
    return "out of memory" in text or "can't allocate memory" in text or "cannot allocate memory" in text


def _oom(kind: str, exc: BaseException) -> RunnerError:
    phase = {"oom_load": "loading the model", "oom_step": "a training step", "oom_eval": "evaluation"}[kind]
    fix = {"oom_load": "use QLoRA (4-bit base) or a smaller model, or a device with more memory",
           "oom_step": "lower micro_batch_size or seq_len, turn on gradient_checkpointing, or use LoRA/QLoRA",
           "oom_eval": "lower micro_batch_size (it is also the eval batch size) or seq_len"}[kind]
    return RunnerError(f"out of memory during {phase}: {str(exc).splitlines()[0][:300]}", kind=kind, fix=fix)


# ------------------------------------------------------------------------------------------------ cleanup


def _cleanup(r: Run) -> None:
    r.progress.update(phase="save")
    if r.stopped:
        return
    out = r.run_dir / ("model" if r.spec.method == "full" else "adapter")
    if distributed.needs_collective_save(r.spec):
        # FSDP / ZeRO-3: weights are sharded, every rank takes part in gathering them; the main process writes
        r.trainer.save_model(str(out))
        if r.is_main:
            (out / "training_args.bin").unlink(missing_ok=True)  # a pickle nobody needs next to the weights
    elif r.is_main:
        r.model.save_pretrained(out, safe_serialization=True)
    if not r.is_main:
        return
    r.tokenizer.save_pretrained(out)
    write_model(r.run_dir / REPORT_FILE, report(r, out))
    r.progress.update(phase="done")


def trainable_params(model) -> tuple[int, int]:
    """(trainable, total) parameter counts: peft's ``get_nb_trainable_parameters`` for adapter models (it counts
    4-bit packed weights by their real element count); the same sum for a full fine-tune's plain model."""
    if hasattr(model, "get_nb_trainable_parameters"):
        trainable, total = model.get_nb_trainable_parameters()
        return int(trainable), int(total)
    trainable = total = 0
    for p in model.parameters():
        n = p.numel()
        if type(p).__name__ == "Params4bit":  # two 4-bit values per stored byte (bitsandbytes packing)
            n *= 2
        total += n
        if p.requires_grad:
            trainable += n
    return trainable, total


def dataset_summary(r: Run, errors: bool) -> DatasetSummary:
    """The dataset check as a run-folder model: ``dataset_check.json`` (with its errors, written before any model
    is loaded) and report.json's ``dataset`` (a completed run had none)."""
    summary = r.dataset_report.summary()
    return DatasetSummary.model_validate(summary | {"token_length": summary["token_length"] or None,
                                                    "errors": summary["errors"] if errors else [],
                                                    "path": r.spec.dataset.path})


def report(r: Run, out: Path) -> Report:
    """report.json (``runner.jobs.runfiles.Report``). ``r.before`` / ``r.after`` are this module's evaluation dicts."""
    trainable, total = trainable_params(r.model)
    weights = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    state = r.trainer.state
    losses = [h["loss"] for h in state.log_history if "loss" in h]
    adapter = r.spec.method != "full"
    dataset = dataset_summary(r, errors=False)
    forgetting = _forgetting(r)
    intruders = _intruders(r, out)  # may add a note, so before the notes are taken
    return Report(
        model=r.spec.model, model_dir=str(r.model_dir), method=r.spec.method,
        peft_variant=r.spec.peft.variant if adapter else None, rank=r.spec.peft.r if adapter else None,
        device=r.device, precision=r.precision, precision_requested=r.spec.precision, dataset=dataset,
        train_rows=len(r.train_rows), eval_rows=len(r.eval_rows),
        steps=state.global_step, max_steps=state.max_steps, epochs=state.epoch,
        train_seconds=round(r.train_seconds, 3), train_tokens=r.train_tokens,
        tokens_per_s=r.train_tokens / r.train_seconds if r.train_seconds else None,
        first_loss=losses[0] if losses else None, final_loss=losses[-1] if losses else None,
        eval_loss_before=r.before.get("eval_loss"), eval_loss_after=r.after.get("eval_loss"),
        exact_match_before=r.before.get("exact_match"), exact_match_after=r.after.get("exact_match"),
        answer_match_before=r.before.get("answer_match"), answer_match_after=r.after.get("answer_match"),
        exact_match_rows=r.after.get("exact_match_rows", 0),
        samples=_merge_samples(r.before.get("samples", []), r.after.get("samples", [])),
        trainable_params=trainable, total_params=total,
        adapter_bytes=weights if adapter else None, model_bytes=None if adapter else weights,
        output=str(out), resumed_from=r.resume_from, peak_memory=peak_memory(), notes=r.notes,
        forgetting=forgetting, intruder_dimensions=intruders,
        adalora_update_calls=r.adalora.calls if r.adalora is not None else None,
        adalora_rank_pattern=_rank_pattern(r.model) if r.adalora is not None else None,
    )


def _forgetting(r: Run):
    """report.json "forgetting": general-text loss before/after/change (runner/tools/forgetting.py), None if skipped."""
    from runner.tools.forgetting import forgetting_report

    before, after = r.before.get("general_loss"), r.after.get("general_loss")
    if before is None and after is None:
        return None
    return forgetting_report(before, after, tokens=r.after.get("general_tokens") or 0)


def _intruders(r: Run, out: Path):
    """report.json "intruder_dimensions" (runner/tools/intruder.py): adapter runs from base + adapter files, full runs
    from the saved weights vs the base over the modules a LoRA run with this spec's targets would adapt."""
    from runner.tools import intruder

    try:
        if r.spec.method == "full":
            targets = resolve_targets(r.model, r.spec.peft.target_modules)
            suffixes = None if targets == "all-linear" else list(targets)
            return intruder.full_intruders(r.model_dir, out, suffixes)
        if r.spec.peft.variant == "adalora":
            r.notes.append("intruder dimensions are not measured for AdaLoRA adapters")
            return None
        return intruder.adapter_intruders(r.model_dir, out)
    except RunnerError as exc:  # the run itself succeeded; say why the figure is missing
        r.notes.append(f"intruder dimensions not measured: {exc}")
        return None


def _rank_pattern(model) -> dict | None:
    cfg = model.peft_config.get("default")
    pattern = getattr(cfg, "rank_pattern", None)
    if not pattern:
        return None
    return {k: int(sum(bool(x) for x in v)) for k, v in pattern.items()}


def _merge_samples(before: list[dict], after: list[dict]) -> list[Sample]:
    merged = []
    for i, a in enumerate(after or before):
        b = before[i] if i < len(before) else {}
        merged.append(Sample(prompt=a.get("prompt"), reference=a.get("reference"), before=b.get("generated"),
                             after=a.get("generated") if after else None))
    return merged
