"""Side-by-side samples: greedy continuations of held-out opening prompts by the base model and by every run."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

from studykit.data import CONTEXT_SEPARATOR
from studykit.io import atomic_write_text, read_json
from studykit.study_file import Study


def write_samples(study: Study, run_dirs: dict[str, Path]) -> Path:
    """samples.md in the study's results directory: the base model and each run (the training in `run_dirs`)."""
    prompts_file = study.data_dir / "prompts.json"
    path = study.results_dir / "samples.md"
    if not prompts_file.exists():
        atomic_write_text(
            path, "# Side-by-side samples\n\nThe processed data has no prompts.json; prepare it again to get samples.\n"
        )
        return path
    prompts = read_json(
        prompts_file, f"delete {study.data_dir} and run the study again: it prepares the data again", expect=list
    )[: study.report.sample_prompts]
    continuations = generate_continuations(study, run_dirs, prompts, study.report.sample_new_tokens)
    atomic_write_text(
        path, format_samples_markdown(prompts, continuations, study.report.sample_new_tokens, study.prepare.context)
    )
    return path


def generate_continuations(
    study: Study, run_dirs: dict[str, Path], prompts: Sequence[dict[str, str]], max_new_tokens: int
) -> dict[str, list[str]]:
    """Greedy continuations of each prompt by the base model and by every run."""
    import torch

    from studykit.modeling import (
        load_base_model,
        load_checkpoint_for_eval,
        load_tokenizer,
        model_context_length,
    )
    from studykit.runtime import default_device

    trust_remote_code = study.eval.trust_remote_code
    tokenizer = load_tokenizer(study.eval.tokenizer or study.model, "--tokenizer", trust_remote_code)
    device = default_device()
    targets = {"base": None, **run_dirs}
    continuations = {}
    for name, path in targets.items():
        model = (
            load_base_model(study.model, "--model", trust_remote_code)
            if path is None
            else load_checkpoint_for_eval(path, study.model, trust_remote_code)
        )
        model.to(device).eval()
        room = model_context_length(model) - max_new_tokens
        texts = []
        for prompt in prompts:
            # The separator prepare puts between a prompt and its response under --context parent; under none the
            # models saw responses alone, and a blank line likewise starts a text of its own.
            prompt_text = prompt["text"].strip() + CONTEXT_SEPARATOR
            prompt_ids = tokenizer(prompt_text, add_special_tokens=False)["input_ids"][-room:]
            input_ids = torch.tensor([prompt_ids], device=device)
            with torch.no_grad():
                output = model.generate(
                    input_ids=input_ids,
                    attention_mask=torch.ones_like(input_ids),
                    max_new_tokens=max_new_tokens,
                    do_sample=False,
                    pad_token_id=tokenizer.pad_token_id,
                    # The tokenizer's EOS ends a response in the data, whatever the model's config says.
                    eos_token_id=tokenizer.eos_token_id,
                )
            texts.append(tokenizer.decode(output[0, len(prompt_ids) :], skip_special_tokens=True))
        continuations[name] = texts
        del model
    return continuations


# What samples.md says the runs were trained on, by [data] context.
TRAINED_ON = {
    "none": "The models were trained on assistant responses alone, never on a prompt followed by its answer, so this "
    "shows each model's style of text, not instruction following.",
    "parent": "The runs were trained on each assistant response after the prompt it answers (the loss on the response "
    "only), so this shows how they answer a prompt; the base model was never trained so.",
}


def format_samples_markdown(
    prompts: Sequence[dict[str, str]], continuations: dict[str, list[str]], max_new_tokens: int, context: str = "none"
) -> str:
    lines = [
        "# Side-by-side samples",
        "",
        f"Greedy continuations ({max_new_tokens} new tokens at most) of the opening prompts of held-out conversation "
        f"trees. {TRAINED_ON[context]}",
        "",
    ]
    for index, prompt in enumerate(prompts):
        lines += [f"## Prompt {index + 1} (tree {prompt['message_tree_id']})", "", quote(prompt["text"]), ""]
        for name, texts in continuations.items():
            lines += [f"**{name}**", "", quote(texts[index]), ""]
    return "\n".join(lines)


def quote(text: str) -> str:
    return "\n".join(
        "> " + line for line in (text.strip() or "(no text: the model ended it at once with EOS)").splitlines()
    )
