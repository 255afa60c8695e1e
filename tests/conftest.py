import pytest
import torch


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


# Slow tests of files whose owners mark them there in due course (a @pytest.mark.slow beside the test is the rule
# elsewhere): the test's node id, or the node id of one of its parametrized cases.
SLOW = {
    "tests/test_soft.py::test_newton_converges_to_pinv[paper-512]",
    "tests/test_soft.py::test_newton_converges_to_pinv[spectral-512]",
    "tests/test_soft.py::test_newton_residual_decreases_monotonically",
    "tests/test_vision.py::test_backward_reaches_every_parameter[default]",
    "tests/test_vision.py::test_newton_layer_matches_exact_pseudo_inverse[True]",
    "tests/test_vision.py::test_other_resolutions[hw0]",
    "tests/test_vision.py::test_other_resolutions[hw1]",
    "tests/test_vision.py::test_tiny_flops_split",
    "tests/test_vision.py::test_variant_params_and_224_forward[soft_small]",
    "tests/test_vision.py::test_variant_params_and_224_forward[soft_medium]",
    "tests/test_vision.py::test_variant_params_and_224_forward[soft_large]",
    "tests/test_vision.py::test_variant_params_and_224_forward[soft_huge]",
}


@pytest.hookimpl(tryfirst=True)  # before -m deselects by marker
def pytest_collection_modifyitems(config, items):
    for item in items:
        if item.nodeid in SLOW or item.nodeid.split("[")[0] in SLOW:
            item.add_marker(pytest.mark.slow)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Optional libraries whose tests CI must really run: one closing line each says how many ran and passed.
REPORTED = {"tensorflow-datasets (tfds: sources)": "tests/test_tfds_sources.py"}


def pytest_terminal_summary(terminalreporter):
    for what, path in REPORTED.items():
        outcomes = [(key, r) for key in ("passed", "failed", "skipped", "error")
                    for r in terminalreporter.stats.get(key, []) if getattr(r, "nodeid", "").startswith(path)]
        if not outcomes:
            continue
        count = {key: sum(k == key for k, r in outcomes) for key in ("passed", "failed", "skipped", "error")}
        terminalreporter.write_line(f"{what}: {path} ran {count['passed'] + count['failed']} tests "
                                    f"({count['passed']} passing), skipped {count['skipped']}, errors {count['error']}")
