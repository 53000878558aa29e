"""The analysis's per-model parts, each computed once and kept while its inputs hold: a model's per-response,
per-bucket test NLL (one scoring pass), a training's weight change (SVDs), and a LoRA training's mitigation curve
(a scoring pass of the test split and the general text per lambda).

A part's inputs are the training's own inputs (study_state.training_inputs), the data's fingerprint, the settings
that change what the part computes and the code that computes it; a retrained run recomputes its parts alone.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from studykit.data import load_processed, split_prompt_lengths
from studykit.gap_buckets import (
    BucketFamily,
    bucket_sums,
    frequency_family,
    length_edges,
    length_family,
    position_family,
    training_target_counts,
)
from studykit.io import atomic_file, atomic_write_json, read_json
from studykit.loss import resolve_loss_kernel, use_loss_kernel
from studykit.metrics import score_sequences
from studykit.modeling import load_base_model, load_checkpoint_for_eval, load_tokenizer
from studykit.response_scores import load_per_response
from studykit.runtime import autocast_for, default_device, stage_code_version
from studykit.study_file import Study, Training
from studykit.study_state import digest, is_current, mark_current, outcome_settings, training_inputs
from studykit.token_scoring import response_targets, score_tokens
from studykit.weight_change import (
    BaseSpectra,
    adapted_weight_changes,
    block_linear_weights,
    module_changes,
    scaled_intruders,
)

PARTS_DIR = "analysis_parts"
BASE = "base"


@dataclass
class AnalysisData:
    """The test split as the analysis scores it, and the bucket families sorted by the training split."""

    sequences: list[list[int]]
    prompt_lengths: list[int]
    targets: list[np.ndarray]
    message_ids: list[str]
    tree_ids: list[str]
    families: list[BucketFamily]
    fingerprint: str


def load_analysis_data(study: Study) -> AnalysisData:
    data = load_processed(study.data_dir)
    train_prompts = split_prompt_lengths(data.train)
    train_targets = [response_targets(ids, prompt) for ids, prompt in zip(data.train["input_ids"], train_prompts)]
    sequences = [list(ids) for ids in data.test["input_ids"]]
    prompts = split_prompt_lengths(data.test)
    targets = [response_targets(ids, prompt) for ids, prompt in zip(sequences, prompts)]
    vocab = 1 + max(max((int(t.max()) for t in train_targets if len(t)), default=0), max(int(t.max()) for t in targets))
    counts = training_target_counts(train_targets, vocab)
    families = [
        frequency_family(targets, counts),
        position_family(targets),
        length_family(targets, length_edges([len(t) for t in train_targets])),
    ]
    return AnalysisData(
        sequences,
        prompts,
        targets,
        list(data.test["message_id"]),
        list(data.test["message_tree_id"]),
        families,
        data.meta["fingerprint"],
    )


class ModelScorer:
    """Loads and scores models as evaluation does: its device, precision, loss kernel and padding."""

    def __init__(self, study: Study):
        self.study = study
        self.device = default_device()
        self.autocast = autocast_for(self.device, study.eval.precision)
        self.kernel = resolve_loss_kernel(study.eval.loss_kernel, self.device.type)
        self.tokenizer = load_tokenizer(
            study.eval.tokenizer or study.model, "--tokenizer", study.eval.trust_remote_code
        )
        self._extra: Optional[list[list[int]]] = None

    def load(self, training: Optional[Training]):
        if training is None:
            model = load_base_model(self.study.model, "--model", self.study.eval.trust_remote_code)
        else:
            model = load_checkpoint_for_eval(
                Path(training.config.output_dir), self.study.model, self.study.eval.trust_remote_code
            )
        return model

    def ready(self, model):
        model.to(self.device)
        use_loss_kernel(model, self.kernel)
        return model

    def token_nll(self, model, data: AnalysisData) -> list[np.ndarray]:
        return score_tokens(
            self.ready(model),
            data.sequences,
            self.study.eval.batch_size,
            self.device,
            self.tokenizer.pad_token_id,
            self.autocast,
            self.study.eval.pad_to_multiple_of,
            data.prompt_lengths,
        )

    def totals(self, model, sequences, prompt_lengths=None) -> tuple[float, int]:
        scores = score_sequences(
            self.ready(model),
            sequences,
            self.study.eval.batch_size,
            self.device,
            self.tokenizer.pad_token_id,
            self.autocast,
            pad_to_multiple_of=self.study.eval.pad_to_multiple_of,
            prompt_lengths=prompt_lengths,
        )
        return scores.nll_sum, scores.tokens

    def extra_sequences(self, seq_len: int) -> Optional[list[list[int]]]:
        if not self.study.eval.extra_eval:
            return None
        if self._extra is None:
            from studykit.evaluate import load_extra_eval

            self._extra = load_extra_eval(self.study.eval.extra_eval, self.tokenizer, seq_len)
        return self._extra


def part_inputs(study: Study, data: AnalysisData, training: Optional[Training], kind: str, fingerprint: str) -> dict:
    """What one part depends on: the model (the base, or the training's inputs), the data, the settings, the code."""
    model = (
        {"base_model": study.model}
        if training is None
        else {"training": digest(training_inputs(training, fingerprint)), "base_model": study.model}
    )
    settings: dict[str, Any] = {"eval": outcome_settings(study.eval)}
    # Only the settings a part reads: a new lambda grid leaves the weight parts as they are.
    if kind != "tokens":
        settings["intruders"] = {"top_k": study.analysis.intruder_top_k, "epsilon": study.analysis.intruder_epsilon}
    if kind == "mitigation":
        settings["lambdas"] = list(study.analysis.mitigation_lambdas)
    return {
        "kind": kind,
        **model,
        "data_fingerprint": data.fingerprint,
        **settings,
        "code": stage_code_version("studykit.analysis_parts"),
    }


def part_path(study: Study, name: str, kind: str, suffix: str) -> Path:
    return study.results_dir / PARTS_DIR / f"{name}.{kind}.{suffix}"


def _save_npz(path: Path, arrays: dict[str, np.ndarray]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as temp:
        np.savez(temp, **arrays)


def token_part(study: Study, data: AnalysisData, scorer: ModelScorer, model, name: str) -> None:
    """Per response, per bucket of every family: the model's NLL sum (the bucket token counts come from the data)."""
    nll = scorer.token_nll(model, data)
    arrays = {family.name: bucket_sums(nll, family) for family in data.families}
    arrays["response_nll"] = np.array([values.sum() for values in nll])
    _save_npz(part_path(study, name, "tokens", "npz"), arrays)


def weight_part(
    study: Study, base: BaseSpectra, model, training: Training, keep_directions: int, device: torch.device
) -> None:
    """Every adapted module's change (full FT: every block linear layer): singular values, effective rank, rank_90,
    intruders, and the leading left singular vectors."""
    if training.method == "lora":
        _, deltas = adapted_weight_changes(model, base.weights)
    else:
        deltas = {name: weight.to(device) - base.weights[name] for name, weight in block_linear_weights(model).items()}
    changes = module_changes(
        deltas, base, study.analysis.intruder_top_k, study.analysis.intruder_epsilon, keep_directions
    )
    arrays: dict[str, np.ndarray] = {"modules": np.array(sorted(changes))}
    for name, change in changes.items():
        arrays[f"{name}/singular_values"] = change.singular_values.cpu().numpy()
        arrays[f"{name}/left"] = change.left.cpu().numpy().astype(np.float16)
        arrays[f"{name}/intruders"] = np.array(change.intruders, dtype=np.int64)
        arrays[f"{name}/effective_rank"] = np.array(change.effective_rank)
        arrays[f"{name}/rank_90"] = np.array(change.rank_90)
    _save_npz(part_path(study, training.name, "weights", "npz"), arrays)


def mitigation_part(
    study: Study, data: AnalysisData, scorer: ModelScorer, base: BaseSpectra, model, training: Training, seq_len: int
) -> None:
    """The LoRA training's merged weights with the intruder directions scaled by each lambda, scored on the test split
    and the general text (totals)."""
    from transformers.pytorch_utils import Conv1D

    merged, deltas = adapted_weight_changes(model, base.weights)
    modules = dict(merged.named_modules())
    trained = {name: base.weights[name] + delta for name, delta in deltas.items()}
    extra = scorer.extra_sequences(seq_len)
    points = []
    for scale in study.analysis.mitigation_lambdas:
        intruders = 0
        for name, weight in trained.items():
            scaled = scaled_intruders(
                base.weights[name],
                weight,
                scale,
                study.analysis.intruder_top_k,
                study.analysis.intruder_epsilon,
                base.left(name),
            )
            intruders += int(not torch.equal(scaled, weight))
            module = modules[name]
            stored = scaled.T if isinstance(module, Conv1D) else scaled
            with torch.no_grad():
                module.weight.copy_(stored.to(module.weight.dtype))
        test_nll, test_tokens = scorer.totals(merged, data.sequences, data.prompt_lengths)
        point = {"lambda": scale, "test_nll": test_nll, "test_tokens": test_tokens, "modules_changed": intruders}
        if extra is not None:
            point["extra_nll"], point["extra_tokens"] = scorer.totals(merged, extra)
        points.append(point)
    atomic_write_json(part_path(study, training.name, "mitigation", "json"), points)


def update_parts(
    study: Study,
    data: AnalysisData,
    chosen: dict[str, list[Training]],
    mitigated: list[Training],
    fingerprint: str,
    seq_len: int,
) -> list[str]:
    """Compute every part that is not current; returns what was computed, as "name.kind"."""
    computed: list[str] = []
    parts_dir = study.results_dir / PARTS_DIR
    parts_dir.mkdir(parents=True, exist_ok=True)
    lora_ranks = [t.config.rank for trainings in chosen.values() for t in trainings if t.method == "lora"]
    keep_directions = max(lora_ranks, default=8)

    def current(name: str, kind: str, inputs: dict, suffix: str) -> bool:
        return is_current(parts_dir, inputs, f"{name}.{kind}.{suffix}", f"{name}.{kind}.inputs.json")

    scorer: Optional[ModelScorer] = None
    base_spectra: Optional[BaseSpectra] = None
    trainings: list[Optional[Training]] = [None] + [t for ts in chosen.values() for t in ts]
    for training in trainings:
        name = BASE if training is None else training.name
        wanted = []
        for kind, suffix in (("tokens", "npz"), ("weights", "npz"), ("mitigation", "json")):
            if kind == "weights" and training is None:
                continue
            if kind == "mitigation" and training not in mitigated:
                continue
            inputs = part_inputs(study, data, training, kind, fingerprint)
            if not current(name, kind, inputs, suffix):
                wanted.append((kind, inputs))
        if not wanted:
            continue
        scorer = scorer or ModelScorer(study)
        if base_spectra is None and training is not None:
            base_model = scorer.load(None)
            # SVDs on the scoring device: on a GPU a GPT-2 Small training's take seconds.
            base_spectra = BaseSpectra(
                {name: weight.to(scorer.device) for name, weight in block_linear_weights(base_model).items()}
            )
            del base_model
        for kind, inputs in wanted:
            print(f"analysis: {kind} of {name}")
            # A fresh model per part: the mitigation merges the adapter into its base in place.
            model = scorer.load(training)
            if kind == "tokens":
                token_part(study, data, scorer, model, name)
            elif kind == "weights":
                weight_part(study, base_spectra, model, training, keep_directions, scorer.device)
            else:
                mitigation_part(study, data, scorer, base_spectra, model.to(scorer.device), training, seq_len)
            del model
            mark_current(parts_dir, inputs, f"{name}.{kind}.inputs.json")
            computed.append(f"{name}.{kind}")
    return computed


def load_token_part(study: Study, name: str) -> dict[str, np.ndarray]:
    return load_per_response(part_path(study, name, "tokens", "npz"))


def load_weight_part(study: Study, name: str) -> dict[str, np.ndarray]:
    return load_per_response(part_path(study, name, "weights", "npz"))


def load_mitigation_part(study: Study, name: str) -> list[dict[str, Any]]:
    return read_json(part_path(study, name, "mitigation", "json"), expect=list)
