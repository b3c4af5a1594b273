"""Shared fixtures: real services and real data, started per session on free ports."""

from tests.fixtures_broker import *  # noqa: F403
from tests.fixtures_model import *  # noqa: F403
