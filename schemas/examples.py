"""One valid example event of every record type: for the demo, docs and tests."""

from __future__ import annotations

import copy
from datetime import UTC, datetime

_T0 = datetime(2026, 1, 1, 12, 0, 0, tzinfo=UTC)

_EXAMPLES: dict[str, dict] = {
    "CollectionStarted": {
        "dcid": 1001, "beamline": "i03", "experiment_type": "grid", "number_of_images": 20,
        "start_image_number": 1, "file_template": "/dls/i03/data/2026/cm1/grid/thau_1_####.cbf",
        "grid": {"rows": 4, "columns": 5, "step_x_um": 20.0, "step_y_um": 20.0, "origin_x_mm": 0.1,
                 "origin_y_mm": -0.2, "snaked": True, "plane": "xy"},
        "sample_id": 77,
        "detector": {"name": "PILATUS3 6M", "wavelength_A": 0.96859, "distance_mm": 351.0,
                     "beam_center_x_px": 1261.61, "beam_center_y_px": 1306.96, "pixel_size_x_mm": 0.172,
                     "pixel_size_y_mm": 0.172, "width_px": 2463, "height_px": 2527},
        "exposure_time_s": 0.01, "oscillation_start_deg": 0.0, "oscillation_width_deg": 0.0,
        "processing_job_id": None, "event_time": _T0,
    },
    "ImageArrived": {
        "dcid": 1001, "image_number": 1, "file_path": "/dls/i03/data/2026/cm1/grid/thau_1_0001.cbf",
        "frame_index": 0, "arrival_time": _T0, "source": "detector", "processing_job_id": None,
    },
    "CollectionEnded": {
        "dcid": 1001, "images_collected": 20, "status": "success", "processing_job_id": None, "event_time": _T0,
    },
    "ImageResult": {
        "dcid": 1001, "image_number": 1, "file_path": "/dls/i03/data/2026/cm1/grid/thau_1_0001.cbf",
        "frame_index": 0, "processing_job_id": None, "n_spots_total": 120, "n_spots_no_ice": 110,
        "n_spots_4A": 80, "total_intensity": 123456.0, "estimated_d_min": 1.9, "d_min_distl_method_1": 2.1,
        "d_min_distl_method_2": 2.0, "noisiness_method_1": 0.1, "noisiness_method_2": 0.2,
        "n_strong_pixels": 900,
        "brightest_spots": [{"x_px": 1300.5, "y_px": 1200.25, "intensity": 5000.0, "d_A": 3.2}],
        "read_time_s": 0.05, "analysis_time_s": 0.12, "event_time": _T0, "result_time": _T0,
        "worker_id": "worker@host:1234", "analysis_backend": "numba",
    },
    "CollectionCheck": {
        "dcid": 1001, "processing_job_id": None, "reason": "timeout", "event_time": _T0,
    },
    "CollectionProgress": {
        "dcid": 1001, "processing_job_id": None, "images_expected": 20, "images_analysed": 10,
        "best_image": 7, "best_image_spots": 150, "event_time": _T0,
    },
    "CollectionSummary": {
        "dcid": 1001, "processing_job_id": None, "experiment_type": "grid", "status": "complete",
        "images_expected": 20, "images_analysed": 20, "missing_images": [], "best_image": 7,
        "best_image_spots": 150, "total_spots": 900, "median_d_min": 2.2,
        "xray_centre": {"centre_column": 2.4, "centre_row": 1.6, "centre_x_mm": 0.148, "centre_y_mm": -0.168,
                        "min_column": 1, "max_column": 3, "min_row": 1, "max_row": 2, "n_positions": 6,
                        "total_count": 800},
        "heat_map": [0] * 5 + [0, 50, 150, 90, 0] + [0, 60, 120, 80, 0] + [0] * 5,
        "sample_id": 77, "grid_plane": "xy", "data_reduction_requested": False, "event_time": _T0,
    },
    "ProcessingRequest": {
        "request_id": "5b0c1f9e-1f7e-4d8e-9a57-0d7d2c1a0001", "kind": "reprocess", "dcid": 1001,
        "processing_job_id": 5, "recipe": "per-image-analysis", "parameters": {"d_min": "2.5"},
        "image_ranges": [{"start": 1, "end": 20}], "requested_by": "staff", "event_time": _T0,
    },
    "DeadLetter": {
        "reason": "image file /dls/i03/missing.cbf does not exist", "error_type": "ImageReadError",
        "service": "image-analysis", "source_topic": "beamstream.images", "source_partition": 3,
        "source_offset": 42, "key": b"1001", "payload": b"\xc3\x01not-really", "headers": [],
        "attempts": 3, "reinjected_count": 0, "dcid": 1001, "image_number": 5, "failed_at": _T0,
    },
    "DeadLetterResolved": {
        "dead_letter_topic": "beamstream.deadletter", "dead_letter_partition": 1, "dead_letter_offset": 7,
        "action": "reinjected", "source_topic": "beamstream.images", "source_partition": 3, "source_offset": 42,
        "failed_at": _T0, "target_topic": "beamstream.images", "target_partition": 3, "target_offset": 57,
        "reinjected_count": 1, "resolved_by": "staff@host", "resolved_at": _T0,
    },
    "ArchiveComplete": {
        "dcid": 1001, "processing_job_id": None, "beamline": "i03",
        "file_template": "/dls/i03/data/2026/cm1/grid/thau_1_####.cbf", "collection_status": "success",
        "manifest_path": "/dls/i03/data/2026/cm1/grid/thau_1.manifest.json",
        "manifest_sha256": "9f86d081884c7d659a2feaa0c55ad015a3bf4f1b2b0b822cd15d6c15b0f00a08", "files": 19,
        "total_bytes": 118000000, "missing_files": ["/dls/i03/data/2026/cm1/grid/thau_1_0020.cbf"],
        "complete": False, "event_time": _T0,
    },
    "SampleCentre": {
        "sample_id": 77, "x_mm": 0.15, "y_mm": -0.17, "z_mm": 0.02, "xy_dcid": 1001, "xz_dcid": 1002,
        "event_time": _T0,
    },
    "MonitorEvent": {
        "monitor_id": "monitor@host:99", "kind": "decision", "code": "scale_up",
        "message": "lag 1200 images: 2 -> 4 workers", "workers": 2, "target_workers": 4, "lag": 1200,
        "produce_rate_hz": 100.0, "consume_rate_hz": 40.0, "new_dead_letters": 0, "event_time": _T0,
    },
    "ServiceHeartbeat": {
        "service_id": "worker@host:1234", "service_type": "worker", "host": "host", "pid": 1234,
        "status": "running", "version": "0.1.0", "started_at": _T0, "sent_at": _T0,
        "stats": {"images": 10.0, "rate_hz": 2.5},
    },
}


def example_event(name: str) -> dict:
    """A fresh, valid example value of record type ``name``."""
    return copy.deepcopy(_EXAMPLES[name])


def example_names() -> list[str]:
    """Record types that have an example."""
    return sorted(_EXAMPLES)
