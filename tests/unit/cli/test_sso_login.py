"""When `pam login --sso` tries a browser (cli/sso_login.py)."""

from __future__ import annotations

import pytest

from cli.sso_login import may_open_browser


@pytest.mark.parametrize(
    ("env", "platform", "expected"),
    [
        ({}, "linux", False),
        ({"DISPLAY": ":0"}, "linux", True),
        ({"WAYLAND_DISPLAY": "wayland-0"}, "linux", True),
        ({"DISPLAY": ":0", "PAM_NO_BROWSER": "1"}, "linux", False),
        ({"DISPLAY": ":0", "PAM_NO_BROWSER": "0"}, "linux", True),
        ({}, "freebsd13", False),
        ({}, "darwin", True),
        ({"PAM_NO_BROWSER": "yes"}, "darwin", False),
        ({}, "win32", True),
    ],
)
def test_a_browser_is_tried_only_where_one_can_show(
    env: dict[str, str], platform: str, expected: bool
) -> None:
    assert may_open_browser(env, platform) is expected
