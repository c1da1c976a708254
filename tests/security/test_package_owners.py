"""Packages with owners, against a real broker: an upload is its uploader's (their `requires=` finds it,
nobody else's does), publishing site-wide is for admins, and `upload` alone is enough to upload."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

import park
from harness import as_user  # type: ignore[import-not-found]
from park.errors import ParkError

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from test_packages import write_project  # noqa: E402  (the same tiny project)

pytestmark = pytest.mark.timeout(240)


def who(name: str) -> str:
    """A body for the project's module: a function that says whose upload this is."""
    return f"def who():\n    return {name!r}\n"


def test_an_upload_is_its_uploaders_and_nobody_can_take_or_shadow_it(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()
    with broker.service():
        assert park.install_service(write_project(tmp_path / "alice", "1.0", body=who("alice"))).wait(
            timeout=180) == "completed"
        mine = park.submit("mymodel:who", requires=["mymodel==1.0"])
        assert mine.result(timeout=60) == "alice"
    with as_user(broker, "bob", tmp_path, "--allow", "submit,upload"):
        with pytest.raises(ParkError) as refused:
            with broker.service():
                park.submit("park_test_tasks:noop", requires=["mymodel==1.0"])
        assert "mymodel==1.0" in str(refused.value) and "no version of mymodel" in str(refused.value)
        with broker.service() as bob:
            # Bob's own mymodel 1.0, other bytes: his, beside alice's, and what his jobs get.
            assert park.install_service(write_project(tmp_path / "bob", "1.0", body=who("bob"))).wait(
                timeout=180) == "completed"
            his = park.submit("mymodel:who", requires=["mymodel==1.0"])
            assert his.result(timeout=60) == "bob"
            assert [(p.name, p.owner) for p in bob.packages()] == [("mymodel", "bob")]
    with broker.service():
        again = park.submit("mymodel:who", requires=["mymodel==1.0"], memo=False)
        assert again.result(timeout=60) == "alice", "bob's upload did not shadow alice's"


def test_publishing_site_wide_is_for_admins(new_broker, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    broker = new_broker().start()   # the test user may submit and upload, not administer
    with pytest.raises(ParkError) as refused:
        with broker.service():
            park.install_service(write_project(tmp_path / "p", "1.0"), site_wide=True)
    assert "may not admin" in str(refused.value)
    with as_user(broker, "root-admin", tmp_path, "--allow", "submit,upload,admin"):
        with broker.service():
            assert park.install_service(write_project(tmp_path / "q", "1.0", body=who("site")),
                                        site_wide=True).wait(timeout=180) == "completed"
    with as_user(broker, "carol", tmp_path, "--allow", "submit"):
        with broker.service() as carol:
            used = park.submit("mymodel:who", requires=["mymodel==1.0"])
            assert used.result(timeout=60) == "site"
            assert [(p.name, p.owner) for p in carol.packages()] == [("mymodel", "")]
