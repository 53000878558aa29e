"""The kit among the tools people already use: experiment trackers (--report-to), a model card in every finished
checkpoint, and uploads to the Hugging Face Hub (--push-to-hub). Offline: the Hub client is a stand-in."""

import dataclasses
import math
from pathlib import Path

import pytest
from conftest import ONE_RUN_TRAINING, one_run_study, train_in_process

from studykit import hub_upload, trackers
from studykit.config import OUTCOME_NEUTRAL, RESUME_MAY_CHANGE, LoraTrainConfig, TrainConfig
from studykit.errors import UserError
from studykit.model_card import LOSS_CURVE, MODEL_CARD, model_card
from studykit.run_dir import RUN_LOG, RUN_RECORD, load_run_record, read_run_log
from studykit.study_file import Training, load_study
from studykit.study_state import digest, training_inputs

LOGGED = ("train_loss", "lr", "grad_norm", "tokens_per_second", "tokens_seen", "dev_loss")


def tensorboard_scalars(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """Every scalar the run's TensorBoard directory holds, as TensorBoard itself reads it back (purged events
    dropped)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run_dir = trackers.tensorboard_run_directory(output_dir)
    assert run_dir is not None and run_dir == output_dir / "tensorboard" / output_dir.name
    events = EventAccumulator(str(run_dir), size_guidance={"scalars": 0})
    events.Reload()
    return {tag: [(event.step, event.value) for event in events.Scalars(tag)] for tag in events.Tags()["scalars"]}


def logged_scalars(output_dir: Path, key: str) -> list[tuple[int, float]]:
    return [(entry["step"], entry[key]) for entry in read_run_log(output_dir / RUN_LOG) if key in entry]


def assert_tensorboard_matches_the_log(output_dir: Path) -> dict[str, list[tuple[int, float]]]:
    scalars = tensorboard_scalars(output_dir)
    for key in LOGGED:
        logged = logged_scalars(output_dir, key)
        assert [step for step, _ in scalars[key]] == [step for step, _ in logged], key
        # TensorBoard keeps scalars as float32.
        assert [value for _, value in scalars[key]] == pytest.approx([value for _, value in logged], rel=1e-6), key
    return scalars


# ---------------------------------------------------------------------------------------------------------
# Trackers
# ---------------------------------------------------------------------------------------------------------


def test_tensorboard_gets_every_log_line_at_its_step(small_vocab_inputs, tmp_path):
    output_dir = tmp_path / "full_tb"
    train_in_process("full", small_vocab_inputs, output_dir, report_to="tensorboard")
    scalars = assert_tensorboard_matches_the_log(output_dir)
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3, 4, 5, 6]
    assert [step for step, _ in scalars["dev_loss"]] == [3, 6]
    # The event files belong to the run, never to the model that is uploaded.
    assert not any(name.startswith("tensorboard/") for name in hub_upload.upload_plan(output_dir))
    assert load_run_record(output_dir).config["report_to"] == "tensorboard"


def test_a_resumed_run_continues_the_same_tensorboard_run_and_draws_every_step_once(
    small_vocab_inputs, tmp_path, monkeypatch
):
    output_dir = tmp_path / "crashed"
    log = trackers.Trackers.log

    # A crash once step 3 is logged, with the last checkpoint at step 2: TensorBoard already holds step 3.
    def log_then_crash(self, entry):
        log(self, entry)
        if entry["step"] == 3:
            raise RuntimeError("the machine went away")

    monkeypatch.setattr(trackers.Trackers, "log", log_then_crash)
    with pytest.raises(RuntimeError):
        train_in_process("full", small_vocab_inputs, output_dir, save_every=2, report_to="tensorboard")
    monkeypatch.undo()
    first = trackers.tensorboard_run_directory(output_dir)
    assert [step for step, _ in tensorboard_scalars(output_dir)["train_loss"]] == [1, 2, 3]

    train_in_process("full", small_vocab_inputs, output_dir, save_every=2, resume=True, report_to="tensorboard")

    assert [path.name for path in (output_dir / "tensorboard").iterdir()] == [output_dir.name]
    assert trackers.tensorboard_run_directory(output_dir) == first
    assert len(list(first.glob("events.out.tfevents.*"))) == 2, "one event file per start, in one run directory"
    scalars = assert_tensorboard_matches_the_log(output_dir)
    assert [step for step, _ in scalars["train_loss"]] == [1, 2, 3, 4, 5, 6]


def test_a_resumed_run_continues_the_tracker_run_its_first_start_noted(tmp_path):
    run, new = trackers.tracker_run(tmp_path, "wandb", resuming=False)
    assert new and run["run_name"] == tmp_path.name
    (tmp_path / trackers.TRACKER_RUN_FILE).write_text('{"tracker": "wandb", "run_name": "x", "run_id": "abc123"}')
    again, new = trackers.tracker_run(tmp_path, "wandb", resuming=True)
    assert not new and trackers.init_kwargs(again, tmp_path, 4)["wandb"]["id"] == "abc123"
    # Another tracker on resume starts its own run; MLflow reopens its run by the id it gave it.
    assert trackers.tracker_run(tmp_path, "mlflow", resuming=True)[1]
    assert trackers.init_kwargs({"tracker": "mlflow", "run_name": "x", "mlflow_run_id": "r1"}, tmp_path, 4) == {
        "mlflow": {"run_id": "r1"}
    }
    assert trackers.init_kwargs({"tracker": "tensorboard", "run_name": "x"}, tmp_path, 4) == {
        "tensorboard": {"purge_step": 5}
    }
    (tmp_path / trackers.TRACKER_RUN_FILE).write_text("{torn")
    assert trackers.tracker_run(tmp_path, "wandb", resuming=True)[1], "a damaged note starts a new tracker run"


def test_report_to_is_outcome_neutral_for_the_study_and_for_resume(tmp_path):
    assert "report_to" in OUTCOME_NEUTRAL and "report_to" in RESUME_MAY_CHANGE and "push_to_hub" in OUTCOME_NEUTRAL
    study_file = one_run_study(tmp_path / "study.toml")
    tracked_file = tmp_path / "tracked.toml"
    tracked_file.write_text(study_file.read_text().replace("[budget]\n", '[budget]\nreport_to = "tensorboard"\n', 1))
    plain, tracked = (load_study(path, str(tmp_path / "out")) for path in (study_file, tracked_file))
    plain_training, tracked_training = (
        study.replicate_trainings(study.runs[0], study.runs[0].learning_rates[0])[0] for study in (plain, tracked)
    )
    assert tracked_training.name == plain_training.name == ONE_RUN_TRAINING
    assert (tracked_training.config.report_to, plain_training.config.report_to) == ("tensorboard", "none")
    assert digest(training_inputs(tracked_training, "fp")) == digest(training_inputs(plain_training, "fp"))
    changed = Training("full_ft", "full", 1e-3, 0, dataclasses.replace(plain_training.config, lr=2e-3))
    assert digest(training_inputs(changed, "fp")) != digest(training_inputs(plain_training, "fp")), "the check can fail"


def test_a_study_file_cannot_push_every_training_to_one_repo(tmp_path):
    study_file = one_run_study(tmp_path / "study.toml")
    study_file.write_text(study_file.read_text().replace("[budget]\n", '[budget]\npush_to_hub = "org/x"\n', 1))
    with pytest.raises(UserError, match="push_to_hub"):
        load_study(study_file, str(tmp_path / "out"))


def test_a_missing_tracker_package_is_one_sentence_before_any_work(small_vocab_inputs, tmp_path, monkeypatch):
    real_find_spec = trackers.importlib.util.find_spec
    monkeypatch.setattr(
        trackers.importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real_find_spec(name, *a)
    )
    with pytest.raises(UserError) as refused:
        train_in_process("full", small_vocab_inputs, tmp_path / "run", report_to="wandb")
    message = str(refused.value)
    assert len(message.splitlines()) == 1 and "pip install wandb" in message and "--report-to none" in message
    assert not (tmp_path / "run").exists(), "nothing was written"
    trackers.check_tracker_installed("none")


# ---------------------------------------------------------------------------------------------------------
# The model card
# ---------------------------------------------------------------------------------------------------------


def card_metadata(text: str) -> dict[str, list[str]]:
    """The card's YAML front matter, read as simple lines (no YAML package needed): each top-level key and the
    indented or list lines under it. Fails on a line that is neither."""
    lines = text.splitlines()
    assert lines[0] == "---"
    end = lines.index("---", 1)
    metadata: dict[str, list[str]] = {}
    key = None
    for line in lines[1:end]:
        if line.startswith(("-", " ")):
            assert key is not None, line
            metadata[key].append(line.strip())
        else:
            key, separator, value = line.partition(": ") if ": " in line else line.partition(":")
            assert separator and key.replace("_", "").replace("-", "").isalnum(), line
            metadata[key] = [value] if value else []
    return metadata


@pytest.mark.parametrize("method", ["full", "lora"])
def test_every_final_checkpoint_gets_a_model_card_with_its_loss_curve(method, small_vocab_inputs, tmp_path):
    output_dir = tmp_path / method
    record = train_in_process(method, small_vocab_inputs, output_dir)
    text = (output_dir / MODEL_CARD).read_text()
    metadata = card_metadata(text)
    assert metadata["library_name"] == ["peft" if method == "lora" else "transformers"]
    assert (
        "- studykit" in metadata["tags"]
        and ("- lora" if method == "lora" else "- full-fine-tuning") in metadata["tags"]
    )
    # A local base model is never named in the Hub's metadata (it would refuse the path); the text names it.
    assert "base_model" not in metadata and f"`{small_vocab_inputs['model']}`" in text
    perplexity = next(line for line in metadata["model-index"] if line.startswith("value: "))
    assert float(perplexity.split(": ")[1]) == pytest.approx(math.exp(record["final_dev_loss"]), rel=1e-4)
    assert f"{record['trainable_params']:,} of {record['total_params']:,} parameters" in text
    assert (
        f"{record['steps']:,} optimizer steps of {record['effective_batch']} sequences, seed {record['seed']}" in text
    )
    assert f"{record['seq_len']} tokens at most" in text and "test split" in text
    assert f"![loss curve]({LOSS_CURVE})" in text and (output_dir / LOSS_CURVE).read_bytes()[:4] == b"\x89PNG"
    if method == "lora":
        assert record["adapted_modules"] and all(f"`{name}`" in text for name in record["adapted_modules"])
        assert "PeftModel.from_pretrained" in text
        # peft's placeholder card, which save_pretrained writes beside an adapter, is gone.
        assert "[More Information Needed]" not in text
    else:
        assert "every weight (full fine-tuning)" in text and "AutoModelForCausalLM.from_pretrained(" in text
    assert not list(output_dir.glob(".final*")), "the card was written in the final save's staging"


def test_the_card_names_hub_models_and_datasets_in_its_metadata(small_vocab_inputs, tmp_path):
    output_dir = tmp_path / "lora_r8"
    train_in_process("lora", small_vocab_inputs, output_dir)
    record = dataclasses.replace(load_run_record(output_dir), base_model="gpt2")
    metadata = card_metadata(model_card(record, {"source": "hub:OpenAssistant/oasst1", "seq_len": 512}, "lora_r8"))
    assert metadata["base_model"] == ["gpt2"] and metadata["datasets"] == ["- OpenAssistant/oasst1"]
    assert "- name: lora_r8" in metadata["model-index"] and "split: dev" in metadata["model-index"]
    # What the model was trained to model follows prepare's --context.
    alone = model_card(record, {"source": "hub:OpenAssistant/oasst1", "context": "none"}, "lora_r8")
    after_prompts = model_card(record, {"source": "hub:OpenAssistant/oasst1", "context": "parent"}, "lora_r8")
    assert "on their own, without their prompts" in alone and "without their prompts" not in after_prompts
    assert "after the prompter message it answers" in after_prompts


# ---------------------------------------------------------------------------------------------------------
# Uploads to the Hub
# ---------------------------------------------------------------------------------------------------------


class RecordingApi:
    """Stands in for huggingface_hub.HfApi: records what would be created and uploaded."""

    def __init__(self, fails: bool = False) -> None:
        self.calls, self.fails = [], fails

    def create_repo(self, repo_id, repo_type=None, exist_ok=False):
        if self.fails:
            raise OSError(
                "401 Client Error: Unauthorized for url: https://huggingface.co/api/repos/create\nmore detail"
            )
        self.calls.append(("create_repo", repo_id, repo_type, exist_ok))
        return f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo_id}"

    def upload_folder(self, **kwargs):
        self.calls.append(("upload_folder", kwargs))


def run_directory_with_bookkeeping(root: Path) -> Path:
    for name in (
        "model.safetensors",
        "README.md",
        "loss_curve.png",
        "run.json",
        "resume/step-000002/model.safetensors",
        "resume/step-000004.diverged/optimizer.pt",
        "resume/step-000006.partial-77/rng.pt",
        ".final.partial-12/vocab.json",
        "model.safetensors.partial-12",
        ".studykit.lock",
        ".study_inputs_started.json",
        ".tracker_run.json",
        "tensorboard/run/events.out.tfevents.1",
        "sub/.hidden",
    ):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text("x")
    return root


def test_the_upload_leaves_out_checkpoints_partial_writes_hidden_files_and_event_files(tmp_path):
    from huggingface_hub.utils import filter_repo_objects

    folder = run_directory_with_bookkeeping(tmp_path / "run")
    assert hub_upload.upload_plan(folder) == ["README.md", "loss_curve.png", "model.safetensors", "run.json"]
    # The same list huggingface_hub's own filter makes from the same patterns.
    every_file = [p.relative_to(folder).as_posix() for p in sorted(folder.rglob("*")) if p.is_file()]
    assert list(
        filter_repo_objects(every_file, ignore_patterns=list(hub_upload.UPLOAD_IGNORE))
    ) == hub_upload.upload_plan(folder)

    api = RecordingApi()
    url = hub_upload.push_folder(folder, "org/gpt2-lora", api=api)
    assert url == "https://huggingface.co/org/gpt2-lora"
    (create, repo_id, repo_type, exist_ok), (upload, kwargs) = api.calls
    assert (create, repo_id, repo_type, exist_ok) == ("create_repo", "org/gpt2-lora", "model", True)
    assert upload == "upload_folder" and kwargs["folder_path"] == str(folder) and kwargs["repo_id"] == "org/gpt2-lora"
    assert kwargs["repo_type"] == "model" and kwargs["ignore_patterns"] == list(hub_upload.UPLOAD_IGNORE)


def test_a_failed_upload_is_one_sentence_and_keeps_the_files(tmp_path):
    folder = run_directory_with_bookkeeping(tmp_path / "run")
    with pytest.raises(UserError) as failed:
        hub_upload.push_folder(folder, "org/results", repo_type="dataset", api=RecordingApi(fails=True))
    message = str(failed.value)
    assert len(message.splitlines()) == 1 and "401 Client Error" in message and "the files are kept" in message
    assert "hf auth login" in message and "hf upload --repo-type dataset org/results" in message
    assert (folder / "model.safetensors").exists()
    with pytest.raises(UserError, match="nothing to upload"):
        hub_upload.push_folder(tmp_path / "empty", "org/x", api=RecordingApi())


def test_a_training_with_push_to_hub_uploads_its_finished_directory(small_vocab_inputs, tmp_path, monkeypatch):
    api = RecordingApi()
    monkeypatch.setattr(hub_upload, "hub_api", lambda: api)
    output_dir = tmp_path / "lora_r8"
    train_in_process("lora", small_vocab_inputs, output_dir, push_to_hub="org/lora-r8", save_every=2)
    assert [call[0] for call in api.calls] == ["create_repo", "upload_folder"] and api.calls[0][1] == "org/lora-r8"
    assert api.calls[1][1]["folder_path"] == str(output_dir)
    plan = hub_upload.upload_plan(output_dir)
    assert {MODEL_CARD, LOSS_CURVE, "adapter_model.safetensors", RUN_RECORD} <= set(plan)
    assert (output_dir / "resume").is_dir() and not any(name.startswith(("resume/", ".")) for name in plan)


def test_push_to_hub_takes_only_a_repo_id():
    with pytest.raises(UserError, match="--push-to-hub takes a Hub repo id"):
        LoraTrainConfig(push_to_hub="org/has space").validate()
    with pytest.raises(UserError, match="--push-to-hub"):
        TrainConfig(push_to_hub="org/a--b").validate()
    TrainConfig(push_to_hub="org/gpt2-oasst").validate()


def test_the_study_pushes_each_chosen_training_and_its_results(tmp_path):
    trainings = {name: tmp_path / "checkpoints" / name for name in ("full_ft__lr1e-3__seed0", "lora_r8__lr1e-2__seed0")}
    uploads = hub_upload.study_uploads("org/oasst", trainings, tmp_path / "results")
    assert [(u.repo_id, u.repo_type, u.folder) for u in uploads] == [
        ("org/oasst-full_ft__lr1e-3__seed0", "model", trainings["full_ft__lr1e-3__seed0"]),
        ("org/oasst-lora_r8__lr1e-2__seed0", "model", trainings["lora_r8__lr1e-2__seed0"]),
        ("org/oasst-results", "dataset", tmp_path / "results"),
    ]
    for folder in [*trainings.values(), tmp_path / "results"]:
        folder.mkdir(parents=True)
        (folder / "run.json").write_text("{}")
    api = RecordingApi()
    urls = hub_upload.push_study("org/oasst", trainings, tmp_path / "results", api=api)
    assert urls[-1] == "https://huggingface.co/datasets/org/oasst-results"
    assert [call[1]["repo_type"] for call in api.calls if call[0] == "upload_folder"] == ["model", "model", "dataset"]


def test_the_hub_probe_asks_through_huggingface_hubs_client(monkeypatch):
    """Any answer from the Hub (even "no such repo") means it is reachable; the client's connection error, or
    HF_HUB_OFFLINE, is the one sentence naming the local flag. The client applies HF_ENDPOINT and HTTPS_PROXY itself."""
    import huggingface_hub
    from huggingface_hub.errors import RepositoryNotFoundError

    from studykit import hub
    from studykit.errors import UserError

    asked = []

    def answer_with(error):
        def repo_info(self, repo_id, repo_type=None, timeout=None, **_):
            asked.append((repo_id, repo_type, timeout))
            if error is not None:
                raise error

        return repo_info

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(hub, "_in_local_cache", lambda repo_id, repo_type: False)
    response = type("Response", (), {"status_code": 404, "headers": {}, "request": None})()
    for error in (None, RepositoryNotFoundError("no such repo", response=response)):
        monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", answer_with(error))
        hub.ensure_hub_reachable("someone/model", "--model PATH")
    assert asked[-1] == ("someone/model", "model", hub.HUB_TIMEOUT_SECONDS)

    monkeypatch.setattr(huggingface_hub.HfApi, "repo_info", answer_with(ConnectionRefusedError("refused")))
    with pytest.raises(UserError, match="the Hugging Face Hub cannot be reached; pass --model PATH"):
        hub.ensure_hub_reachable("someone/model", "--model PATH")
    asked.clear()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(UserError, match="HF_HUB_OFFLINE is set; pass --data-file PATH"):
        hub.ensure_hub_reachable("someone/data", "--data-file PATH", "dataset")
    assert asked == []
