"""X-ray centring and the per-collection / per-sample state (pure functions)."""

import random
from datetime import UTC, datetime

import numpy as np
import pytest

from beamstream.cli.heatmap import render_heat_map
from beamstream.diffraction.centring import GridShape, combine_orthogonal, find_xray_centre
from beamstream.streams import collection_state as cs
from beamstream.streams import sample_centring

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def test_snaked_grid_positions():
    shape = GridShape(rows=3, columns=4, snaked=True)
    assert [shape.position(i) for i in range(8)] == [(0, 0), (0, 1), (0, 2), (0, 3), (1, 3), (1, 2), (1, 1), (1, 0)]
    assert GridShape(3, 4).position(5) == (1, 1)


def test_centre_of_a_symmetric_blob_is_its_middle():
    grid = np.zeros((7, 9), dtype=int)
    grid[2:5, 3:6] = [[10, 20, 10], [20, 40, 20], [10, 20, 10]]
    grid[6, 0] = 15  # an isolated weak position below half the maximum
    found = find_xray_centre(grid)
    assert (found.centre_row, found.centre_column) == pytest.approx((3.0, 4.0))
    assert (found.min_row, found.max_row, found.min_column, found.max_column) == (2, 4, 3, 5)
    assert found.n_positions == 5  # the centre and its four 20s reach half of 40
    assert found.best_position == (3, 4)
    assert found.to_motor(1.0, 2.0, 10.0, 20.0) == pytest.approx((1.04, 2.06))


def test_nothing_diffracted_gives_no_centre():
    assert find_xray_centre(np.zeros((3, 3))) is None
    with pytest.raises(ValueError):
        find_xray_centre(np.zeros(5))


def test_orthogonal_scans_combine_into_3d():
    assert combine_orthogonal((1.0, 2.0), (3.0, 4.0)) == (2.0, 2.0, 4.0)


def _result(image, spots, d_min=2.0):
    return {"image_number": image, "n_spots_no_ice": spots, "estimated_d_min": d_min}


def _grid_state(rows=3, columns=4):
    state = cs.CollectionState(dcid=9)
    cs.apply_start(state, {"experiment_type": "grid", "number_of_images": rows * columns,
                           "grid": {"rows": rows, "columns": columns, "step_x_um": 10.0, "step_y_um": 10.0,
                                    "snaked": True, "plane": "xy"}, "sample_id": 5})
    return state


def test_state_is_idempotent_and_order_independent():
    results = [_result(i, (i * 7) % 11, 1.5 + i / 10) for i in range(1, 13)]
    a, b = _grid_state(), _grid_state()
    for r in results:
        assert cs.apply_result(a, r)
    shuffled = results * 2
    random.Random(4).shuffle(shuffled)
    for r in shuffled:
        cs.apply_result(b, r)  # duplicates change nothing
    assert a.comparable() == b.comparable()
    assert a.n_seen == 12 and a.total_spots == sum(r["n_spots_no_ice"] for r in results)
    assert cs.CollectionState.from_json(a.to_json()).comparable() == a.comparable()


def test_completion_and_summary():
    state = _grid_state()
    for image in range(1, 12):
        cs.apply_result(state, _result(image, 0))
    assert cs.completion(state, now=0, timeout_s=30) is None
    cs.apply_end(state, {"event_time": 100.0, "images_collected": 12})
    assert cs.completion(state, now=110, timeout_s=30) is None
    assert cs.completion(state, now=131, timeout_s=30) == "incomplete"
    late = cs.CollectionState.from_json(state.to_json())
    cs.apply_result(late, _result(13, 1), now=125.0)  # still analysing: the timeout restarts
    assert cs.completion(late, now=131, timeout_s=30) is None
    assert cs.completion(late, now=156, timeout_s=30) == "incomplete"
    # A worker that took the partition over at 150 (its results may have queued meanwhile) waits afresh.
    assert cs.completion(late, now=156, timeout_s=30, owned_since=150.0) is None
    assert cs.completion(late, now=181, timeout_s=30, owned_since=150.0) == "incomplete"
    cs.apply_result(state, _result(12, 50))
    assert cs.completion(state, now=0, timeout_s=30) == "complete"
    summary = cs.build_summary(state, "complete", T0)
    assert summary["missing_images"] == []
    assert summary["best_image"] == 12
    # snaked: rows 0 and 2 run forwards, so image 12 is row 2, column 3
    assert summary["heat_map"][2 * 4 + 3] == 50
    assert summary["xray_centre"]["centre_row"] == 2 and summary["xray_centre"]["centre_column"] == 3
    assert summary["median_d_min"] == pytest.approx(2.01, abs=0.011)


def test_progress_every_step_and_always_at_the_end():
    state = cs.CollectionState(dcid=9)
    for image in range(1, 4):  # results folded in before the start event
        cs.apply_result(state, _result(image, 1))
    assert not cs.progress_due(state, finishing=True)  # nothing to announce against yet
    cs.apply_start(state, {"experiment_type": "rotation", "number_of_images": 25})
    announced = []
    for image in range(1, 26):
        cs.apply_result(state, _result(image, 1))
        if cs.progress_due(state, finishing=image == 25):
            state.announced = state.n_seen
            announced.append(state.n_seen)
    # the step is 2 (5 % of 25); the early three count once; the 25th goes out with the summary
    assert announced == [3, 5, 7, 9, 11, 13, 15, 17, 19, 21, 23, 25]
    assert not cs.progress_due(state, finishing=True)  # announced already: not again


def test_sample_centre_once_per_orthogonal_pair():
    state = sample_centring.empty_state()
    xy = {"dcid": 1, "sample_id": 5, "grid_plane": "xy", "xray_centre": {"centre_x_mm": 1.0, "centre_y_mm": 2.0}}
    xz = {"dcid": 2, "sample_id": 5, "grid_plane": "xz", "xray_centre": {"centre_x_mm": 3.0, "centre_y_mm": 4.0}}
    assert sample_centring.record_grid_summary(state, xy, T0) is None
    centre = sample_centring.record_grid_summary(state, xz, T0)
    assert (centre["x_mm"], centre["y_mm"], centre["z_mm"]) == (2.0, 2.0, 4.0)
    assert sample_centring.record_grid_summary(state, xz, T0) is None  # the same pair again
    state = sample_centring.load(sample_centring.dump(state))
    assert state["published"] == [[1, 2]]


def test_heat_map_text_marks_centre_weak_and_empty_positions():
    text = render_heat_map([0, 1, 90, 0, 100, 0], rows=2, columns=3, centre=(1.2, 0.8))
    lines = text.splitlines()
    assert lines[1].split() == ["0", "·", "...", "%%%"]  # 1 spot of 100 still shows as the weakest shade
    assert lines[2].split() == ["1", "·", "X", "·"]
    assert "100 spots" in lines[-1]
    with pytest.raises(ValueError):
        render_heat_map([1, 2, 3], rows=2, columns=2)
