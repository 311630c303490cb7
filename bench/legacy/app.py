"""The legacy status stack, rebuilt for benchmarks only (not part of mixd).

A FastAPI router over an in-memory MixJobManager, as shared/docs/legacy-job-status-report.md
describes them: GET /mix/{project_id}/mix/job/{job_id}/status returns the {ok, data, error,
message} envelope. One finished job is seeded from LEGACY_JOB_ID so the benchmark polls a real
record, as it polls a finished job on mixd.
"""
import os
from dataclasses import dataclass, field
from datetime import datetime
from typing import Optional

from fastapi import APIRouter, FastAPI


@dataclass
class MixJobState:
    job_id: str
    session_id: str
    state: str = "queued"
    progress: int = 0
    message: str = ""
    error: Optional[str] = None
    created_at: datetime = field(default_factory=datetime.utcnow)
    updated_at: datetime = field(default_factory=datetime.utcnow)


class MixJobManager:
    _jobs: dict = {}

    @staticmethod
    def _get_job(job_id):
        return MixJobManager._jobs.get(job_id)

    @staticmethod
    async def get_job_status(job_id):
        job = MixJobManager._get_job(job_id)
        if not job:
            return {"is_error": True, "error": "Job not found"}
        return {
            "is_error": False,
            "data": {
                "job_id": job.job_id,
                "state": job.state,
                "progress": job.progress,
                "message": job.message,
                "error": job.error,
                "created_at": job.created_at.isoformat(),
                "updated_at": job.updated_at.isoformat(),
            },
        }


def success_response(data, message):
    return {"ok": True, "data": data, "error": None, "message": message}


def error_response(error, message):
    return {"ok": False, "data": {}, "error": error, "message": message}


router = APIRouter()


@router.get("/{project_id}/mix/job/{job_id}/status")
async def get_job_status(project_id: str, job_id: str):
    try:
        job_status = await MixJobManager.get_job_status(job_id)
        if job_status.get("is_error"):
            return error_response("JOB_NOT_FOUND", job_status.get("error") or "Job not found")
        return success_response(job_status["data"], "Job status retrieved successfully")
    except Exception as e:  # the legacy router's catch-all
        return error_response("JOB_STATUS_ERROR", f"Failed to get job status: {str(e)}")


app = FastAPI()
app.include_router(router, prefix="/mix")

seed = os.environ.get("LEGACY_JOB_ID", "00000000-0000-4000-8000-000000000000")
MixJobManager._jobs[seed] = MixJobState(job_id=seed, session_id="p1", state="complete", progress=100, message="Mix complete")
