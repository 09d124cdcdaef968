"""`balora compare | inspect | balance | dashboard`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback

from balora.errors import InputError

# subcommand -> (module in balora.commands defining add_parser(subparsers) and run(args), one-line help).
# The help is written here only: `balora --help` lists it without importing the module, and each
# module's add_parser passes COMMANDS[name][1].
COMMANDS = {
    "compare": ("compare", "train LoRA arms (lora, balora, ...) side by side on a task and record a run"),
    "inspect": ("inspect_cmd", "per-layer imbalance, conditioning and spectra of LoRA adapter files"),
    "balance": ("balance_cmd", "write a balanced copy of a LoRA adapter (same dW, B^T B = A A^T)"),
    "dashboard": ("dashboard", "start the Streamlit dashboard (Compare, Inspect, Launch, Learn)"),
}


def build_parser(argv: list[str] | None = None) -> argparse.ArgumentParser:
    """The full parser, or with `argv` only the subcommand argv names fully built.

    Each command module is imported only when that command runs (or with no argv): `balora
    --help` lists the commands from COMMANDS without importing any of them, so it starts at
    once, and `balora inspect` never imports what `balora balance` needs.
    """
    parser = argparse.ArgumentParser(prog="balora", description="Balanced LoRA: balance, inspect and compare LoRA adapters.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = set(COMMANDS) if argv is None else {next((a for a in argv if not a.startswith("-")), None)}
    for name, (module, help_text) in COMMANDS.items():
        if name in wanted:
            importlib.import_module(f"balora.commands.{module}").add_parser(sub)
            # Also after the command: "rerun with --debug" reads as adding it at the end. SUPPRESS: when
            # absent here, the value parsed before the command stays.
            sub.choices[name].add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                                           help="show full tracebacks on errors (as `balora --debug ...`)")
        else:
            sub.add_parser(name, help=help_text, add_help=False)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = build_parser(argv).parse_args(argv)
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
    except BrokenPipeError:  # `balora inspect ... | head`: the reader has all it wanted, nothing failed
        _stdout_to_devnull()
        return 141  # what a shell reports for a tool stopped by a closed pipe (128 + SIGPIPE)
    except Exception as e:  # anything else is a bug or an environment problem: say so in one line
        if args.debug:
            traceback.print_exc()
        else:
            print(f"balora {args.command}: error: {type(e).__name__}: {e} (rerun with --debug for the traceback)", file=sys.stderr)
        return 1


def _stdout_to_devnull() -> None:
    """Point stdout at /dev/null, so flushing it at exit does not fail on the closed pipe again."""
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError):  # stdout replaced by something without a descriptor (tests): nothing to flush
        pass
    finally:
        os.close(devnull)


if __name__ == "__main__":
    sys.exit(main())
