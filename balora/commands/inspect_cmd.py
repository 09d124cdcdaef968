"""Placeholder until the subcommand lands; `balora inspect_cmd` says so instead of failing obscurely."""


def add_parser(sub):
    p = sub.add_parser("inspect", help="(not available yet)")
    p.set_defaults(run=run)


def run(args):
    raise NotImplementedError("this subcommand is not implemented yet")
