"""The commands run in this process, as a user types them (typer's CliRunner): quicker than a subprocess."""

from typer.testing import CliRunner

from vae_rt.cli import app


def run(*args) -> tuple[int, str]:
    """`vae-rt ARGS`: its exit code, and stdout and stderr together."""
    result = CliRunner().invoke(app, [str(a) for a in args])
    return result.exit_code, result.output


def assert_one_line_error(args, *fragments, code=2) -> str:
    """The command fails with `code` and one line naming every fragment (a notice of slow work aside)."""
    exit_code, output = run(*args)
    assert exit_code == code, output
    lines = [line for line in output.strip().splitlines() if not line.startswith("exporting ")]
    assert "Traceback" not in output and ".tmp" not in output and len(lines) == 1, output
    for fragment in fragments:
        assert fragment in output, output
    return output
