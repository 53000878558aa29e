"""Loading GPT-2 (hub id or local directory), wrapping it with LoRA, and describing what is trainable."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any, Optional, Sequence

import torch

from studykit.errors import UserError, first_line
from studykit.hub import ensure_hub_reachable
from studykit.io import DamagedFile, read_json

# peft still calls transformers' old `is_gradient_checkpointing` name; the warning is theirs, not the user's.
warnings.filterwarnings("ignore", message=r".*is_gradient_checkpointing.*deprecated", category=FutureWarning)

# GPT-2 names both the attention output and the MLP output `c_proj`, so targets are written as path
# suffixes: peft matches `attn.c_proj` against `transformer.h.0.attn.c_proj` but not `...mlp.c_proj`.
TARGET_PRESETS: dict[str, list[str]] = {
    "attention": ["attn.c_attn", "attn.c_proj"],
    "attention+mlp": ["attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"],
    "all-linear": ["all-linear"],
}


def is_damaged_file_error(error: BaseException) -> bool:
    """Whether a loader failed on a file that is cut short or overwritten, rather than on a wrong or missing one."""
    from safetensors import SafetensorError

    text = str(error)
    return (
        isinstance(error, (json.JSONDecodeError, UnicodeDecodeError, SafetensorError))
        or "not a valid JSON file" in text
        or "Error while deserializing" in text
    )


def damaged_model_files(name_or_path: str, what: str, error: BaseException) -> UserError:
    if Path(name_or_path).exists():
        remedy = "save it again with save_pretrained (a checkpoint of this kit: train that run again)"
    else:
        remedy = "delete its copy in the Hugging Face cache (~/.cache/huggingface/hub) so that it downloads again"
    return DamagedFile(Path(name_or_path), f"{what} fails to load: {first_line(error)}", remedy)


# The hub's GPT-2 sizes by name: (layers, width, heads), all with GPT-2's vocabulary and 1,024 positions. What plans
# and estimates need before (or without) a download.
KNOWN_GPT2_SHAPES = {
    "gpt2": (12, 768, 12),
    "gpt2-medium": (24, 1024, 16),
    "gpt2-large": (36, 1280, 20),
    "gpt2-xl": (48, 1600, 25),
}
GPT2_VOCABULARY = 50257


def model_skeleton(model_config, trust_remote_code: bool = False):
    """The model a config describes, on the meta device (modules and shapes, no weights), with its embeddings tied as
    a loaded model's are: transformers 5.0 left a meta-device GPT-2's output layer untied, which counted 39M parameters
    more for GPT-2 Small (51M for Medium) in every estimate built on it."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=trust_remote_code)
        skeleton.tie_weights()
    return skeleton


def known_gpt2_config(name: str):
    """The config of a GPT-2 named by its hub id (`gpt2-medium` or `openai-community/gpt2-medium`), or None."""
    from transformers import GPT2Config

    shape = KNOWN_GPT2_SHAPES.get(name.removeprefix("openai-community/"))
    if shape is None:
        return None
    layers, width, heads = shape
    return GPT2Config(n_layer=layers, n_embd=width, n_head=heads, vocab_size=GPT2_VOCABULARY, n_positions=1024)


def load_tokenizer(name_or_path: str, flag: str = "--tokenizer", trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    ensure_hub_reachable(name_or_path, f"{flag} PATH (a local tokenizer directory)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except Exception as error:
        if is_damaged_file_error(error):
            raise damaged_model_files(name_or_path, "its tokenizer", error) from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        if "trust_remote_code" in str(error):
            raise UserError(
                f"the tokenizer '{name_or_path}' needs its own Python code to load, which runs only with "
                "--trust-remote-code; pass it if you trust that code, or use a standard tokenizer."
            ) from None
        raise UserError(
            f"could not load a tokenizer from '{name_or_path}' ({first_line(error)}); pass {flag} PATH."
        ) from None
    if tokenizer.eos_token_id is None:
        raise UserError(f"the tokenizer '{name_or_path}' has no EOS token; responses must end with one.")
    if tokenizer.pad_token_id is None:
        # GPT-2 has no pad token. Padding positions are masked out of attention and labels by position.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


# A byte-level BPE (GPT-2's) has a token per byte before any merge; a tokenizer with fewer lost its vocabulary.
MIN_TOKENIZER_VOCABULARY = 256
# Any working tokenizer splits this into several tokens; one that has lost its vocabulary yields none or one.
PROBE_TEXT = "The quick brown fox jumps over the lazy dog."
# The files a tokenizer's vocabulary lives in, by kind (fast, GPT-2's BPE, SentencePiece, WordPiece).
VOCABULARY_FILES = ("tokenizer.json", "vocab.json", "merges.txt", "tokenizer.model", "vocab.txt")


def check_tokenizer_vocabulary(tokenizer, name_or_path: str, flag: str = "--tokenizer") -> None:
    """A tokenizer that loads but has lost its vocabulary is refused before prepare writes anything: transformers 5
    loads a directory with only tokenizer_config.json as a tokenizer of one token, whose data would be one token per
    response and train nothing. (Training and evaluation need no second look: their tokenizer must be the data's, by
    its fingerprint, and fit the model, check_model_fits_tokenizer.)"""
    size = len(tokenizer)
    eos_missing = tokenizer.convert_ids_to_tokens(tokenizer.eos_token_id) is None or tokenizer.eos_token_id >= size
    probe_tokens = len(tokenizer(PROBE_TEXT, add_special_tokens=False)["input_ids"])
    if size >= MIN_TOKENIZER_VOCABULARY and not eos_missing and probe_tokens > 1:
        return
    directory = Path(name_or_path)
    present = [name for name in VOCABULARY_FILES if (directory / name).is_file()] if directory.is_dir() else []
    missing = (
        f"it holds none of {', '.join(VOCABULARY_FILES)}"
        if directory.is_dir() and not present
        else "its vocabulary files are incomplete or damaged"
    )
    raise UserError(
        f"the tokenizer '{name_or_path}' has {size} token(s) (GPT-2's has 50,257), "
        + ("its EOS token is not in its vocabulary, " if eos_missing else "")
        + f"and splits a sentence into {probe_tokens} token(s): {missing}; pass {flag} a complete tokenizer "
        "(e.g. the directory save_pretrained wrote, or gpt2)."
    )


def check_model_fits_tokenizer(model, tokenizer, model_name: str, tokenizer_name: str) -> None:
    """A model and a tokenizer that load but do not belong together: ids past the model's embedding rows fail deep in
    a forward pass, and a vocabulary far smaller than the model's means its ids name other tokens to this model (a
    padded vocabulary, such as 50,304 rows for GPT-2's 50,257 tokens, is fine)."""
    rows, tokens = model.get_input_embeddings().num_embeddings, len(tokenizer)
    if tokens > rows:
        raise UserError(
            f"the tokenizer '{tokenizer_name}' has {tokens:,} tokens, more than the {rows:,} the model '{model_name}' "
            "has embeddings for; pass the model's own tokenizer with --tokenizer."
        )
    if 2 * tokens < rows:
        raise UserError(
            f"the tokenizer '{tokenizer_name}' has {tokens:,} tokens, far fewer than the model '{model_name}''s "
            f"{rows:,}, so its ids mean other tokens to that model; pass the model's own tokenizer with --tokenizer."
        )


def model_context_length(model_or_config) -> int:
    config = getattr(model_or_config, "config", model_or_config)
    return int(getattr(config, "n_positions", None) or getattr(config, "max_position_embeddings"))


def load_base_model(
    name_or_path: str, flag: str = "--model", trust_remote_code: bool = False, dtype: Optional[torch.dtype] = None
):
    """Weights load from safetensors only; SDPA attention where the model supports it."""
    from transformers import AutoModelForCausalLM

    ensure_hub_reachable(name_or_path, f"{flag} PATH (a local model directory)")
    path = Path(name_or_path)
    if is_adapter_directory(path):
        # transformers would quietly load the adapter's base model with the adapter applied, and train on top of it.
        raise UserError(
            f"{path} is a LoRA adapter, not a base model; pass the model it was trained on with {flag} "
            "(evaluation/perplexity.py applies adapters it finds in --checkpoints)."
        )
    if path.is_dir() and not any(path.glob("*.safetensors")):
        pickled = sorted(p.name for p in path.glob("*.bin")) + sorted(p.name for p in path.glob("*.pt*"))
        found = (
            f" (only {', '.join(pickled[:2])}: pickled weights are never loaded, because unpickling can run code)"
            if pickled
            else ""
        )
        raise UserError(
            f"{path} holds no .safetensors weights{found}; save the model with save_pretrained "
            f"(safetensors is its default) and pass that directory with {flag}."
        )
    kwargs: dict[str, Any] = {"use_safetensors": True, "trust_remote_code": trust_remote_code}
    if dtype is not None:
        kwargs["dtype"] = dtype
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, attn_implementation="sdpa", **kwargs)
    except Exception as error:
        if is_damaged_file_error(error):
            raise damaged_model_files(name_or_path, "the model", error) from None
        if not isinstance(error, (OSError, ValueError)):
            raise
        if "trust_remote_code" in str(error):
            raise UserError(
                f"'{name_or_path}' needs its own Python code to load, which runs only with --trust-remote-code; "
                "pass it if you trust that code, or use a standard model."
            ) from None
        raise UserError(
            f"could not load a model from '{name_or_path}' ({first_line(error)}); pass {flag} PATH."
        ) from None
    use_fused_gelu(model)
    return model


def use_fused_gelu(model) -> None:
    """Replace transformers' Python `gelu_new` (GPT-2's MLP activation) with torch's tanh GELU, the same formula in
    one kernel (transformers' GELUTanh; equal up to rounding). Written out in Python, autograd keeps three more
    tensors of the MLP's width per token: a GPT-2 Small step's peak on a CPU (fp32, 2 x 512 tokens) fell from 3.01
    to 2.59 GiB with it. The saved config is untouched, so checkpoints load anywhere as before."""
    from transformers.activations import GELUTanh, NewGELUActivation

    for parent in list(model.modules()):
        for name, child in parent.named_children():
            if type(child) is NewGELUActivation:
                setattr(parent, name, GELUTanh())


def describe_kernels(model) -> dict[str, str]:
    """How the model computes, beside what it is: recorded with every run, since each choice moves the last digits."""
    from transformers.activations import GELUTanh, NewGELUActivation

    from studykit.loss import loss_kernel_of, output_layer

    modules = list(model.modules())
    if any(isinstance(module, GELUTanh) for module in modules):
        activation = "tanh GELU, one kernel (replaces gelu_new)"
    elif any(isinstance(module, NewGELUActivation) for module in modules):
        activation = "gelu_new (Python)"
    else:
        activation = str(
            getattr(model.config, "activation_function", None) or getattr(model.config, "hidden_act", "unknown")
        )
    return {
        "attention": str(getattr(model.config, "_attn_implementation", "unknown")),
        "mlp_activation": activation,
        "loss": LOSS_KERNEL_DESCRIPTIONS[loss_kernel_of(model)] if output_layer(model) is not None else "full logits",
    }


# How each --loss-kernel computes the output layer and the loss, as run.json's kernels["loss"] says it.
LOSS_KERNEL_DESCRIPTIONS = {
    "studykit": "output layer in chunks (studykit.loss)",
    "torch": "output layer in chunks (torch.nn.functional.linear_cross_entropy)",
    "liger": "output layer in chunks (Liger's fused linear cross-entropy, Triton)",
}


def base_model_fingerprint(model) -> str:
    """Identifies a base model's weights cheaply (every tensor's name, shape and first values), so an adapter is
    never applied to another base than the one it was trained on."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        digest.update(f"{name}:{tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().flatten()[:64].float().cpu().numpy().tobytes())
    return digest.hexdigest()[:16]


def resolve_target_modules(targets: Sequence[str]) -> list[str] | str:
    """A preset name, or explicit module-name suffixes such as `attn.c_attn`."""
    if len(targets) == 1 and targets[0] in TARGET_PRESETS:
        resolved = TARGET_PRESETS[targets[0]]
        return resolved[0] if resolved == ["all-linear"] else list(resolved)
    return list(targets)


def wrap_with_lora(
    model,
    rank: int,
    alpha: float,
    dropout: float,
    targets: Sequence[str],
    use_rslora: bool = False,
    use_dora: bool = False,
):
    from peft import LoraConfig, get_peft_model

    if rank <= 0 or alpha <= 0:
        raise UserError(
            f"LoRA needs a positive rank and alpha (got rank={rank}, alpha={alpha}); pass --rank and --alpha above 0."
        )
    lora_config = LoraConfig(
        r=rank,
        lora_alpha=alpha,
        lora_dropout=dropout,
        target_modules=resolve_target_modules(targets),
        # GPT-2 stores its projections as Conv1D with transposed weights.
        fan_in_fan_out=True,
        use_rslora=use_rslora,
        use_dora=use_dora,
        task_type="CAUSAL_LM",
    )
    try:
        return get_peft_model(model, lora_config)
    except ValueError as error:
        # peft refuses names that match no module and names of modules it cannot adapt (an activation, a block).
        if "not found" in str(error) or "did not find" in str(error).lower() or "target" in str(error).lower():
            raise UserError(
                f"LoRA target modules {list(targets)} match nothing LoRA can adapt in this model; use a preset "
                f"({', '.join(TARGET_PRESETS)}) or linear layers such as {adaptable_layer_names(model)[:8]}."
            ) from None
        raise


def adaptable_layer_names(model) -> list[str]:
    """Name suffixes (`attn.c_attn`) of the layers LoRA can adapt: linear layers, GPT-2's Conv1D among them."""
    from transformers.pytorch_utils import Conv1D

    return sorted(
        {
            ".".join(name.split(".")[-2:])
            for name, module in model.named_modules()
            if isinstance(module, (torch.nn.Linear, Conv1D))
        }
    )


def adapted_module_names(model) -> list[str]:
    """Full names of the modules that carry LoRA adapters, e.g. `base_model.model.transformer.h.0.attn.c_attn`."""
    from peft.tuners.lora import LoraLayer

    return [name for name, module in model.named_modules() if isinstance(module, LoraLayer)]


def strip_peft_prefix(name: str) -> str:
    return name.removeprefix("base_model.model.")


def count_parameters(model) -> tuple[int, int]:
    """Trainable and total parameters; a LoRA model's total includes the frozen base."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return trainable, total


def enable_activation_checkpointing(model) -> None:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    # transformers 5.x renamed the method; older 5.x releases only have the gradient_ name.
    enable = getattr(base, "activation_checkpointing_enable", None) or base.gradient_checkpointing_enable
    enable()
    base.config.use_cache = False


def is_adapter_directory(path: Path) -> bool:
    return (Path(path) / "adapter_config.json").exists()


def is_full_model_directory(path: Path) -> bool:
    return (Path(path) / "config.json").exists() and any(Path(path).glob("*.safetensors"))


def check_checkpoint_files(path: Path) -> None:
    """Reads a finished run's config and the headers of its weights (which give every tensor's extent), so a file cut
    short is reported before any model is scored rather than after."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    for config_name in ("adapter_config.json", "config.json"):
        if (path / config_name).exists():
            read_json(path / config_name, "train that run again")
    for weights in sorted(path.glob("*.safetensors")):
        try:
            with safe_open(weights, framework="pt") as stream:
                stream.keys()
        except (SafetensorError, OSError) as error:
            raise DamagedFile(weights, first_line(error), "train that run again") from None


def load_checkpoint_for_eval(path: Path, base_model: str, trust_remote_code: bool = False):
    """A full model directory loads directly; an adapter is applied to the base it was trained from."""
    path = Path(path)
    if is_adapter_directory(path):
        from peft import PeftModel

        if not any(path.glob("adapter_model.safetensors")):
            raise UserError(f"{path} has an adapter config but no adapter_model.safetensors; train it again.")
        model = load_base_model(base_model, "--model", trust_remote_code)
        try:
            return PeftModel.from_pretrained(model, str(path))
        except Exception as error:
            if is_damaged_file_error(error):
                raise DamagedFile(
                    path, f"the adapter fails to load: {first_line(error)}", "train that run again"
                ) from None
            if not isinstance(error, (RuntimeError, ValueError, KeyError)):
                raise
            raise UserError(
                f"the adapter in {path} does not fit the base model '{base_model}' ({first_line(error)}); "
                "evaluate it with the base model it was trained on."
            ) from None
    if is_full_model_directory(path):
        return load_base_model(str(path), "--checkpoints", trust_remote_code)
    raise UserError(
        f"{path} holds neither a full model (config.json + safetensors) nor a LoRA adapter; train it again."
    )
