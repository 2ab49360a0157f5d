"""How many intra-op threads a worker takes: explicit, or shared among all served workers."""

import pytest

from kiln.handlers.handler import intra_op_threads


@pytest.mark.parametrize("option,config,environ,cores,expected", [
    (3, {"minWorkers": 1}, {}, 16, 3),                                   # explicit wins
    ("auto", {"minWorkers": 1}, {}, 2, 2),                              # alone on 2 cores
    ("auto", {"minWorkers": 2}, {}, 2, 1),
    ("auto", {"minWorkers": 1}, {"KILN_SERVED_WORKERS": "4"}, 2, 1),    # 4 models, 2 cores
    ("auto", {"minWorkers": 1}, {"KILN_SERVED_WORKERS": "4"}, 16, 4),
    ("auto", {}, {"KILN_SERVED_WORKERS": "junk"}, 8, 8),
    ("auto", None, {}, None, 1),
])
def test_intra_op_threads(option, config, environ, cores, expected):
    assert intra_op_threads(option, config, environ, cores) == expected
