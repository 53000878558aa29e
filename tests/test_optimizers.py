"""The memory-lean optimizers: bitsandbytes' 8-bit AdamW trains like fp32 AdamW, its state is checkpointed as plain
tensors, an optimizer the machine cannot run is one sentence, a run cannot resume under another optimizer, and the
memory estimate counts each one's state, down to GPT-2 Medium's plan for a 6 GB card."""

import importlib.util
import math
import shutil

import pytest
import torch
from conftest import FULL, REPO_ROOT, refused, train_in_process

from studykit import checkpointing, memory, memory_fit, optimizers, study_plan
from studykit.config import OPTIMIZER_CHOICES, LoraTrainConfig, TrainConfig
from studykit.errors import UserError
from studykit.run_dir import RUN_LOG, RUN_RECORD, read_run_log
from studykit.run_state import RunRecord

GIB = 1024**3
# Per-step relative difference of the training loss, 8-bit against fp32 AdamW, over 36 steps of full fine-tuning
# of the small-vocabulary tiny GPT-2. Measured: 1.9e-4 at most (the final validation loss 1.5e-4 apart).
TRACKING_RTOL = 2e-3


def test_every_optimizer_the_flag_offers_is_built_and_sized():
    assert tuple(optimizers.OPTIMIZERS) == OPTIMIZER_CHOICES


@pytest.fixture(scope="module")
def fp32_and_8bit_runs(small_vocab_inputs, tmp_path_factory):
    root = tmp_path_factory.mktemp("optimizers")
    settings = dict(max_steps=36, eval_every=0, save_every=12, keep=1)
    records = {
        name: train_in_process("full", small_vocab_inputs, root / name, optimizer=name, **settings)
        for name in ("adamw", "adamw8bit")
    }
    return root, records


def test_8bit_adamw_tracks_fp32_adamw(fp32_and_8bit_runs):
    root, records = fp32_and_8bit_runs
    losses = {name: [entry["train_loss"] for entry in read_run_log(root / name / RUN_LOG)] for name in records}
    assert len(losses["adamw8bit"]) == 36
    assert losses["adamw8bit"] == pytest.approx(losses["adamw"], rel=TRACKING_RTOL)
    assert losses["adamw8bit"] != losses["adamw"], "the 8-bit run took fp32 AdamW's steps"
    assert losses["adamw8bit"][-1] < losses["adamw8bit"][0] - 1.0, "it trained"
    validation = {name: record["final_dev_loss"] for name, record in records.items()}
    assert validation["adamw8bit"] == pytest.approx(validation["adamw"], rel=TRACKING_RTOL)


def test_8bit_state_is_checkpointed_as_plain_tensors_and_counted_by_the_estimate(fp32_and_8bit_runs):
    root, records = fp32_and_8bit_runs
    saved = torch.load(root / "adamw8bit" / "resume" / "step-000024" / "optimizer.pt", weights_only=True)
    quantised = [state["__bnb_optimizer_quant_state__"] for state in saved["state"].values()]
    moments = [state["state1"] for state in quantised] + [state["state2"] for state in quantised]
    assert {moment.dtype for moment in moments} == {torch.uint8, torch.float32}, "large tensors 8-bit, small ones fp32"
    estimates = {name: record["memory"]["estimate"] for name, record in records.items()}
    assert estimates["adamw8bit"]["optimizer"] == "adamw8bit"
    trainable = records["adamw"]["trainable_params"]
    assert estimates["adamw"]["optimizer_state"] == 8 * trainable
    assert estimates["adamw8bit"]["optimizer_state"] < 0.5 * estimates["adamw"]["optimizer_state"]
    # The checkpoint holds the state the estimate counts: the moments and their block scales (and bitsandbytes' two
    # 256-entry code tables, shared by every tensor, which the estimate leaves out).
    scales = [state[key] for state in quantised for key in ("absmax1", "absmax2") if key in state]
    assert checkpointing.tensor_bytes(moments + scales) == estimates["adamw8bit"]["optimizer_state"]


def test_run_json_records_the_optimizer_and_the_budget_check_flags_a_different_one(fp32_and_8bit_runs):
    from studykit.comparison import budget_differences

    root, records = fp32_and_8bit_runs
    typed = {name: RunRecord.from_dict(record, name) for name, record in records.items()}
    assert typed["adamw8bit"].optimizer == "adamw8bit" == records["adamw8bit"]["config"]["optimizer"]
    assert budget_differences(typed, "adamw") == {"adamw": {}, "adamw8bit": {"optimizer": "adamw8bit"}}
    earlier = {key: value for key, value in records["adamw"].items() if key != "optimizer"}
    earlier["config"] = {key: value for key, value in earlier["config"].items() if key != "optimizer"}
    assert RunRecord.from_dict(earlier, "an earlier run.json").optimizer == "adamw"


def test_a_run_resumes_only_under_the_optimizer_it_started_with(small_vocab_inputs, tmp_path):
    run_dir = tmp_path / "run"
    train_in_process("full", small_vocab_inputs, run_dir, max_steps=4, save_every=2)
    # What a crash after step 3 leaves: the checkpoint of step 2, no record.
    (run_dir / RUN_RECORD).unlink()
    with pytest.raises(checkpointing.UnusableCheckpoint, match=r"--optimizer \(was adamw, now adamw8bit\)"):
        train_in_process(
            "full", small_vocab_inputs, run_dir, max_steps=4, save_every=2, resume=True, optimizer="adamw8bit"
        )


def test_paged_optimizer_on_a_cpu_is_one_sentence(small_vocab_inputs, tmp_path):
    output_dir = tmp_path / "run"
    line = refused(
        FULL,
        "--model",
        small_vocab_inputs["model"],
        "--data-dir",
        small_vocab_inputs["data"],
        "--output-dir",
        output_dir,
        "--optimizer",
        "paged-adamw8bit",
        watch=[tmp_path],
    )
    assert "needs a CUDA GPU" in line and "--optimizer adamw8bit" in line
    assert not output_dir.exists()


def test_missing_bitsandbytes_is_one_sentence_naming_what_to_install(
    small_vocab_inputs, tmp_path, in_process, monkeypatch
):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *args: None if name == "bitsandbytes" else find_spec(name, *args)
    )
    line = refused(
        FULL,
        "--model",
        small_vocab_inputs["model"],
        "--data-dir",
        small_vocab_inputs["data"],
        "--output-dir",
        tmp_path / "run",
        "--optimizer",
        "adamw8bit",
        watch=[tmp_path],
        runner=in_process,
    )
    assert line == (
        "error: --optimizer adamw8bit needs bitsandbytes, which is not installed; pip install bitsandbytes "
        "(0.50.2 and later run on a CPU too), or use --optimizer adamw."
    )


def test_a_bitsandbytes_without_this_devices_kernels_is_one_sentence(monkeypatch):
    monkeypatch.setattr(torch._C, "_dispatch_has_kernel_for_dispatch_key", lambda op, key: False)
    with pytest.raises(UserError, match=r"has no 8-bit optimizer for cpu; pip install -U bitsandbytes"):
        optimizers.check_runs_here("adamw8bit", torch.device("cpu"))


def test_8bit_optimizers_under_fsdp_are_one_sentence(monkeypatch):
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    with pytest.raises(UserError, match=r"^--optimizer adamw8bit does not run under FSDP; use --optimizer adamw"):
        optimizers.check_runs_here("adamw8bit", torch.device("cpu"))
    optimizers.check_runs_here("adamw", torch.device("cpu"))


def test_the_paged_optimizer_pages_its_loaded_state_again(monkeypatch):
    """bitsandbytes' own load_state_dict would leave a resumed run's moments in ordinary GPU memory. Paging needs
    CUDA, so here a buffer marked as paged stands in for one from CUDA's unified memory."""
    torch.manual_seed(0)
    model = torch.nn.Linear(512, 256)
    config = TrainConfig(optimizer="paged-adamw8bit")
    first = optimizers.build_paged_adamw8bit([{"params": list(model.parameters())}], config, torch.device("cpu"))
    model(torch.randn(4, 512)).square().sum().backward()
    with pytest.warns(UserWarning, match="not supported on CPU"):
        first.step()
    saved = first.state_dict()

    resumed = optimizers.build_paged_adamw8bit([{"params": list(model.parameters())}], config, torch.device("cpu"))

    def paged_buffer(parameter, dtype=torch.float32):
        buffer = torch.zeros_like(parameter, dtype=dtype)
        buffer.is_paged = parameter.numel() >= optimizers.BNB_MIN_PAGED_SIZE
        return buffer

    monkeypatch.setattr(resumed, "get_state_buffer", paged_buffer)
    resumed.load_state_dict(saved)
    weight_state = resumed.state[model.weight]
    assert all(getattr(weight_state[key], "is_paged", False) for key in ("state1", "state2"))
    for key in ("state1", "state2"):
        assert torch.equal(weight_state[key], first.state[model.weight][key])
    assert not getattr(resumed.state[model.bias]["state1"], "is_paged", False), "small moments are never paged"


def test_state_bytes_per_tensor_by_hand():
    assert optimizers.adamw_state_bytes(1000) == (8000, 0)
    assert optimizers.adamw8bit_state_bytes(4095) == (4095 * 8, 0)  # below min_8bit_size: fp32 moments
    assert optimizers.adamw8bit_state_bytes(4096) == (2 * (4096 + 4 * 16), 0)  # 16 blocks of 256, one fp32 scale each
    assert optimizers.adamw8bit_state_bytes(4097) == (2 * (4097 + 4 * 17), 0)
    assert optimizers.paged_adamw8bit_state_bytes(99_999) == optimizers.adamw8bit_state_bytes(99_999)
    assert optimizers.paged_adamw8bit_state_bytes(100_000) == (2 * 4 * 391, 200_000)  # scales stay, moments are paged


def gpt2_medium(config):
    return study_plan.estimate_for_plan(config, study_plan.planning_config("gpt2-medium"), 512)


def test_gpt2_medium_full_fine_tuning_fits_six_gib_with_8bit_adamw_and_checkpointing():
    """docs/memory.md's plan: the defaults (fp16, micro-batch 8 x 512 tokens), built on the meta device."""
    plan = {
        optimizer: gpt2_medium(TrainConfig(optimizer=optimizer, gradient_checkpointing=True))
        for optimizer in OPTIMIZER_CHOICES
    }
    card = 6 * GIB - study_plan.CUDA_CONTEXT_BYTES
    assert plan["adamw8bit"].total <= card < plan["adamw"].total, plan["adamw8bit"].describe()
    assert plan["paged-adamw8bit"].total < plan["adamw8bit"].total
    # GPT-2 Medium: 354,823,168 weights (lm_head tied to wte); 8 bytes of AdamW state each, about 2 with 8-bit moments.
    assert plan["adamw"].weights == 4 * 354_823_168 and plan["adamw"].optimizer_state == 8 * 354_823_168
    assert 2.0 < plan["adamw8bit"].optimizer_state / 354_823_168 < 2.1
    assert plan["paged-adamw8bit"].optimizer_state_paged > 0.9 * 2 * 354_823_168
    assert "8-bit AdamW" in plan["adamw8bit"].describe()
    assert "paged optimizer state" in plan["paged-adamw8bit"].describe()
    assert gpt2_medium(TrainConfig(optimizer="adamw8bit")).total > card, "without checkpointing Medium does not fit"
    assert gpt2_medium(LoraTrainConfig(gradient_checkpointing=True)).total <= card


def test_auto_batch_on_the_estimate_counts_the_optimizers_state():
    """--auto-batch on a CPU, GPT-2 Medium without checkpointing capped at 6 GiB: the largest micro-batch whose
    estimate fits, with more accumulation for the same effective batch. fp32 AdamW's state alone leaves no room."""
    cap = 6 * GIB
    config = TrainConfig(optimizer="adamw8bit")

    def estimate_at(batch_size, config=config):
        return gpt2_medium(memory_fit.with_micro_batch(config, batch_size))

    chosen = memory_fit.largest_fitting_by_estimate(config, estimate_at, cap)
    assert 1 < chosen < config.batch_size
    assert estimate_at(chosen).total <= cap < estimate_at(2 * chosen).total
    assert memory_fit.with_micro_batch(config, chosen).effective_batch == config.effective_batch
    adamw = TrainConfig(optimizer="adamw")
    assert gpt2_medium(memory_fit.with_micro_batch(adamw, 1)).total > cap


def test_medium_study_dry_run_says_what_each_run_needs_offline(tmp_path, capsys, monkeypatch):
    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    run_study(
        StudyConfig(
            config=str(REPO_ROOT / "studies" / "medium.toml"), output_dir=str(tmp_path / "medium"), dry_run=True
        )
    )
    printed = capsys.readouterr().out.splitlines()
    lines = {line.split()[1]: line for line in printed if line.strip().startswith("memory ")}
    assert sorted(lines) == ["full_ft", "lora_r32", "lora_r8"]
    assert all("fits a 6 GB card" in line and "adamw8bit" in line for line in lines.values()), lines
    needs = {name: float(line.split("needs ")[1].split(" GiB")[0]) for name, line in lines.items()}
    assert needs["lora_r8"] < needs["lora_r32"] < needs["full_ft"] < 5.5
    assert not (tmp_path / "medium").exists()


def test_a_dry_run_without_the_base_models_config_says_so_in_one_line(tmp_path, capsys):
    from studykit.study import run_study
    from studykit.study_config import StudyConfig

    study = tmp_path / "study.toml"
    text = (REPO_ROOT / "studies" / "medium.toml").read_text()
    text = text.replace('model = "gpt2-medium"', 'model = "someone/unknown-model"')
    study.write_text(text)
    run_study(StudyConfig(config=str(study), output_dir=str(tmp_path / "out"), dry_run=True))
    printed = capsys.readouterr().out.splitlines()
    memory_lines = [line.split(None, 1) for line in printed if line.strip().startswith("memory")]
    assert memory_lines == [
        [
            "memory",
            "not estimated: 'someone/unknown-model' is neither a GPT-2 size the kit knows "
            "nor a local model directory (yet)",
        ]
    ]


def test_planning_config_reads_a_local_model_directory(small_vocab_inputs, tmp_path):
    config = study_plan.planning_config(str(small_vocab_inputs["model"]))
    assert (config.n_layer, config.n_embd, config.vocab_size) == (2, 64, 300)
    assert study_plan.planning_config(str(tmp_path)) is None
    shutil.copy(small_vocab_inputs["model"] / "config.json", tmp_path / "config.json")
    assert study_plan.planning_config(str(tmp_path)).n_embd == 64
    assert study_plan.planning_config("openai-community/gpt2-xl").n_layer == 48
    assert math.isclose(memory.gib(study_plan.CUDA_CONTEXT_BYTES), 0.5)
