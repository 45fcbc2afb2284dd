"""pytest's hook for test_all.py: the order the two workers (pytest.ini) take the tests in."""


def pytest_collection_modifyitems(items):
    # the slow tier first, its last tests (run.sh's rehearsals, the longest) first of all: two
    # workers then start the long runs at once and the short tests fill in behind them, instead of
    # one worker finishing a long run alone at the end
    slow = [i for i in items if i.get_closest_marker("slow")]
    items[:] = slow[::-1] + [i for i in items if not i.get_closest_marker("slow")]
