"""`balora compare | inspect | balance | dashboard`."""

from __future__ import annotations

import argparse
import importlib
import sys
import traceback

from balora.errors import InputError

# subcommand -> module in balora.commands defining add_parser(subparsers) and run(args)
COMMANDS = {
    "compare": "compare",
    "inspect": "inspect_cmd",
    "balance": "balance_cmd",
    "dashboard": "dashboard",
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="balora", description="Balanced LoRA: balance, inspect and compare LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, module in COMMANDS.items():
        importlib.import_module(f"balora.commands.{module}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except InputError as e:
        if args.debug:
            traceback.print_exc()
        print(f"balora {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"balora {args.command}: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # anything else is a bug or an environment problem: say so in one line
        if args.debug:
            traceback.print_exc()
        else:
            print(f"balora {args.command}: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
