"""The data keys against each other and the layout: one line each, before anything starts."""

import pytest

from moemesh.config.validate import validate_run
from moemesh.errors import ConfigError
from tests.helpers import tiny_run


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            {"data.kind": "tokens"},
            r"data=tokens reads exactly one of data.path=DIR or data.sources=.* \(neither is set\)",
        ),
        (
            {"data.kind": "tokens", "data.path": "a", "data.sources": [{"path": "b", "weight": 1.0}]},
            r"\(both are set\)",
        ),
        ({"data.kind": "tokens", "data.sources": []}, r"data.sources=\[\] is empty"),
        (
            {"data.kind": "tokens", "data.sources": [{"path": "a", "weight": 0.0}]},
            "weight=0.0 must be a finite number > 0",
        ),
        ({"data.kind": "tokens", "data.sources": [{"path": "a", "weight": float("nan")}]}, "weight=nan must be"),
        (
            {"data.kind": "tokens", "data.sources": [{"path": "a", "weight": 1.0}, {"path": "b", "weight": 1e-5}]},
            r"data.sources\[1\].weight=1e-05 is under 1/4096 of the total",
        ),
        ({"data.kind": "tokens", "data.sources": [{"path": "", "weight": 1.0}]}, r"data.sources\[0\].path is empty"),
        ({"data.sources": [{"path": "a", "weight": 1.0}]}, "is ignored by data=synthetic; it is read by data=tokens"),
        ({"data.document_mask": True}, "data.document_mask=true needs document boundaries, which data=synthetic"),
        ({"data.prefetch_steps": -1}, "data.prefetch_steps=-1 must be >= 0"),
        (
            {
                "data.kind": "stdlib",
                "data.document_mask": True,
                "parallel.name": "pp2",
                "parallel.pipeline_parallel_size": 2,
            },
            "data.document_mask=true with parallel.pipeline_parallel_size=2",
        ),
    ],
)
def test_data_keys_are_checked_in_one_line(overrides, message):
    with pytest.raises(ConfigError, match=message) as err:
        validate_run(tiny_run(**overrides))
    assert "\n" not in str(err.value)


def test_valid_data_keys_pass():
    validate_run(tiny_run(**{"data.kind": "tokens", "data.path": "x"}))
    validate_run(tiny_run(**{"data.kind": "stdlib", "data.document_mask": True}))
    sources = [{"path": "a", "weight": 0.7}, {"path": "b", "weight": 0.3}]
    run = tiny_run(**{"data.kind": "tokens", "data.sources": sources, "data.val_path": "v"})
    validate_run(run)
    assert [s.weight for s in run.data.sources] == [0.7, 0.3]


@pytest.mark.parametrize(
    "override, message",
    [
        (
            "data.sources=[{path: a, wieght: 0.7}]",
            "data.sources: an item has no key wieght; did you mean weight? (valid keys of an item: path, weight)",
        ),
        ("data.sources=[{path: a, weight: abc}]", "data.sources[*].weight=abc: expected a number"),
    ],
)
def test_a_mistake_inside_a_source_names_the_list(override, message):
    from moemesh.config.cli import preflight
    from moemesh.config.schema import register_schema

    register_schema()  # train.py does this at import
    with pytest.raises(ConfigError) as err:
        preflight(["data=tokens", override])
    assert str(err.value) == message
