"""The main suite's fixtures, shared with this separately invoked folder."""

from tests.conftest import demo_data_dirs  # noqa: F401
