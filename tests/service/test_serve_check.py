"""scripts/serve_check.py's checks: a right answer passes, each kind of wrong answer is caught."""

from __future__ import annotations

import numpy as np
import pytest

from purifier.proto.purifier.v1 import purifier_pb2 as pb


@pytest.fixture(scope="module")
def serve_check(load_script):
    return load_script("serve_check")


def answer(out: np.ndarray, errors) -> pb.PurifyResponse:
    return pb.PurifyResponse(purification=pb.Purification(
        images=pb.Tensor(dtype=pb.FLOAT32, shape=list(out.shape), data=out.astype(np.float32).tobytes()),
        reconstruction_error=list(errors)))


@pytest.fixture
def case(serve_check):
    rng = np.random.default_rng(0)
    x = rng.random((6, 1, 4, 4), dtype=np.float32)
    purified = np.clip(x + rng.normal(0, 0.05, x.shape).astype(np.float32), 0, 1)
    return serve_check.Checker(x, purified, tol=1e-4, err_tol=1e-3), x, purified


def mse(a, b):
    return ((a - b) ** 2).reshape(len(a), -1).mean(1)


def test_right_answers_pass(case):
    checker, x, ref = case
    idx = [4, 1, 1]
    checker.check("batch", idx, answer(ref[idx], mse(ref[idx], x[idx])))
    checker.check("seeded", [2], answer(ref[[2]], mse(ref[[2]], x[[2]])))
    assert dict(checker.failures) == {} and checker.images == {"batch": 3, "seeded": 1}


def test_swapped_slots_are_caught(case):
    checker, x, ref = case
    out = ref[[1, 4]]                       # answers for images 4 and 1, handed back swapped
    checker.check("batch", [4, 1], answer(out, mse(out, x[[4, 1]])))
    assert checker.failures["owner"] == 2


def test_owner_is_not_judged_where_the_right_answer_is_nearer_another_input(serve_check):
    """An image whose correct (reference) answer lies nearer another input of the set cannot
    show a misrouted answer by nearness: it is listed and not judged; the others still are."""
    rng = np.random.default_rng(1)
    x = rng.random((4, 1, 4, 4), dtype=np.float32)
    ref = x.copy()
    ref[2] = 0.2 * x[2] + 0.8 * x[3]                # image 2's right answer is nearer input 3
    checker = serve_check.Checker(x, ref, tol=1e-4, err_tol=1e-3)
    assert checker.identifiable.tolist() == [True, True, False, True]
    checker.check("batch", [2, 0], answer(ref[[2, 0]], mse(ref[[2, 0]], x[[2, 0]])))
    assert dict(checker.failures) == {}
    out = ref[[1, 0]]                               # images 0 and 1 swapped: still caught
    checker.check("batch", [0, 1], answer(out, mse(out, x[[0, 1]])))
    assert checker.failures["owner"] == 2


def test_a_wrong_reported_error_is_caught(case):
    checker, x, ref = case
    checker.check("default", [0], answer(ref[[0]], mse(ref[[0]], x[[0]]) * 1.5))
    assert checker.failures["reported_error"] == 1


def test_a_seeded_answer_that_moved_is_caught(case):
    checker, x, ref = case
    out = np.clip(ref[[3]] + 0.01, 0, 1)
    checker.check("seeded", [3], answer(out, mse(out, x[[3]])))
    assert checker.failures["seeded_equals_reference"] == 1 and checker.worst["seeded_max_abs_diff"] > 0.005


def test_wrong_shape_and_range_are_caught(case):
    checker, x, ref = case
    checker.check("batch", [0, 1], answer(ref[[0]], [0.0]))
    bad = ref[[5]].copy()
    bad[0, 0, 0, 0] = 1.5
    checker.check("default", [5], answer(bad, mse(bad, x[[5]])))
    assert checker.failures["shape"] == 1 and checker.failures["range"] == 1


def test_v2_answers_are_read_and_checked_too(case, serve_check):
    from purifier.proto.inference import grpc_service_pb2 as v2_pb
    from purifier.server import v2

    checker, x, ref = case

    def v2_answer(out, errors):
        r = v2_pb.ModelInferResponse(model_name="purifier")
        v2.add_output(r, "purified", out.astype(np.float32))
        v2.add_output(r, "reconstruction_error", np.asarray(errors, np.float32))
        return r

    checker.check("v2_seeded", [2], v2_answer(ref[[2]], mse(ref[[2]], x[[2]])))
    checker.check("v2_batch", [0, 3], v2_answer(ref[[3, 0]], mse(ref[[3, 0]], x[[0, 3]])))
    assert dict(checker.failures) == {"owner": 2}
    assert serve_check.v2_request(x[:2], seed=5).parameters["purifier_seed"].int64_param == 5


def test_rest_answers_are_read_and_checked_too(case, serve_check):
    checker, x, ref = case
    body = {"outputs": [
        {"name": "purified", "datatype": "FP32", "shape": [1, 1, 4, 4], "data": ref[[1]].ravel().tolist()},
        {"name": "reconstruction_error", "datatype": "FP32", "shape": [1], "data": mse(ref[[1]], x[[1]]).tolist()}]}
    checker.check("rest_seeded", [1], serve_check.RestAnswer(body))
    assert dict(checker.failures) == {} and checker.images == {"rest_seeded": 1}
    checker.check("rest_seeded", [2], serve_check.RestAnswer(body))    # image 1's answer for image 2
    assert checker.failures["owner"] == 1 and checker.failures["seeded_equals_reference"] == 1


def test_an_unseeded_answer_a_little_nearer_a_similar_input_is_not_misrouted(serve_check):
    """Unseeded answers are one draw of the random starts: nearer another input by less than
    OWNER_MARGIN is purification noise; clearly nearer (a misrouted answer) still fails, and a
    seeded answer is judged strictly."""
    rng = np.random.default_rng(2)
    x = rng.uniform(0.1, 0.9, (3, 1, 4, 4)).astype(np.float32)
    x[1] = x[0] + 0.05                              # two similar inputs (all in [0, 1])
    ref = x.copy()
    checker = serve_check.Checker(x, ref, tol=1e-4, err_tol=1e-3)
    assert checker.identifiable.all()
    drift = 0.45 * x[0] + 0.55 * x[1]               # image 0's unseeded answer, drifted past the midpoint
    out = drift[None]
    checker.check("batch", [0], answer(out, mse(out, x[[0]])))
    assert dict(checker.failures) == {}
    checker.check("seeded", [0], answer(out, mse(out, x[[0]])))
    assert checker.failures["owner"] == 1
    wrong = ref[[2]]                                # image 2's answer handed to image 0
    checker.check("batch", [0], answer(wrong, mse(wrong, x[[0]])))
    assert checker.failures["owner"] == 2
    assert checker.examples[-1]["own_over_nearest"] > serve_check.OWNER_MARGIN
