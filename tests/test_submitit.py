"""--launcher submitit: the study's trainings as jobs (submitit's local cluster stands in for SLURM, a stand-in srun
for its settings). The jobs choose and score as in-process trainings do; a job stopped by its scheduler is requeued and
resumes; an interrupted runner waits for its jobs instead of submitting them again; a failing job is one sentence."""

import json
import os
import re
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import ONE_RUN_TRAINING, one_run_study

from studykit import study_submitit
from studykit.errors import UserError
from studykit.study import run_study
from studykit.study_config import StudyConfig

pytest.importorskip("submitit")

LOCAL = {"launcher": "submitit", "cluster": "local"}


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A study's tiny model and data, built once; each test's study starts from a copy with nothing trained."""
    root = tmp_path_factory.mktemp("built")
    run_study(
        StudyConfig(config=str(one_run_study(root / "one.toml")), output_dir=str(root / "out"), print_commands=True)
    )
    return root / "out"


def fresh_study(built: Path, tmp_path: Path, lr: str = "1e-3", steps: int = 6) -> tuple[Path, Path]:
    output_dir = tmp_path / "study"
    shutil.copytree(built, output_dir, ignore=shutil.ignore_patterns("checkpoints", "results"))
    return one_run_study(tmp_path / "study.toml", lr=lr, steps=steps), output_dir


def without_grid_extensions(text: str) -> str:
    """The study with its grid as written: two trainings instead of up to four, which this comparison does not need."""
    assert "grid_extensions = 2" in text
    return text.replace("grid_extensions = 2", "grid_extensions = 0")


def test_jobs_on_the_local_cluster_choose_and_score_as_in_process_trainings(built, tmp_path):
    study, in_process_dir = fresh_study(built, tmp_path, lr="[1e-3, 3e-3]")
    study.write_text(without_grid_extensions(study.read_text()))
    as_jobs_dir = tmp_path / "as_jobs"
    shutil.copytree(in_process_dir, as_jobs_dir)
    in_process = run_study(StudyConfig(config=str(study), output_dir=str(in_process_dir)))
    as_jobs = run_study(StudyConfig(config=str(study), output_dir=str(as_jobs_dir), **LOCAL))

    assert sorted(as_jobs["trained"]) == sorted(in_process["trained"]) and len(as_jobs["trained"]) == 2
    assert as_jobs["chosen"] == in_process["chosen"]

    def test_perplexities(directory):
        rows = json.loads((directory / "results" / "perplexity.json").read_text())
        return {row["name"]: row["perplexity"] for row in rows}

    expected = test_perplexities(in_process_dir)
    assert set(test_perplexities(as_jobs_dir)) == set(expected)
    for name, perplexity in test_perplexities(as_jobs_dir).items():
        assert perplexity == pytest.approx(expected[name], rel=1e-6), name
    records = json.loads((as_jobs_dir / "checkpoints" / ".submitit" / "jobs.json").read_text())
    assert set(records) == set(as_jobs["trained"]) and {record["cluster"] for record in records.values()} == {"local"}


def run_in_background(config: StudyConfig) -> tuple[threading.Thread, dict]:
    outcome = {}

    def run():
        try:
            outcome["done"] = run_study(config)
        except BaseException as error:  # noqa: BLE001 - handed to the test
            outcome["error"] = error

    thread = threading.Thread(target=run)
    thread.start()
    return thread, outcome


def wait_for_steps(log: Path, steps: int, thread: threading.Thread, deadline_s: float = 240) -> None:
    deadline = time.monotonic() + deadline_s
    while not (log.exists() and len(log.read_text().splitlines()) >= steps):
        assert thread.is_alive() and time.monotonic() < deadline
        time.sleep(0.05)


def job_process(output_dir: Path) -> int:
    """The process running the recorded job (the local cluster's job id is its controller's process id)."""
    records = json.loads((output_dir / "checkpoints" / ".submitit" / "jobs.json").read_text())
    controller = records[ONE_RUN_TRAINING]["job_id"]
    children = Path(f"/proc/{controller}/task/{controller}/children").read_text().split()
    return int(children[0])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the job's process in /proc")
def test_a_job_stopped_by_its_scheduler_is_requeued_and_resumes_from_its_checkpoint(built, tmp_path):
    study, output_dir = fresh_study(built, tmp_path, steps=40)
    run_dir = output_dir / "checkpoints" / ONE_RUN_TRAINING
    thread, outcome = run_in_background(StudyConfig(config=str(study), output_dir=str(output_dir), **LOCAL))
    wait_for_steps(run_dir / "log.jsonl", 3, thread)
    # What SLURM sends before a preemption or the time limit.
    os.kill(job_process(output_dir), signal.SIGUSR2)
    thread.join(timeout=600)
    assert "error" not in outcome, outcome.get("error")
    assert outcome["done"]["resumed"] == [ONE_RUN_TRAINING] == outcome["done"]["trained"]
    steps = [json.loads(line)["step"] for line in (run_dir / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 41))
    training_log = (output_dir / "checkpoints" / ".submitit" / f"{ONE_RUN_TRAINING}.log").read_text()
    assert "training stopped by SIGTERM" in training_log and f"=== {ONE_RUN_TRAINING}: resuming from step-" in (
        training_log
    )


def test_an_interrupted_runner_waits_for_its_jobs_instead_of_submitting_them_again(
    built, tmp_path, monkeypatch, capsys
):
    study, output_dir = fresh_study(built, tmp_path, steps=30)
    config = StudyConfig(config=str(study), output_dir=str(output_dir), **LOCAL)

    def interrupted(*args):
        raise KeyboardInterrupt

    with monkeypatch.context() as patched:
        patched.setattr(study_submitit, "still_running", interrupted)
        with pytest.raises(UserError, match=r"stopped waiting for 1 training job\(s\) .* run the same study command"):
            run_study(config)
    job_id = json.loads((output_dir / "checkpoints" / ".submitit" / "jobs.json").read_text())[ONE_RUN_TRAINING]

    def no_second_submission(*args, **kwargs):
        raise AssertionError("a recorded job that is still running was submitted again")

    monkeypatch.setattr(study_submitit, "submit", no_second_submission)
    capsys.readouterr()
    done = run_study(config)
    assert f"=== training {ONE_RUN_TRAINING}: waiting for its job {job_id['job_id']}, submitted earlier" in (
        capsys.readouterr().out
    )
    assert done["trained"] == [ONE_RUN_TRAINING] and done["evaluated"]
    assert json.loads((output_dir / "checkpoints" / ONE_RUN_TRAINING / "run.json").read_text())["steps"] == 30


def test_a_failing_job_is_one_sentence_with_its_log_and_the_others_go_on(built, tmp_path, capsys):
    # A fixed rate that sends the loss to inf, with two seeds: each job fails (a run of one rate has no other to fall
    # back on), the first failure does not stop the second job, and the runner says so in one sentence.
    study, output_dir = fresh_study(built, tmp_path, lr="1e30")
    study.write_text(re.sub(r"(?m)^seeds = \[0\]$", "seeds = [0, 1]\nsweep_seeds = [0, 1]", study.read_text()))
    with pytest.raises(UserError) as refused:
        run_study(StudyConfig(config=str(study), output_dir=str(output_dir), **LOCAL))
    message = str(refused.value)
    logs = [output_dir / "checkpoints" / ".submitit" / f"full_ft__lr1e30__seed{seed}.log" for seed in (0, 1)]
    assert message.startswith("2 training job(s) failed, first full_ft__lr1e30__seed0: job ")
    assert f"its log: {logs[0]}; fix the cause and run the same study command again" in message
    assert "\n" not in message and all(log.exists() for log in logs)
    printed = capsys.readouterr().out
    assert "error: full_ft__lr1e30__seed0: job " in printed and "error: full_ft__lr1e30__seed1: job " in printed


def test_a_diverging_rate_of_a_grid_is_the_worst_rate_as_in_process(built, tmp_path):
    # Under a grid, the same diverging job is no failure: its rate counts as the worst and the study goes on.
    study, output_dir = fresh_study(built, tmp_path, lr="[1e-3, 1e30]")
    study.write_text(without_grid_extensions(study.read_text()))
    done = run_study(StudyConfig(config=str(study), output_dir=str(output_dir), **LOCAL))
    assert done["chosen"]["full_ft"] == 1e-3
    assert (output_dir / "checkpoints" / "full_ft__lr1e-3__seed0" / "run.json").exists()


def fake_command(directory: Path, name: str, script: str) -> None:
    path = directory / name
    path.write_text("#!/usr/bin/env bash\n" + script)
    path.chmod(0o755)


def test_slurm_settings_come_from_the_launcher_table_and_the_flags_win(tmp_path, monkeypatch):
    from studykit.study_file import load_study, with_launcher_table

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    fake_command(bin_dir, "srun", "exit 0\n")  # what submitit looks for to know it is on a SLURM cluster
    monkeypatch.setenv("PATH", f"{bin_dir}:{os.environ['PATH']}")
    study_file = one_run_study(tmp_path / "study.toml")
    study_file.write_text(
        study_file.read_text()
        + '\n[launcher]\npartition = "gpu"\ntime_limit_min = 90\naccount = "lab"\nqos = "normal"\n'
        + 'sbatch_lines = ["constraint=a100", "--exclusive"]\narray_parallelism = 4\n'
    )
    flags = StudyConfig(config=str(study_file), launcher="submitit", partition="gpu-long", mem_gb=32, cpus_per_task=8)
    config = with_launcher_table(flags, load_study(study_file))
    executor = study_submitit.build_executor(config, tmp_path / "jobs", pending=6)
    script = executor._executor._make_submission_file_text("python -m submitit.core._submit", "uid")
    for line in (
        "#SBATCH --partition=gpu-long",
        "#SBATCH --time=90",
        "#SBATCH --account=lab",
        "#SBATCH --qos=normal",
        "#SBATCH --gpus-per-task=1",
        "#SBATCH --cpus-per-task=8",
        "#SBATCH --mem=32GB",
        "#SBATCH --constraint=a100",
        "#SBATCH --exclusive",
        "#SBATCH --signal=USR2@120",
    ):
        assert line in script.splitlines(), line
    assert executor._executor.parameters["array_parallelism"] == 4


def test_launcher_mistakes_are_one_sentence(tmp_path, monkeypatch):
    from studykit.study_file import load_study

    monkeypatch.setenv("PATH", "/usr/bin:/bin")
    study_file = one_run_study(tmp_path / "study.toml")
    study_file.write_text(study_file.read_text() + '\n[launcher]\npartitoin = "gpu"\n')
    with pytest.raises(UserError, match=r"\[launcher\] in .* has unknown setting\(s\) \['partitoin'\] \(did you mean"):
        load_study(study_file)
    with pytest.raises(UserError, match='--cluster slurm: Could not detect "srun".*; use --cluster local'):
        study_submitit.build_executor(StudyConfig(launcher="submitit"), tmp_path / "jobs", pending=1)
    with pytest.raises(UserError, match="with --launcher submitit use --gpus-per-task"):
        StudyConfig(launcher="submitit", gpus="0").validate()
    with pytest.raises(UserError, match="--sbatch-line 'two words' is not an sbatch option"):
        study_submitit.sbatch_parameters(["two words"])


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the CPU-only machine's refusal")
def test_a_login_node_without_a_gpu_does_not_refuse_a_study_whose_jobs_run_on_the_cluster(built, tmp_path, monkeypatch):
    from studykit import runtime

    monkeypatch.setattr(runtime, "CPU_GUARD_SECONDS", 0)  # the tiny model stands in for GPT-2 Small
    monkeypatch.setenv("PATH", "/usr/bin:/bin")  # no srun here: the step after the CPU check says so
    study, output_dir = fresh_study(built, tmp_path)
    with pytest.raises(UserError, match="no GPU is visible"):
        run_study(StudyConfig(config=str(study), output_dir=str(output_dir)))
    with pytest.raises(UserError, match='--cluster slurm: Could not detect "srun"'):
        run_study(StudyConfig(config=str(study), output_dir=str(output_dir), launcher="submitit"))
