import pytest


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Keep each phase's report on the test item, so a fixture can see whether the test failed."""
    outcome = yield
    setattr(item, f"report_{call.when}", outcome.get_result())
