"""What Beamstream events become in ISPyB: pure functions from event values to row values, no I/O.

ImageQualityIndicators ← ImageResult (DIALS per-image analysis; ISPyB's columns are DISTL's):

===========================  =================================  ==============================================
column                       from                               why / note
===========================  =================================  ==============================================
dataCollectionId             dcid
imageNumber                  image_number                       1-based, as ISPyB numbers images
autoProcProgramId            the run's AutoProcProgram          one per (dcid, processing job), see below
spotTotal                    n_spots_total                      DISTL "Spot Total"
goodBraggCandidates          n_spots_no_ice                     DISTL "Good Bragg Candidates": spots off ice rings
inResTotal                   n_spots_4A                         DISTL "In-Resolution Total" counts spots inside a
                                                                resolution limit; DIALS counts them inside 4 Å
method1Res                   d_min_distl_method_1               Å; NULL when undefined
method2Res                   d_min_distl_method_2               Å; NULL when undefined
totalIntegratedSignal        total_intensity                    both sum the good Bragg candidates only
recordTimeStamp              result_time                        UTC
iceRings                     NULL                               DISTL's figure is a number of rings; DIALS
                                                                finds spots on rings but does not count rings
maxUnitCell, pctSaturation-  NULL                               not computed by DIALS' per-image analysis
Top50Peaks, inResolution-
OvrlSpots, binPopCutOff-
Method2Res
dozor_score, driftFactor     NULL                               Dozor / serial-crystallography figures
imageId                      NULL                               Beamstream does not create Image rows
===========================  =================================  ==============================================

Diamond's ``upsert_quality_indicators`` writes ``estimated_d_min`` into both
method columns and zeros into the columns it has no value for; here every column
holds the quantity its name says, or NULL. A NULL (or a not-a-number) in a result
never overwrites a stored value (see :mod:`connectors.ispyb_writer`).

Processing runs: each (dcid, processing_job_id) pair — live processing has
``processing_job_id`` null — is one AutoProcProgram, found again by a
deterministic ``jobUuid`` so replays reuse it. Reprocessing runs store their
per-image rows in ``ReprocessedImageQualityIndicators`` keyed by
(autoProcProgramId, imageNumber): ISPyB's own table is keyed by (dataCollectionId,
imageNumber) only, so a reprocessing run could not share it without overwriting
the live results.
"""

from __future__ import annotations

import math
import uuid
from datetime import UTC, datetime
from importlib import metadata


def _version() -> str:
    try:
        return metadata.version("beamstream")
    except metadata.PackageNotFoundError:  # running from a source tree that was never installed
        return "dev"


BEAMSTREAM_VERSION = _version()

#: AutoProcProgram.processingPrograms of every run Beamstream registers.
PROGRAM_NAME = "beamstream-per-image-analysis"
#: ProcessingJob.recipe of Beamstream's jobs (live and `beamstream go`).
RECIPE = "per-image-analysis"
#: Namespace of the runs' deterministic jobUuid values.
RUN_NAMESPACE = uuid.UUID("6c1f3a52-9d0e-4b8a-a2f4-5e7d3c9b1a01")
#: ProcessingJob.displayName of the job registered for a collection's live processing.
LIVE_JOB_NAME = "beamstream live per-image analysis"
#: Columns the ImageResult fills (besides the key and autoProcProgramId).
RESULT_COLUMNS = ("spotTotal", "goodBraggCandidates", "inResTotal", "method1Res", "method2Res",
                  "totalIntegratedSignal", "recordTimeStamp")
MESSAGE_LENGTH = 255  # AutoProcProgram.processingMessage

#: ISPyB processingStatus values (NULL while running).
STATUS_SUCCESS = 1
STATUS_FAILED = 0


#: The largest ids and image numbers ISPyB's columns hold (INT and ImageQualityIndicators.imageNumber's
#: MEDIUMINT), and the largest FLOAT: past them the database refuses the row, a message at a time.
MAX_ID = 2**31 - 1
MAX_IMAGE_NUMBER = 2**23 - 1
MAX_FLOAT = 3.4e38


class RecordError(ValueError):
    """An event that decodes but cannot be stored (the message says what is wrong)."""


def utc_naive(value: datetime | None) -> datetime | None:
    """A timestamp as naive UTC, which DATETIME columns take on every driver."""
    if value is None:
        return None
    if value.tzinfo is not None:
        value = value.astimezone(UTC).replace(tzinfo=None)
    return value


def _finite(value: float | None) -> float | None:
    # DIALS reports -1 (and arithmetic may give NaN) where a figure is undefined; ISPyB's way is NULL.
    if value is None or not math.isfinite(value):
        return None
    return float(value)


def _resolution(value: float | None) -> float | None:
    value = _finite(value)
    return value if value is not None and 0 < value < MAX_FLOAT else None  # 1e300 Å is as undefined as -1


def run_key(value: dict) -> tuple[int, int | None]:
    """The processing run an event belongs to: (dcid, processing_job_id or None for live)."""
    return int(value["dcid"]), value.get("processing_job_id")


def run_uuid(dcid: int, processing_job_id: int | None) -> bytes:
    """The 16-byte AutoProcProgram.jobUuid of a run: the same for every replay of its events."""
    name = f"{PROGRAM_NAME}:{dcid}:{processing_job_id if processing_job_id is not None else 'live'}"
    return uuid.uuid5(RUN_NAMESPACE, name).bytes


def _check_ids(value: dict) -> None:
    if not 1 <= value["dcid"] <= MAX_ID:
        raise RecordError(f"dcid must be from 1 to {MAX_ID}, got {value['dcid']}")
    job = value.get("processing_job_id")
    if job is not None and not 1 <= job <= MAX_ID:
        raise RecordError(f"processing_job_id must be from 1 to {MAX_ID}, got {job} (dcid {value['dcid']})")


def check_result(result: dict) -> None:
    """Raise :class:`RecordError` for a result no ISPyB row can hold."""
    _check_ids(result)
    if not 1 <= result["image_number"] <= MAX_IMAGE_NUMBER:
        raise RecordError(f"image numbers start at 1 and end at {MAX_IMAGE_NUMBER}, got {result['image_number']} "
                          f"(dcid {result['dcid']})")


def check_summary(summary: dict) -> None:
    """Raise :class:`RecordError` for a summary no AutoProcProgram can hold."""
    _check_ids(summary)


def quality_indicators(result: dict) -> dict:
    """The ImageQualityIndicators values of an ImageResult (without autoProcProgramId)."""
    check_result(result)
    return {
        "dataCollectionId": int(result["dcid"]),
        "imageNumber": int(result["image_number"]),
        "spotTotal": result["n_spots_total"],
        "goodBraggCandidates": result["n_spots_no_ice"],
        "inResTotal": result["n_spots_4A"],
        "method1Res": _resolution(result.get("d_min_distl_method_1")),
        "method2Res": _resolution(result.get("d_min_distl_method_2")),
        "totalIntegratedSignal": _finite(result["total_intensity"]),
        "recordTimeStamp": utc_naive(result.get("result_time")),
    }


def merge_rows(rows: list[dict], key: tuple[str, ...]) -> list[dict]:
    """Fold rows with the same key, later values winning except where they are None.

    What the database's COALESCE upsert would do applied one row after another,
    done up front so one statement never touches a row twice.
    """
    merged: dict[tuple, dict] = {}
    for row in rows:
        k = tuple(row[c] for c in key)
        if k in merged:
            current = merged[k]
            for column, value in row.items():
                if value is not None:
                    current[column] = value
        else:
            merged[k] = dict(row)
    return list(merged.values())


def program_values(dcid: int, processing_job_id: int | None, start_time: datetime | None) -> dict:
    """A new AutoProcProgram row for a run (processingJobId is filled by the writer for live runs)."""
    command = f"beamstream worker (live, dcid {dcid})" if processing_job_id is None else (
        f"beamstream go {dcid} (ProcessingJob {processing_job_id})")
    return {
        "processingPrograms": PROGRAM_NAME,
        "processingCommandLine": command,
        "processingEnvironment": f"beamstream {BEAMSTREAM_VERSION}",
        "processingStartTime": utc_naive(start_time),
        "processingStatus": None,  # ISPyB: NULL while running
        "processingJobId": processing_job_id,
        "jobUuid": run_uuid(dcid, processing_job_id),
        "recordTimeStamp": utc_naive(datetime.now(UTC)),
    }


def live_job_values(dcid: int) -> dict:
    """The ProcessingJob a collection's live processing is registered under (automatic = 1)."""
    return {
        "dataCollectionId": dcid,
        "displayName": LIVE_JOB_NAME,
        "comments": "registered by the Beamstream ISPyB sink",
        "recipe": RECIPE,
        "automatic": 1,
    }


def summary_values(summary: dict) -> dict:
    """How a CollectionSummary closes its run's AutoProcProgram: end time, status, message.

    ``complete`` (every image analysed) is success; ``incomplete`` (images never
    arrived before the timeout) is marked failed, with the missing images named.
    """
    expected, analysed = summary["images_expected"], summary["images_analysed"]
    complete = summary["status"] == "complete"
    message = f"{summary['status']}: {analysed}/{expected} images analysed"
    missing = summary.get("missing_images") or []
    if missing:
        shown = ", ".join(str(n) for n in missing[:20])
        message += f"; missing {len(missing)}: {shown}{', ...' if len(missing) > 20 else ''}"
    if summary.get("best_image") is not None:
        message += f"; best image {summary['best_image']} ({summary.get('best_image_spots', 0)} spots)"
    if len(message) > MESSAGE_LENGTH:
        message = message[: MESSAGE_LENGTH - 3] + "..."
    return {
        "processingEndTime": utc_naive(summary["event_time"]),
        "processingStatus": STATUS_SUCCESS if complete else STATUS_FAILED,
        "processingMessage": message,
    }
