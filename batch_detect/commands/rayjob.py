"""Local paths given to a `ray job submit` driver. Its working directory is Ray's temporary copy of the
job's --working-dir (…/runtime_resources/working_dir_files/_ray_pkg_…), so a relative path names a place
in that copy: right for a model or a job file shipped with the project, wrong for the data (an --output
there is deleted with the copy, an --input's URIs would point into it)."""

from __future__ import annotations

import os

from ..errors import ConfigError

# Set by Ray's job supervisor for the entrypoint process alone (RAY_JOB_ID, the other mark of a job, is
# removed from the entrypoint's environment): ray/dashboard/modules/job/job_supervisor.py.
JOB_ENV = "RAY_JOB_CONFIG_JSON_ENV_VAR"
# Where a node keeps the runtime environments' files, the copies of working dirs among them.
_RUNTIME_RESOURCES = f"{os.sep}runtime_resources{os.sep}"
# Read once, on the driver and by the workers (who run in the same working dir copy): found there, fine.
_SHIPPED = ("--config", "--model", "--labels")


def job_paths(paths: dict[str, str | None]) -> str | None:
    """Inside a Ray job's driver: refuse (ConfigError) a relative --input or --output, or one inside a
    working dir copy, and a relative read path the copy does not hold. Returns a line saying where the
    relative read paths were found, or None (none, or not inside a Ray job)."""
    if JOB_ENV not in os.environ:
        return None
    cwd = os.getcwd()
    copy = _RUNTIME_RESOURCES in cwd + os.sep
    where = "Ray's temporary copy of the job's --working-dir" if copy else "the folder Ray runs the job in"
    found = []
    for flag, value in paths.items():
        local = _local_path(value)
        if local is None:
            continue
        full = os.path.abspath(local)
        relative = not os.path.isabs(local)
        if flag not in _SHIPPED and (relative or _RUNTIME_RESOURCES in full):
            # (absolute in a copy: a job file's path made absolute against the job file's folder)
            place = where if relative else "a temporary copy Ray keeps of a job's files"
            gone = ", which Ray deletes after the job" if copy or not relative else ""
            raise ConfigError(f"{flag} {value!r} would be {full}, in {place}{gone}: inside a Ray job give {flag} an "
                              "absolute path that every node sees, or a URL (s3://…)")
        if relative and not os.path.exists(full):
            raise ConfigError(f"{flag} {value!r} is relative, and inside a Ray job it is looked for in {where} "
                              f"({cwd}), which does not hold it: give an absolute path or a URL, or ship the file in "
                              "the --working-dir")
        if relative:
            found.append(f"{flag} {value}")
    return f"inside a Ray job, relative paths are read from {where} ({cwd}): {', '.join(found)}" if found else None


def _local_path(value: str | None) -> str | None:
    """The path a local value names (`~` expanded), or None for an empty one or a URL."""
    if not value:
        return None
    if value.startswith("file://"):
        value = value[len("file://"):]
    elif "://" in value:
        return None
    return os.path.expanduser(value)
