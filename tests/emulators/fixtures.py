"""Pytest fixtures for the emulators.

Import the fixture functions into a conftest (or a test module) to use them::

    from tests.emulators.fixtures import shodan_emulator_fixture  # noqa: F401

which provides the ``shodan_emulator`` fixture.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.emulators.shodan import ShodanEmulator


@pytest.fixture(name="shodan_emulator")
def shodan_emulator_fixture() -> Iterator[ShodanEmulator]:
    """A fresh Shodan emulator per test, enforcing Shodan's 1 request/s per key."""
    with ShodanEmulator(rate=1.0) as emulator:
        yield emulator
