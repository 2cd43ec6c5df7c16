"""The ACL user the docs give operators is the one the code generates (and the one
tests/broker/test_redis_auth.py runs every command under)."""

from __future__ import annotations

import re
import subprocess
import sys

from conftest import ROOT

from mesh.broker.acl import DOC_PAGE, acl_command, main
from mesh.broker.connection import ACL_COMMANDS, acl_rules


def fenced_blocks(text: str) -> list[str]:
    return [m.group(1) for m in re.finditer(r"```[a-z]*\n(.*?)\n```", text, re.S)]


def test_the_documented_acl_command_is_the_generated_one():
    blocks = fenced_blocks((ROOT / DOC_PAGE).read_text())
    documented = [b for b in blocks if b.startswith("redis-cli ACL SETUSER")]
    assert documented == [acl_command("mesh")], f"regenerate {DOC_PAGE}: python -m mesh.broker.acl"


def test_every_page_that_gives_the_acl_command_gives_the_generated_one():
    pages = {}
    for page in sorted((ROOT / "docs").rglob("*.md")):
        for block in fenced_blocks(page.read_text()):
            if "ACL SETUSER" in block:
                pages[str(page.relative_to(ROOT))] = block
    assert DOC_PAGE in pages
    stale = [page for page, block in pages.items() if block != acl_command("mesh")]
    assert stale == [], f"regenerate the ACL command in {stale}: python -m mesh.broker.acl"


def test_the_generated_command_holds_every_rule_once_and_fits_80_columns():
    command = acl_command("mesh")
    assert all(len(line) <= 80 for line in command.splitlines())
    words = command.replace("\\\n", " ").replace("'", "").split()
    assert words[words.index("resetkeys"):] == acl_rules("mesh")
    assert len(set(ACL_COMMANDS)) == len(ACL_COMMANDS)
    assert {"zscan", "sscan"} <= set(ACL_COMMANDS)  # id prefixes and status KEY walk one set


def test_python_m_mesh_broker_acl_prints_it_for_any_namespace(capsys):
    main(["orders", "--user", "orders-mesh"])
    assert capsys.readouterr().out == acl_command("orders", "orders-mesh") + "\n"
    main(["orders", "--rules"])
    assert capsys.readouterr().out.split() == acl_rules("orders")
    done = subprocess.run([sys.executable, "-m", "mesh.broker.acl"], capture_output=True, text=True, cwd=ROOT,
                          check=True)
    assert done.stdout == acl_command() + "\n" and done.stderr == ""
