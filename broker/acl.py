"""The Redis ACL user that may run the mesh in one namespace and nothing else, as the command an
operator pastes: ``python -m mesh.broker.acl [NAMESPACE] [--user NAME]`` prints it.

The commands come from one list, :data:`mesh.broker.connection.ACL_COMMANDS` (the rules from
:func:`mesh.broker.connection.acl_rules`): a feature that sends a new Redis command adds it there.
docs/reference/acl.md shows what this module prints for namespace ``mesh``; a test fails when the
page and the code differ, and another runs every ``mesh`` command under exactly these rules.
"""

from __future__ import annotations

import argparse
import shlex

from .connection import acl_rules

#: The page of the docs that shows :func:`acl_command` for the default namespace.
DOC_PAGE = "docs/reference/acl.md"


def acl_command(namespace: str = "mesh", user: str = "mesh", password: str = "PASSWORD", width: int = 80) -> str:
    """``redis-cli ACL SETUSER ...`` making ``user`` with :func:`acl_rules` of ``namespace``, quoted
    for a POSIX shell and wrapped with ``\\`` continuations into lines of at most ``width`` columns."""
    words = ["redis-cli", "ACL", "SETUSER", shlex.quote(user), "on", shlex.quote(f">{password}"),
             *(shlex.quote(rule) for rule in acl_rules(namespace))]
    lines, line = [], ""
    for word in words:
        candidate = f"{line} {word}" if line else word
        if line and len(candidate) + 2 > width:  # room for the " \" that continues it
            lines.append(line + " \\")
            line = "  " + word
        else:
            line = candidate
    return "\n".join([*lines, line])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m mesh.broker.acl",
                                     description="Print the redis-cli command that creates a Redis user "
                                                 "who may run the mesh in NAMESPACE and nothing else.")
    parser.add_argument("namespace", nargs="?", default="mesh", help="MESH_NAMESPACE (default: mesh)")
    parser.add_argument("--user", default="mesh", help="the ACL user's name (default: mesh)")
    parser.add_argument("--rules", action="store_true", help="print the rules only, one per line")
    args = parser.parse_args(argv)
    if args.rules:
        print("\n".join(acl_rules(args.namespace)))
    else:
        print(acl_command(args.namespace, args.user))


if __name__ == "__main__":
    main()
