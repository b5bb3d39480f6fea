"""`kvstore serve --help` names each flag's default once."""
from __future__ import annotations

import re

from kvstore.server.config import OPTIONS, build_parser


def test_each_default_is_named_once():
    helps = {a.option_strings[0]: a.help or "" for a in build_parser()._actions if a.option_strings}
    for opt in OPTIONS:
        n = len(re.findall(r"\(default: ", helps[opt.flag]))
        assert n == (0 if opt.type is bool else 1), f"{opt.flag}: {helps[opt.flag]!r}"


def test_a_derived_default_keeps_its_own_words():
    text = " ".join(build_parser().format_help().split())
    assert "member name (default: node<id>)" in text
    assert "(default: '')" not in text
