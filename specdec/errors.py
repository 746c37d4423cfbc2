"""User-facing errors: printed as one line by ``run.py`` with a non-zero exit, no stack trace."""


class UserError(Exception):
    """Bad input from the user (config, files, hardware request); the message says what to fix."""


def run_in_output_dir(job) -> None:
    """Call ``job(hydra_output_dir)`` from a ``@hydra.main`` entry; a ``UserError`` becomes one
    ``error:`` line on stderr and exit code 2 (what every entry point promises for bad input)."""
    import sys
    from pathlib import Path

    from hydra.core.hydra_config import HydraConfig

    try:
        job(Path(HydraConfig.get().runtime.output_dir))
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)


class SettingError(UserError, ValueError):
    """A method's constructor refusing one of its settings (a bad knob value in its YAML or on the command
    line); ``build_proposer`` turns it into one line naming the method. Any other exception raised while
    building a method is a bug and keeps its traceback."""
