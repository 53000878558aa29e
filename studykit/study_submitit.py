"""--launcher submitit: a study's trainings as jobs of a cluster scheduler, through submitit (--cluster slurm), or as
submitit's local processes (--cluster local) or one after the other in the runner's own process (--cluster debug).

Each pending training of a phase is one job; on SLURM the phase is one job array. The runner waits for them, then
chooses the rates and goes on as it does with local trainings. A job that is preempted or reaches its time limit is
signalled by the scheduler ahead of the kill (USR2); it stops its training, which saves a resumable checkpoint, and
submitit requeues it; the next attempt resumes from that checkpoint (--resume). A job that fails is told in one
sentence with its log while the others go on. Job ids are recorded under the study's checkpoints/.submitit, so a
runner that was interrupted waits for the jobs it left running (or takes the result of one that finished) instead of
submitting them again.
"""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import time
from pathlib import Path
from typing import Any, Optional, Sequence

from studykit.errors import UserError
from studykit.io import atomic_write_json, read_json
from studykit.runtime import REPO_ROOT
from studykit.study_config import StudyConfig
from studykit.study_file import Training
from studykit.study_launch import how_to_start, last_line, mark_started, training_command
from studykit.study_state import digest, training_diverged, training_inputs

JOBS_DIRECTORY = ".submitit"  # under the study's checkpoints/; the dot keeps it out of the stale-run warning
JOBS_FILE = "jobs.json"
DEFAULT_TIME_LIMIT_MIN = 240
# Time from the scheduler's warning (USR2) to its kill: the training finishes its step and saves a checkpoint.
SIGNAL_DELAY_S = 120
# Requeues after a time limit, beyond which the job fails (a preemption does not count).
MAX_TIMEOUT_REQUEUES = 20
# How often the runner looks at its jobs: SLURM's states come from sacct, which submitit asks once a minute at most.
POLL_SECONDS = {"slurm": 30.0, "local": 1.0, "debug": 0.0}


class TrainingFailed(Exception):
    """A training's command ended with an error; its message is the sentence the runner prints."""


def ignore_preemption_signal() -> None:
    # The scheduler signals every process of the job; the training stops when the job asks it to (SIGTERM), not on
    # the warning itself, whose default action would kill it without a checkpoint.
    signal.signal(signal.SIGUSR2, signal.SIG_IGN)


def wait_for_exit(pid: int, poll_seconds: float = 0.2) -> int:
    """The exit status of a child process, waited for without Popen's lock: the wait may be interrupted by submitit's
    signal handler, which waits for the same process."""
    while True:
        try:
            finished, status = os.waitpid(pid, os.WNOHANG)
        except ChildProcessError:
            return -1  # reaped by the other wait
        if finished:
            return os.waitstatus_to_exitcode(status)
        time.sleep(poll_seconds)


@dataclasses.dataclass
class TrainingJob:
    """What one job runs: the training's command, started fresh or resumed from its last checkpoint. submitit calls
    `checkpoint` when the job is preempted or times out, and requeues what it returns."""

    training: Training
    training_fingerprint: str
    log: Path
    gpus: int = 1
    resumed: bool = False
    pid: Optional[int] = None

    def __call__(self) -> dict[str, Any]:
        config, checkpoint = how_to_start(self.training, self.training_fingerprint)
        if checkpoint is None:
            mark_started(self.training, self.training_fingerprint)
        self.resumed = self.resumed or checkpoint is not None
        launcher = "accelerate" if self.gpus > 1 else "local"
        command = training_command(config, launcher, max(self.gpus, 1))
        self.log.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log, "a", encoding="utf-8") as log:
            log.write(f"=== {self.training.name}" + (f": resuming from {checkpoint.name}" if checkpoint else "") + "\n")
            log.flush()
            process = subprocess.Popen(
                command, stdout=log, stderr=subprocess.STDOUT, cwd=REPO_ROOT, preexec_fn=ignore_preemption_signal
            )
        self.pid = process.pid
        code = wait_for_exit(process.pid)
        self.pid = None
        if code != 0:
            raise TrainingFailed(f"exit status {code}: {last_line(self.log)}")
        return {"resumed": self.resumed}

    def checkpoint(self, *args: Any, **kwargs: Any):
        from submitit.helpers import DelayedSubmission

        if self.pid is not None:
            # SIGTERM: the trainer ends its step, saves a resumable checkpoint and exits; the requeued job resumes it.
            try:
                os.kill(self.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            wait_for_exit(self.pid)
            self.pid = None
        return DelayedSubmission(self, *args, **kwargs)


@dataclasses.dataclass
class Submitted:
    training: Training
    job_id: str
    job: Any  # the submitit Job


def load_submitit():
    try:
        import submitit
    except ImportError:
        raise UserError(
            "--launcher submitit needs the submitit package, which is not installed; pip install -e '.[slurm]' "
            "(or pip install submitit)."
        ) from None
    return submitit


def cluster_of(config: StudyConfig) -> str:
    return config.cluster or "slurm"


def trains_elsewhere(config: StudyConfig) -> bool:
    """The trainings run on the cluster's nodes, not on this machine (whose lack of a GPU then says nothing)."""
    return config.launcher == "submitit" and cluster_of(config) == "slurm"


def build_executor(config: StudyConfig, folder: Path, pending: int):
    """submitit's executor for --cluster, with the job settings of the flags and the [launcher] table."""
    submitit = load_submitit()
    cluster = cluster_of(config)
    requeues = {} if cluster == "debug" else {f"{cluster}_max_num_timeout": MAX_TIMEOUT_REQUEUES}
    try:
        executor = submitit.AutoExecutor(folder=folder / "%j", cluster=cluster, **requeues)
    except RuntimeError as error:
        raise UserError(f"--cluster {cluster}: {error}; use --cluster local to run the jobs on this machine.") from None
    parameters: dict[str, Any] = {
        "name": "studykit",
        "timeout_min": config.time_limit_min or DEFAULT_TIME_LIMIT_MIN,
        "mem_gb": config.mem_gb,
        "cpus_per_task": config.cpus_per_task,
    }
    gpus = job_gpus(config)
    if cluster == "slurm":
        parameters.update(
            slurm_partition=config.partition,
            slurm_account=config.account,
            slurm_qos=config.qos,
            slurm_gpus_per_task=gpus or None,
            slurm_array_parallelism=config.array_parallelism or pending,
            slurm_signal_delay_s=SIGNAL_DELAY_S,
            slurm_additional_parameters=sbatch_parameters(config.sbatch_lines) or None,
        )
    elif cluster == "local":
        parameters.update(gpus_per_node=gpus)
    executor.update_parameters(**{key: value for key, value in parameters.items() if value is not None})
    return executor


def job_gpus(config: StudyConfig) -> int:
    """GPUs per job: --gpus-per-task, else one where a job needs one (SLURM; local, where this machine has one)."""
    if config.gpus_per_task is not None:
        return config.gpus_per_task
    if cluster_of(config) == "slurm":
        return 1
    import torch

    return 1 if torch.cuda.is_available() else 0


def sbatch_parameters(lines: Sequence[str]) -> dict[str, Any]:
    """--sbatch-line KEY=VALUE (or --KEY=VALUE, or a bare switch) as submitit's additional sbatch parameters."""
    parameters: dict[str, Any] = {}
    for line in lines:
        key, equals, value = line.strip().removeprefix("#SBATCH").strip().lstrip("-").partition("=")
        if not key or " " in key:
            raise UserError(f"--sbatch-line {line!r} is not an sbatch option; write KEY=VALUE, e.g. constraint=a100.")
        parameters[key] = value if equals else True
    return parameters


def jobs_folder(trainings: Sequence[Training]) -> Path:
    return Path(trainings[0].config.output_dir).parent / JOBS_DIRECTORY


def read_records(folder: Path) -> dict[str, dict[str, Any]]:
    path = folder / JOBS_FILE
    return read_json(path, "delete it; the jobs it recorded are then submitted again") if path.exists() else {}


def record_jobs(folder: Path, submitted: Sequence[Submitted], cluster: str, fingerprint: str) -> None:
    records = read_records(folder)
    for entry in submitted:
        records[entry.training.name] = {
            "job_id": entry.job_id,
            "cluster": cluster,
            "inputs": digest(training_inputs(entry.training, fingerprint)),
        }
    atomic_write_json(folder / JOBS_FILE, records)


def process_alive(pid: int) -> bool:
    """A local job's controller process is still running (reaped first when it is this process's own child)."""
    try:
        finished, _ = os.waitpid(pid, os.WNOHANG)
        return finished == 0
    except ChildProcessError:
        pass
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def job_outcome(submitit, job_id: str, folder: Path) -> Optional[tuple[str, Any]]:
    """('success', result) or ('error', traceback) once the job has written its result, else None."""
    paths = submitit.core.utils.JobPaths(folder / "%j", job_id=job_id, task_id=0)
    if not paths.result_pickle.exists():
        return None
    return submitit.core.utils.pickle_load(paths.result_pickle)


def job_log(submitit, job_id: str, folder: Path) -> Path:
    return submitit.core.utils.JobPaths(folder / "%j", job_id=job_id, task_id=0).stderr


def still_running(submitit, cluster: str, job_id: str, job: Any, folder: Path) -> bool:
    if job_outcome(submitit, job_id, folder) is not None:
        return False
    if cluster == "local":
        return process_alive(int(job_id))
    return not job.done()


def reattach(submitit, trainings: Sequence[Training], fingerprint: str, cluster: str, folder: Path) -> list[Submitted]:
    """The recorded jobs of these trainings that are still running or that finished well, for the same inputs on the
    same cluster; a job that ended otherwise is submitted again (resuming its checkpoint, if it saved one)."""
    if cluster == "debug":
        return []
    records, attached = read_records(folder), []
    for training in trainings:
        record = records.get(training.name)
        if (
            record is None
            or record["cluster"] != cluster
            or record["inputs"] != digest(training_inputs(training, fingerprint))
        ):
            continue
        job = submitit.SlurmJob(folder / "%j", record["job_id"]) if cluster == "slurm" else None
        outcome = job_outcome(submitit, record["job_id"], folder)
        if (outcome is not None and outcome[0] == "success") or (
            outcome is None and still_running(submitit, cluster, record["job_id"], job, folder)
        ):
            print(f"=== training {training.name}: waiting for its job {record['job_id']}, submitted earlier")
            attached.append(Submitted(training, record["job_id"], job))
    return attached


def submit(executor, trainings: Sequence[Training], fingerprint: str, folder: Path, gpus: int) -> list[Submitted]:
    # submitit requeues a callable with a `checkpoint` method (what submitit.helpers.Checkpointable adds).
    jobs = [TrainingJob(training, fingerprint, folder / f"{training.name}.log", gpus) for training in trainings]
    with executor.batch():
        handles = [executor.submit(job) for job in jobs]
    submitted = [Submitted(training, handle.job_id, handle) for training, handle in zip(trainings, handles)]
    unnamed = folder / "%j"  # made by submitit before the job ids were known, and left empty
    if unnamed.is_dir() and not any(unnamed.iterdir()):
        unnamed.rmdir()
    for entry in submitted:
        print(f"=== training {entry.training.name}: job {entry.job_id}; log: {folder / (entry.training.name + '.log')}")
    return submitted


def failure_sentence(entry: Submitted, outcome: Optional[tuple[str, Any]], folder: Path, submitit) -> str:
    training_log = folder / f"{entry.training.name}.log"
    if outcome is None:
        return (
            f"{entry.training.name}: job {entry.job_id} ended without a result (cancelled, out of memory or its node "
            f"lost); its log: {job_log(submitit, entry.job_id, folder)}"
        )
    cause = [line for line in str(outcome[1]).strip().splitlines() if line.strip()]
    reason = cause[-1].split(": ", 1)[-1] if cause else "no output"
    return f"{entry.training.name}: job {entry.job_id} failed ({reason}); its log: {training_log}"


def debug_outcome(job) -> tuple[str, Any]:
    """Runs a debug job here, through exception(): its results() would open the debugger on a failure."""
    error = job.exception()
    if error is not None:
        return "error", f"{type(error).__name__}: {error}"
    return "success", job.submission().result()


def run_as_jobs(
    trainings: Sequence[Training],
    training_fingerprint: str,
    study_config: StudyConfig,
    divergence_allowed: bool = False,
) -> dict[str, bool]:
    """Every given training as a job of --cluster, waited for; returns, for each, whether it was resumed. With
    `divergence_allowed` (a learning-rate sweep) a job whose training diverged is not a failure: the study counts its
    rate as the worst."""
    submitit = load_submitit()
    cluster, folder = cluster_of(study_config), jobs_folder(trainings)
    folder.mkdir(parents=True, exist_ok=True)
    attached = reattach(submitit, trainings, training_fingerprint, cluster, folder)
    to_submit = [t for t in trainings if t.name not in {entry.training.name for entry in attached}]
    executor = build_executor(study_config, folder, len(to_submit)) if to_submit else None
    # A local cluster has no queue: the runner keeps --array-parallelism jobs (default one) running at a time.
    at_once = (study_config.array_parallelism or 1) if cluster == "local" else len(to_submit)
    waiting, resumed, failures = list(attached), {}, []
    try:
        while to_submit or waiting:
            free = max(0, at_once - len(waiting)) if cluster == "local" else len(to_submit)
            if to_submit and free:
                batch, to_submit = to_submit[:free], to_submit[free:]
                submitted = submit(executor, batch, training_fingerprint, folder, job_gpus(study_config))
                if cluster != "debug":
                    record_jobs(folder, submitted, cluster, training_fingerprint)
                waiting += submitted
            for entry in list(waiting):
                if cluster == "debug":
                    outcome = debug_outcome(entry.job)
                elif still_running(submitit, cluster, entry.job_id, entry.job, folder):
                    continue
                else:
                    outcome = job_outcome(submitit, entry.job_id, folder)
                waiting.remove(entry)
                if outcome is not None and outcome[0] == "success":
                    resumed[entry.training.name] = bool(outcome[1].get("resumed"))
                elif divergence_allowed and training_diverged(entry.training, training_fingerprint):
                    print(f"warning: {entry.training.name} diverged; its rate counts as the worst of the grid.")
                else:
                    failures.append(failure_sentence(entry, outcome, folder, submitit))
                    print(f"error: {failures[-1]}")
            if waiting:
                time.sleep(POLL_SECONDS[cluster])
    except KeyboardInterrupt:
        left = (
            "they go on"
            if cluster == "slurm"
            else "a terminal's Ctrl-C stops local jobs too; they resume when submitted again"
        )
        raise UserError(
            f"stopped waiting for {len(waiting) + len(to_submit)} training job(s) ({left}); run the same study "
            f"command again to pick them up (their ids are in {folder / JOBS_FILE})."
        ) from None
    if failures:
        raise UserError(
            f"{len(failures)} training job(s) failed, first {failures[0]}; fix the cause and run the same study "
            "command again (the others are kept)."
        )
    return resumed
