"""The `allocmoe` command: one click group whose subcommands are imported on first use.

Each subcommand lives in ``allocmoe_edge/commands/<name>.py`` as a click command named
``command``; heavy libraries (torch, transformers, llama_cpp) are imported inside it, so
``allocmoe --help`` stays instant.
"""

from __future__ import annotations

import importlib
import sys

import click

from . import __version__

# name -> (module under allocmoe_edge.commands, one-line help shown by `allocmoe --help`)
COMMANDS: dict[str, tuple[str, str]] = {
    "allocate": ("allocate", "Choose per-layer expert counts for a budget (Alloc-L DP)."),
    "bench": ("bench", "Measure pp/tg tokens/s at full budget, stored plans and uniform top-k."),
    "build-runtime": ("build_runtime", "Build and install the patched llama-cpp-python."),
    "convert": ("convert", "Convert a Hugging Face checkpoint to one GGUF holding budget plans."),
    "demo": ("demo", "Run the whole pipeline on the bundled model: profile, allocate, convert, eval, bench, report."),
    "doctor": ("doctor", "Report the installed llama_cpp and whether it is patched."),
    "eval": ("eval", "Perplexity, KL divergence and top-1 agreement of every budget configuration."),
    "inspect": ("inspect", "Show a GGUF's MoE shape and its allocmoe plans."),
    "plot": ("plot", "Draw the quality-vs-speed frontier from eval and bench JSON."),
    "profile": ("profile", "Measure layer sensitivities S[l, k] of a Hugging Face MoE model (torch)."),
    "refine": ("refine", "Measure a plan end to end and refine it by local search (torch)."),
    "stamp": ("stamp", "Write per-layer expert counts into a copy of a GGUF."),
    "run": ("run", "Generate text from a (budgeted) GGUF."),
    "synth": ("synth", "Write a weightless GGUF with a real MoE model's shapes (speed tests)."),
}


class LazyGroup(click.Group):
    """A click group that imports a subcommand's module only when it is invoked."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module = importlib.import_module(f"allocmoe_edge.commands.{COMMANDS[name][0]}")
        return module.command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        rows = [(name, COMMANDS[name][1]) for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="allocmoe")
@click.option("--debug", is_flag=True, help="Show full tracebacks instead of one-line errors.")
@click.pass_context
def cli(ctx: click.Context, debug: bool) -> None:
    """Budget-aware expert activation (Alloc-MoE) for MoE LLMs on llama.cpp.

    Typical flow: profile -> allocate -> convert -> run / eval / bench.
    """
    ctx.ensure_object(dict)
    ctx.obj["debug"] = debug


def main(argv: list[str] | None = None) -> None:
    """Entry point: run the group; turn expected errors into one clean line."""
    from .errors import AllocMoeError

    debug = "--debug" in (argv if argv is not None else sys.argv[1:])
    try:
        cli.main(args=argv, standalone_mode=False)
    except click.exceptions.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        e.show()
        sys.exit(e.exit_code)
    except click.exceptions.Exit as e:
        sys.exit(e.exit_code)
    except AllocMoeError as e:
        if debug:
            raise
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
