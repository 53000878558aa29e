"""A real model card for every finished training: README.md in the checkpoint directory, with the Hub's metadata
(base model, dataset, library, the dev perplexity as an evaluation result), how the model was trained, what it
trained, its loss curve, and how to load it. It replaces peft's placeholder card."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Any

from studykit.figures import plot_loss_curves
from studykit.run_state import RunRecord

MODEL_CARD = "README.md"
LOSS_CURVE = "loss_curve.png"


# A hub id (`gpt2`, `OpenAssistant/oasst1`), which the Hub's metadata may name; a local path it would refuse.
HUB_ID = re.compile(r"[\w.-]+(/[\w.-]+)?")


def dataset_id(data_source: str) -> str:
    """The hub id a card's metadata names, for data prepared from the hub (`hub:OpenAssistant/oasst1`); else ''."""
    return data_source.removeprefix("hub:") if data_source.startswith("hub:") else ""


def hub_model_id(model: str) -> str:
    """The base model as the Hub's `base_model` metadata takes it: a hub id, never a local directory ('' then)."""
    return model if HUB_ID.fullmatch(model) and not Path(model).exists() else ""


def yaml_value(value: Any) -> str:
    """A YAML scalar: plain when it is a simple word or id, else double-quoted with its quotes and backslashes
    escaped."""
    text = str(value)
    if re.fullmatch(r"[A-Za-z0-9][\w./-]*", text):
        return text
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"') + '"'


def perplexity(loss: Any) -> Any:
    """exp(loss) for a finite loss a card can show (a diverged run's is not), else None."""
    return math.exp(loss) if isinstance(loss, (int, float)) and math.isfinite(loss) and loss < 700 else None


def what_it_models(data_meta: dict[str, Any]) -> str:
    """Prepare's --context: the responses alone, or each after the prompter message it answers."""
    if data_meta.get("context") == "parent":
        return (
            "It models each assistant response after the prompter message it answers (the prompt's tokens are "
            "context, never trained on)"
        )
    return "It models assistant responses on their own, without their prompts"


def model_card(record: RunRecord, data_meta: dict[str, Any], name: str) -> str:
    """The card's text. The perplexity it gives is the final dev loss's: a study's report adds the test split's."""
    adapter = bool(record.adapted_modules)
    dataset = dataset_id(str(data_meta.get("source", "")))
    dev_perplexity = perplexity(record.final_dev_loss)
    library = "peft" if adapter else "transformers"
    base_model = hub_model_id(record.base_model)
    metadata = ["---", f"library_name: {library}"] + ([f"base_model: {yaml_value(base_model)}"] if base_model else [])
    metadata += [
        "pipeline_tag: text-generation",
        "tags:",
        "- studykit",
        f"- {'lora' if adapter else 'full-fine-tuning'}",
        "- gpt2",
    ]
    if dataset:
        metadata += ["datasets:", f"- {dataset}"]
    if dev_perplexity is not None:
        metadata += [
            "model-index:",
            f"- name: {yaml_value(name)}",
            "  results:",
            "  - task:",
            "      type: text-generation",
            "    dataset:",
            f"      name: {yaml_value(dataset or data_meta.get('source', 'local data'))}",
            f"      type: {yaml_value(dataset or 'local')}",
            "      split: dev",
            "    metrics:",
            "    - type: perplexity",
            f"      value: {dev_perplexity:.4f}",
            "      name: dev perplexity",
        ]
    metadata.append("---")
    config = record.config
    body = [
        f"# {name}",
        "",
        f"`{record.base_model}` fine-tuned on the assistant responses of {dataset or data_meta.get('source')} by the "
        f"LoRA-vs-full-fine-tuning study kit (studykit). {what_it_models(data_meta)}: a study of what each method "
        "learns, not a chat model.",
        "",
        "## Training",
        "",
        f"- What trained: {what_trained(record)}; {record.trainable_params:,} of {record.total_params:,} parameters "
        f"({record.trainable_percent:.3f}%).",
        f"- Data: {data_meta.get('split_method')}; language(s) {data_meta.get('lang')}, {data_meta.get('seq_len')} "
        f"tokens at most, EOS appended (data fingerprint `{record.training_data_fingerprint}`).",
        f"- Budget: {record.steps:,} optimizer steps of {record.effective_batch} sequences, seed {record.seed}, "
        f"learning rate {config.get('lr'):g} ({config.get('lr_schedule')} after {config.get('warmup_ratio', 0):.0%} "
        f"warmup), {record.optimizer}, precision {record.precision} on {record.device}.",
        f"- Cost: {record.wall_time_seconds:,.0f} s, {record.tokens_per_second:,.0f} tokens/s, peak memory "
        f"{record.peak_memory_bytes / 2**30:.2f} GiB "
        f"({'GPU' if record.peak_memory_kind.startswith('cuda') else 'process RSS'}).",
        "",
        "## Result",
        "",
        (
            f"Final dev loss {record.final_dev_loss:.4f} nats per token (dev perplexity {dev_perplexity:.3f}). The dev "
            "split is carved out of the training conversations; a study's report gives the test split's perplexity "
            "with intervals over seeds and conversation trees."
            if dev_perplexity is not None
            else "No dev loss was recorded."
        ),
        "",
        f"![loss curve]({LOSS_CURVE})",
        "",
        "## Loading it",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
    ]
    here = "<this directory or repo>"
    if adapter:
        body += [
            "from peft import PeftModel",
            "",
            f'base = AutoModelForCausalLM.from_pretrained("{record.base_model}")',
            f'model = PeftModel.from_pretrained(base, "{here}")  # merge_and_unload() folds the adapter in',
        ]
    else:
        body += ["", f'model = AutoModelForCausalLM.from_pretrained("{here}")']
    body += [f'tokenizer = AutoTokenizer.from_pretrained("{here}")']
    body += [
        "```",
        "",
        "## Reproducing it",
        "",
        "`train_config.json` holds every setting (every default filled in) and `run.json` every measurement, the "
        f"library versions and the code version (`{record.versions.get('code')}`) that produced it.",
        "",
    ]
    return "\n".join(metadata + [""] + body)


def what_trained(record: RunRecord) -> str:
    """Full fine-tuning, or LoRA's settings and every module it adapted, by name."""
    if not record.adapted_modules:
        return "every weight (full fine-tuning)"
    lora = record.lora or {}
    variants = [name for name, on in (("rsLoRA", lora.get("use_rslora")), ("DoRA", lora.get("use_dora"))) if on]
    return (
        f"LoRA adapters (rank {lora.get('rank')}, alpha {lora.get('alpha')}, dropout {lora.get('dropout')}"
        f"{', ' + ', '.join(variants) if variants else ''}; targets {lora.get('target_modules')}) on "
        f"{len(record.adapted_modules)} modules: {', '.join(f'`{name}`' for name in record.adapted_modules)}"
    )


def write_model_card(
    directory: Path, record: RunRecord, data_meta: dict[str, Any], log_entries: list[dict[str, Any]]
) -> Path:
    """README.md and its loss curve, into a checkpoint directory (or the staging directory of one: the card is named
    after the run's output directory, not the directory it is written in)."""
    directory = Path(directory)
    name = Path(record.config.get("output_dir") or directory.name).name
    plot_loss_curves({name: log_entries}, directory / LOSS_CURVE)
    path = directory / MODEL_CARD
    path.write_text(model_card(record, data_meta, name), encoding="utf-8")
    return path
