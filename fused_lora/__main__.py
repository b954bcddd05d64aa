"""Command line: ``python -m fused_lora {demo,bench,check,info} [options]`` (``--help`` on each).

The commands live in the tooling packages ``fused_lora.cli`` (demo, check, info) and ``fused_lora.bench`` (bench);
each is imported only when it is run, so one command never pays for another's imports.
"""

from __future__ import annotations

import importlib
import sys

from .cli.quiet import quiet_third_party_notices

COMMANDS = {
    "demo": ("fused_lora.cli.demo", "fine-tune a small NF4 + LoRA Llama on a shipped task and check parity with PEFT"),
    "bench": ("fused_lora.bench.command", "run the benchmark sweep (--quick) or render a report (--report)"),
    "check": ("fused_lora.cli.check", "compare the active backend with the reference on this device"),
    "info": ("fused_lora.cli.info", "show which backends (CUDA, Triton, extension, bitsandbytes) are available"),
}


def _usage() -> str:
    lines = ["usage: python -m fused_lora <command> [options]", "", "commands:"]
    lines += [f"  {name:<6} {summary}" for name, (_, summary) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"fused_lora: unknown command {command!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    quiet_third_party_notices()
    module = importlib.import_module(COMMANDS[command][0])
    return int(module.main(rest) or 0)


if __name__ == "__main__":
    sys.exit(main())
