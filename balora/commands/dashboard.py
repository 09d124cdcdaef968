"""Placeholder until the subcommand lands; `balora dashboard` says so instead of failing obscurely."""


def add_parser(sub):
    p = sub.add_parser("dashboard", help="(not available yet)")
    p.set_defaults(run=run)


def run(args):
    raise NotImplementedError("this subcommand is not implemented yet")
