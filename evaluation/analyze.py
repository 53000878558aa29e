"""The analysis of a finished study (where and why LoRA falls short of full FT, and a verdict): the same command as
`studykit-analyze` (its --help is in studykit/analysis.py)."""

try:
    from studykit.cli import analyze_command
except ModuleNotFoundError as error:
    if error.name != "studykit":
        raise
    # The kit runs installed (pip install -e .): without it, one sentence instead of the import's traceback.
    raise SystemExit(
        "error: the studykit package is not installed in this Python; run `pip install -e .` in the "
        "repository (bash scripts/study.sh and scripts/test.sh do it)."
    ) from None

if __name__ == "__main__":
    analyze_command()
