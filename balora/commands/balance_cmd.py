"""Placeholder until the subcommand lands; `balora balance_cmd` says so instead of failing obscurely."""


def add_parser(sub):
    p = sub.add_parser("balance", help="(not available yet)")
    p.set_defaults(run=run)


def run(args):
    raise NotImplementedError("this subcommand is not implemented yet")
