"""One module per `balora` subcommand; each has add_parser(subparsers) and run(args) -> exit code."""
