"""The numpy-built `scores` of a ScoreResponse are the message that adding Score entries one by one builds."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from serving.pb import ctr_scoring_pb2 as pb
from serving.scoring import scores_wire

floats = st.floats(allow_nan=False, width=64) | st.sampled_from([0.0, -0.0, 1e-45, 3.5e38, 1e300, -1e300])


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(floats, floats), max_size=50))
def test_scores_wire_equals_the_scores_added_one_by_one(pairs):
    pctr = np.array([p for p, _ in pairs], np.float64)
    ecpm = np.array([e for _, e in pairs], np.float64)
    expected = pb.ScoreResponse(model_name="fin", model_version=3)
    for p, e in pairs:
        expected.scores.add(pctr=p, ecpm=e)
    built = pb.ScoreResponse(model_name="fin", model_version=3)
    built.MergeFromString(scores_wire(pctr, ecpm))
    assert built.SerializeToString() == expected.SerializeToString()
    assert [(s.pctr, s.ecpm) for s in built.scores] == [(s.pctr, s.ecpm) for s in expected.scores]
