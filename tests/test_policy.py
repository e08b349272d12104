"""The flagged-input policy: which images are flagged, what a request may ask for, and the
rejection a caller sees (indices, errors, threshold), with no server."""

from __future__ import annotations

import numpy as np
import pytest

from purifier.errors import ConfigError, FlaggedInputError, InvalidInputError
from purifier.policy import Policy


def test_flags_are_errors_strictly_above_the_threshold():
    p = Policy("forward", 0.05)
    assert p.flags([0.01, 0.05, 0.0500001, 0.2]).tolist() == [False, False, True, True]
    assert Policy("forward", None).flags([0.9, 5.0]).tolist() == [False, False]


def test_an_operator_threshold_overrides_the_cards():
    assert Policy.build("forward", None, 0.05).threshold == 0.05
    assert Policy.build("forward", 0.02, 0.05).threshold == 0.02
    assert Policy.build("forward", 0.0, 0.05).threshold == 0.0     # 0 is a threshold, not "unset"
    assert Policy.build("forward", 0.02, None).threshold == 0.02


def test_reject_needs_a_threshold_and_policies_are_named():
    with pytest.raises(ConfigError, match="calibrate"):
        Policy.build("reject", None, None)
    with pytest.raises(ConfigError, match="forward, reject"):
        Policy("drop", 0.1)


def test_forward_never_raises():
    Policy("forward", 0.05).check([0.5, 0.9], [True, True])


def test_reject_names_every_flagged_image_its_error_and_the_threshold():
    p = Policy("reject", 0.05)
    errors = np.array([0.01, 0.25, 0.03, 0.125])
    p.check(errors[[0, 2]], p.flags(errors[[0, 2]]))      # nothing flagged: no error
    with pytest.raises(FlaggedInputError) as e:
        p.check(errors, p.flags(errors))
    assert e.value.indices == (1, 3)
    assert e.value.errors == (0.25, 0.125) and e.value.threshold == 0.05
    msg = str(e.value)
    assert "2 of 4 images" in msg and "threshold 0.05" in msg
    assert "image 1 error 0.25" in msg and "image 3 error 0.125" in msg
    assert "image 0" not in msg and "nothing was forwarded" in msg


def test_a_request_may_only_tighten_the_servers_policy():
    lenient, strict = Policy("forward", 0.05), Policy("reject", 0.05)
    assert lenient.for_request(None) is lenient and lenient.for_request("") is lenient
    assert lenient.for_request("reject") == strict
    assert strict.for_request("reject") is strict and strict.for_request(None) is strict
    with pytest.raises(InvalidInputError, match="stricter"):
        strict.for_request("forward")
    with pytest.raises(InvalidInputError, match="unknown flagged-input policy 'drop'"):
        lenient.for_request("drop")


def test_a_request_asking_to_reject_on_an_uncalibrated_server_is_refused():
    with pytest.raises(InvalidInputError, match="no detection threshold"):
        Policy("forward", None).for_request("reject")


def test_the_server_policy_and_threshold_come_from_flags_and_env():
    import argparse

    from purifier.settings import add_serve_arguments, serve_settings

    s = serve_settings(environ={"PURIFIER_ON_FLAGGED": "reject", "PURIFIER_THRESHOLD": "0.02"})
    assert (s.on_flagged, s.threshold) == ("reject", 0.02)
    p = argparse.ArgumentParser()
    add_serve_arguments(p)
    s = serve_settings(p.parse_args(["--on-flagged", "forward", "--threshold", "0.5"]),
                       environ={"PURIFIER_ON_FLAGGED": "reject"})
    assert (s.on_flagged, s.threshold) == ("forward", 0.5)             # the flag wins
    assert (serve_settings(environ={}).on_flagged, serve_settings(environ={}).threshold) == ("forward", None)
    with pytest.raises(ConfigError, match="--on-flagged 'drop': choose one of forward, reject"):
        serve_settings(environ={"PURIFIER_ON_FLAGGED": "drop"})
    with pytest.raises(ConfigError, match="--threshold -1.0"):
        serve_settings(environ={"PURIFIER_THRESHOLD": "-1"})
