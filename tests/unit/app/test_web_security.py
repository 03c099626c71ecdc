"""The console's CSRF token and origin rules (gateway.app.web.security)."""

from __future__ import annotations

from starlette.requests import Request

from gateway.app.web.security import csrf_matches, csrf_token, same_origin


def _request(**headers: str) -> Request:
    return Request(
        {
            "type": "http",
            "method": "POST",
            "scheme": "https",
            "server": ("127.0.0.1", 7745),
            "path": "/ui/logout",
            "query_string": b"",
            "headers": [(k.replace("_", "-").encode(), v.encode()) for k, v in headers.items()]
            + [(b"host", b"127.0.0.1:7745")],
        }
    )


def test_the_csrf_token_is_bound_to_the_session_token() -> None:
    token = csrf_token("pam_session_one")
    assert token == csrf_token("pam_session_one")  # stateless: any gateway computes it
    assert token != csrf_token("pam_session_two")
    assert "pam_session_one" not in token
    assert csrf_matches("pam_session_one", token)
    assert not csrf_matches("pam_session_two", token)
    assert not csrf_matches("pam_session_one", "")
    assert not csrf_matches("pam_session_one", None)
    assert not csrf_matches("pam_session_one", token[:-1])


def test_same_origin_trusts_only_this_gateways_pages() -> None:
    assert same_origin(_request())  # a non-browser client says nothing: the token decides
    assert same_origin(_request(origin="https://127.0.0.1:7745", sec_fetch_site="same-origin"))
    assert not same_origin(_request(origin="https://evil.example"))
    assert not same_origin(_request(origin="http://127.0.0.1:7745"))  # another scheme
    assert not same_origin(_request(origin="null"))
    assert not same_origin(_request(sec_fetch_site="cross-site"))
    assert not same_origin(_request(sec_fetch_site="same-site"))
