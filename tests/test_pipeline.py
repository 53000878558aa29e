"""The four stages, end to end, as a user runs them: prepare -> full FT -> LoRA -> perplexity."""

import json
import math

import pytest
import torch
from conftest import run_script

from studykit.metrics import score_sequences


@pytest.fixture(scope="module")
def study(tmp_path_factory, tiny_model_dir, oasst_trees_file):
    root = tmp_path_factory.mktemp("study")
    data_dir, checkpoints, results = root / "processed", root / "checkpoints", root / "results"
    budget = ["--max-steps", "4", "--batch-size", "4", "--grad-accum", "2", "--eval-every", "2"]
    stages = {
        "prepare": run_script(
            "data/prepare_oasst.py",
            "--data-file",
            oasst_trees_file,
            "--tokenizer",
            tiny_model_dir,
            "--output-dir",
            data_dir,
            "--seq-len",
            "64",
            "--test-fraction",
            "0.2",
        ),
        "full": run_script(
            "training/train_full_ft.py",
            "--model",
            tiny_model_dir,
            "--data-dir",
            data_dir,
            "--output-dir",
            checkpoints / "full_ft",
            *budget,
        ),
        "lora": run_script(
            "training/train_lora.py",
            "--model",
            tiny_model_dir,
            "--data-dir",
            data_dir,
            "--output-dir",
            checkpoints / "lora_r8",
            "--rank",
            "8",
            *budget,
        ),
        "eval": run_script(
            "evaluation/perplexity.py",
            "--model",
            tiny_model_dir,
            "--data-dir",
            data_dir,
            "--checkpoints",
            checkpoints,
            "--output-dir",
            results,
        ),
    }
    return {
        "root": root,
        "data": data_dir,
        "checkpoints": checkpoints,
        "results": results,
        "stages": stages,
        "model": tiny_model_dir,
    }


def test_each_stage_prints_and_saves_its_config(study):
    assert "PrepareConfig:" in study["stages"]["prepare"].stdout
    assert "TrainConfig:" in study["stages"]["full"].stdout
    assert "LoraTrainConfig:" in study["stages"]["lora"].stdout
    assert "EvalConfig:" in study["stages"]["eval"].stdout
    assert (study["data"] / "prepare_config.json").exists()
    assert json.loads((study["checkpoints"] / "lora_r8" / "train_config.json").read_text())["rank"] == 8
    assert (study["results"] / "eval_config.json").exists()


def test_lora_run_prints_and_records_adapted_modules(study):
    record = json.loads((study["checkpoints"] / "lora_r8" / "run.json").read_text())
    expected = [f"transformer.h.{block}.attn.{name}" for block in range(2) for name in ("c_attn", "c_proj")]
    assert record["adapted_modules"] == expected
    assert all(name in study["stages"]["lora"].stdout for name in expected)
    # r * (in + out) per adapted module on a 64-wide model: c_attn 64 -> 192, c_proj 64 -> 64.
    assert record["trainable_params"] == 2 * 8 * ((64 + 192) + (64 + 64))


def test_both_runs_share_the_budget_and_record_it(study):
    full = json.loads((study["checkpoints"] / "full_ft" / "run.json").read_text())
    lora = json.loads((study["checkpoints"] / "lora_r8" / "run.json").read_text())
    for key in (
        "training_data_fingerprint",
        "dev_fingerprint",
        "seq_len",
        "effective_batch",
        "steps",
        "seed",
        "tokens_seen",
    ):
        assert full[key] == lora[key], key
    assert full["steps"] == 4 and full["effective_batch"] == 8
    assert full["method"] == "full" and lora["method"] == "lora"
    # Both computed the same way, and say how.
    assert (
        full["kernels"]
        == lora["kernels"]
        == {
            "attention": "sdpa",
            "mlp_activation": "tanh GELU, one kernel (replaces gelu_new)",
            "loss": "output layer in chunks (studykit.loss)",
        }
    )
    assert "kernels: attention sdpa, mlp activation tanh GELU" in study["stages"]["full"].stdout
    assert full["trainable_params"] == full["total_params"]
    for record in (full, lora):
        assert record["tokens_per_second"] > 0 and record["peak_memory_bytes"] > 0 and record["wall_time_seconds"] > 0
        assert math.isfinite(record["final_train_loss"]) and math.isfinite(record["final_dev_loss"])
    log = [json.loads(line) for line in (study["checkpoints"] / "full_ft" / "log.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in log if "dev_loss" in entry] == [2, 4]


def test_checkpoints_load_directly_with_transformers_and_peft(study, processed_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    full = AutoModelForCausalLM.from_pretrained(study["checkpoints"] / "full_ft")
    AutoTokenizer.from_pretrained(study["checkpoints"] / "full_ft")
    assert (study["checkpoints"] / "full_ft" / "model.safetensors").exists()
    lora_dir = study["checkpoints"] / "lora_r8"
    assert not (lora_dir / "model.safetensors").exists(), "LoRA saves only the adapter"
    lora = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(study["model"]), lora_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(lora_dir)
    ids = tokenizer("Here is how to water a plant.", return_tensors="pt").input_ids
    base = AutoModelForCausalLM.from_pretrained(study["model"]).eval()
    with torch.no_grad():
        base_logits, full_logits, lora_logits = (model(ids).logits for model in (base, full.eval(), lora))
        merged_logits = lora.merge_and_unload()(ids).logits  # a plain GPT-2 with the adapter folded into its weights
    assert not torch.allclose(full_logits, base_logits) and not torch.allclose(lora_logits, base_logits, atol=1e-6)
    torch.testing.assert_close(merged_logits, lora_logits, rtol=1e-4, atol=1e-4)


def test_evaluation_reports_every_run_and_matches_an_independent_score(study):
    from datasets import load_from_disk
    from transformers import AutoModelForCausalLM

    rows = {row["name"]: row for row in json.loads((study["results"] / "perplexity.json").read_text())}
    assert set(rows) == {"base", "full_ft", "lora_r8"}
    assert [rows[name]["method"] for name in ("base", "full_ft", "lora_r8")] == ["base", "full", "lora"]
    for row in rows.values():
        assert row["perplexity"] == pytest.approx(math.exp(row["nll_sum"] / row["tokens"]))
    test = load_from_disk(str(study["data"]))["test"]["input_ids"]
    assert rows["base"]["tokens"] == sum(len(ids) - 1 for ids in test)
    full = AutoModelForCausalLM.from_pretrained(study["checkpoints"] / "full_ft")
    independent = score_sequences(full, test, 1, torch.device("cpu"), pad_token_id=0)
    assert rows["full_ft"]["perplexity"] == pytest.approx(independent.perplexity, rel=1e-5)
    table = (study["results"] / "results.md").read_text()
    assert "| Method | Trainable params | Perplexity |" in table and "lora_r8" in table
    assert table.strip() in study["stages"]["eval"].stdout


def test_every_flag_shows_its_default_once():
    import re

    from studykit.config import LoraTrainConfig, PrepareConfig, build_parser
    from studykit.study_config import EvalConfig, StudyConfig

    for config_cls in (PrepareConfig, LoraTrainConfig, EvalConfig, StudyConfig):
        text = " ".join(build_parser(config_cls, "").format_help().split())
        flags = re.split(r" (?=--[a-z])", text.split("options:")[1])
        assert all(flag.count("(default:") <= 1 for flag in flags), [
            flag for flag in flags if flag.count("(default:") > 1
        ]
    lora_help = " ".join(build_parser(LoraTrainConfig, "").format_help().split())
    assert "LoRA alpha (default: 2 x rank)" in lora_help and "LoRA rank r (default: 8)" in lora_help
