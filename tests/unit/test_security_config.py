"""Security settings: built at the edge, validated, never shown."""

from __future__ import annotations

import pytest

from paramserver.config import Security, load_security


def test_the_token_comes_from_the_argument_then_the_file_then_the_environment(tmp_path):
    path = tmp_path / "token"
    path.write_text("  from-file\n")
    env = {"PARAMSERVER_TOKEN": "from-env"}
    assert load_security(token="given", token_file=path, environ=env).token == "given"
    assert load_security(token_file=path, environ=env).token == "from-file"
    assert load_security(environ=env).token == "from-env"
    assert load_security(environ={}).token == ""


def test_a_token_is_never_shown_and_must_be_metadata_safe():
    assert "s3cret" not in repr(Security(token="s3cret"))
    for bad in ("with space", "tab\there", "caf\u00e9", "new\nline"):
        with pytest.raises(ValueError, match="printable ASCII") as info:
            Security(token=bad)
        assert bad not in str(info.value)


def test_an_unreadable_or_empty_token_file_names_the_file(tmp_path):
    (tmp_path / "empty").write_text(" \n")
    with pytest.raises(ValueError, match="is empty") as info:
        load_security(token_file=tmp_path / "empty", environ={})
    assert str(tmp_path / "empty") in str(info.value)
    with pytest.raises(ValueError, match="cannot read token file"):
        load_security(token_file=tmp_path / "missing", environ={})
