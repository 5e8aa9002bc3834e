"""`allocmoe doctor`: which llama_cpp is installed and whether it is patched."""

from __future__ import annotations

import json

import click


@click.command("doctor")
@click.option("--json", "as_json", is_flag=True, help="Print JSON (keys include `patched`).")
def command(as_json: bool) -> None:
    """Report the installed llama-cpp-python, whether it carries the allocmoe patches
    (budget plans are executed only then), which backends it was built with, and llama.cpp's programs
    built from the same patches (`allocmoe build-runtime --tools`)."""
    from ..build_lib import cached_tools
    from ..runtime import doctor

    report = {**doctor(), "tools": cached_tools()}
    if as_json:
        click.echo(json.dumps(report, indent=2))
        return
    for tools in report["tools"]:
        click.echo(f"llama.cpp programs ({tools['backend']}): {tools['folder']}")
    if not report["installed"]:
        click.echo(f"llama-cpp-python: unusable: {report['error']}")
        return
    click.echo(f"llama-cpp-python {report['llama_cpp_python']} at {report['module']}")
    state = f"patched (allocmoe patch series v{report['allocmoe_patch_version']})" if report["patched"] else \
        "STOCK: budget plans will not run; use `allocmoe build-runtime`"
    click.echo(f"runtime: {state}")
    click.echo(f"GPU offload: {'yes' if report['gpu_offload'] else 'no'}")
    backends = sorted({d["backend"] for d in report["devices"]})
    click.echo(f"backends: {', '.join(backends) or 'none'}")
    for d in report["devices"]:
        click.echo(f"  device {d['name']} ({d['backend']}, {d['type']}): {d['description']}")
    click.echo(f"system: {report['system_info']}")
