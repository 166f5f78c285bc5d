"""KFP's cron dialect for ``adaptflow schedule create --cron``: checked here, before any request."""

from __future__ import annotations

import re

from adaptflow.errors import ConfigError

CRON_FORMAT = "SECONDS MINUTES HOURS DAY-OF-MONTH MONTH DAY-OF-WEEK"
CRON_EXAMPLE = "0 0 3 * * 1"


# --------------------------------------------------------------------------- cron

# KFP's API server checks a schedule with robfig/cron v1's ``cron.Parse``: 6 fields, seconds first, or a
# descriptor. croniter (maintained under pallets-eco, used by Airflow) does the field checking here:
# values, ranges, lists, steps and month/day names, seconds first through ``second_at_beginning``.
# It also knows Quartz/Jenkins syntax robfig does not (L, W, #, H, a 7th year field), which is refused
# below. Two small differences remain and are left to the server, which refuses them with robfig's own
# message: croniter reads day-of-week 7 as Sunday and wraps backwards ranges (SAT-SUN, 10-2).
_CRON_FIELDS = (  # name, the values it takes
    ("seconds", "0-59"),
    ("minutes", "0-59"),
    ("hours", "0-23"),
    ("day-of-month", "1-31 or ?"),
    ("month", "1-12 or JAN-DEC"),
    ("day-of-week", "0-6 or SUN-SAT, or ?"),
)
_DESCRIPTORS = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}
_GO_DURATION = re.compile(r"^(\d+(\.\d+)?(ns|us|µs|ms|s|m|h))+$")
_NOT_ROBFIG = re.compile(r"#|(?<![a-z])[lwh]+(?![a-z])", re.IGNORECASE)  # 1#2, L, 15W, 5L, H


def _cron_error(cron: str, problem: str) -> ConfigError:
    return ConfigError(
        f"invalid cron expression {cron!r}: {problem}",
        hint=f"Kubeflow Pipelines wants 6 fields, seconds first: '{CRON_FORMAT}', "
        f"e.g. '{CRON_EXAMPLE}' (every Monday at 03:00:00)",
    )


def _croniter_problem(expression: str) -> str | None:
    """croniter's objection to a seconds-first expression, or None when it accepts it."""
    from croniter import croniter

    try:
        croniter.expand(expression, second_at_beginning=True)
    except ValueError as exc:  # CroniterError and its subclasses are ValueErrors
        return str(exc)
    return None


def validate_cron(cron: str) -> str:
    """Check a KFP cron expression (robfig/cron with seconds) and return it with single spaces.

    A 5-field crontab line is refused: KFP would read its first field as the seconds, so
    ``0 3 * * 1`` would run at second 0 of minute 3 of every hour, every day in January,
    instead of Mondays at 03:00.
    """
    text = " ".join(cron.split())
    if not text:
        raise _cron_error(cron, "it is empty")
    if text.startswith("@"):
        if text in _DESCRIPTORS:
            return text
        if text.startswith("@every "):  # robfig's own; croniter has no equivalent
            if _GO_DURATION.match(text.removeprefix("@every ").strip()):
                return text
            raise _cron_error(cron, "@every needs a duration such as '@every 6h' or '@every 90m'")
        raise _cron_error(cron, f"unknown descriptor; known ones are {', '.join(sorted(_DESCRIPTORS))}")
    fields = text.split(" ")
    if len(fields) == 5:
        raise ConfigError(
            f"invalid cron expression {cron!r}: it has 5 fields, but Kubeflow Pipelines needs 6, seconds first "
            f"('{CRON_FORMAT}'); read as KFP reads it, the first field would be the seconds",
            hint=f"for the crontab line {text!r} write '0 {text}'; e.g. '{CRON_EXAMPLE}' runs every Monday at 03:00:00",
        )
    if len(fields) != 6:
        raise _cron_error(cron, f"it has {len(fields)} fields, expected 6")
    for index, (expr, (name, values)) in enumerate(zip(fields, _CRON_FIELDS, strict=True)):
        if _NOT_ROBFIG.search(expr):
            raise _cron_error(
                cron,
                f"the {name} field {expr!r} uses L, W, # or H, which Kubeflow Pipelines' scheduler lacks",
            )
        # Check each field alone (the others '*') so that the error names the field.
        if _croniter_problem(" ".join(expr if i == index else "*" for i in range(6))) is not None:
            raise _cron_error(
                cron, f"the {name} field {expr!r} is not valid (values {values}; also *, a,b, a-b and */n)"
            )
    problem = _croniter_problem(text)
    if problem is not None:
        raise _cron_error(cron, problem)
    return text
