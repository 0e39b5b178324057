"""Step specs, below the caches that take them: loop indices, evenly spaced ones, and calibrated ones, 'auto:K'
(chosen on the model at sampling time, `ldm.calibration`) or '@FILE.json' (a calibration file of
`scripts/calibrate.py`, whose format `read_steps` reads)."""
import json
import re

AUTO = re.compile(r"auto:(\d+)")


class CalibrationError(ValueError):
    """A calibration file or request that does not fit the run; the message is one line."""


def is_calibrated(spec):
    """Whether a key-step or full-step spec names calibrated steps: '@FILE.json' or 'auto:K'."""
    return isinstance(spec, str) and (spec.startswith("@") or AUTO.fullmatch(spec) is not None)


def check_loop_indices(steps, name, why_zero):
    """steps (a tuple of ints) start with 0 and strictly increase; else a ValueError naming them."""
    if not steps or steps[0] != 0:
        raise ValueError(f"{name} must start with 0 ({why_zero}), got {list(steps)}")
    if any(b <= a for a, b in zip(steps, steps[1:])):
        raise ValueError(f"{name} must be strictly increasing without repeats, got {list(steps)}")
    return steps


def check_count(k, steps):
    """K key steps fit S steps: 1 <= K <= S."""
    if not 1 <= k <= steps:
        raise CalibrationError(f"cannot choose {k} of {steps} steps: K must be in 1..{steps}")


def auto_count(spec, steps):
    """K of 'auto:K', checked against S."""
    match = AUTO.fullmatch(spec)
    if not match:
        raise CalibrationError(f"not an auto:K spec: {spec!r}")
    check_count(int(match.group(1)), steps)
    return int(match.group(1))


def evenly_spaced(steps, k):
    """K loop indices as evenly spaced as S allows: floor(i * S / K)."""
    check_count(k, steps)
    return [i * steps // k for i in range(k)]


def read_steps(path, steps, feature, checkpoint_sha256=None):
    """The steps of a calibration file, checked against the run: its S, the feature its cache reuses and,
    when checkpoint_sha256 is given, the model."""
    try:
        with open(path) as f:
            record = json.load(f)
        made_for, chosen, kind = record["S"], record["steps"], record["feature"]
        model = record["model"]
    except OSError as e:
        raise CalibrationError(f"cannot read calibration file {path}: {e.strerror or e}") from None
    except KeyError as e:
        raise CalibrationError(f"{path} is not a calibration file of scripts/calibrate.py (no {e.args[0]!r})") from None
    except (ValueError, TypeError) as e:
        raise CalibrationError(f"{path} is not a calibration file of scripts/calibrate.py ({e})") from None
    if isinstance(made_for, bool) or not isinstance(made_for, int) or not isinstance(model, dict):
        raise CalibrationError(f"{path} is not a calibration file of scripts/calibrate.py (S must be a number of "
                               f"steps and model a record, not {made_for!r} and {type(model).__name__})")
    if made_for != steps:
        raise CalibrationError(f"calibration file {path} was made for S = {made_for} steps, not {steps}")
    if kind != feature:
        raise CalibrationError(f"calibration file {path} holds steps for the {kind} feature, not the {feature} "
                               f"feature this cache reuses")
    if checkpoint_sha256 is not None and model.get("checkpoint_sha256") != checkpoint_sha256:
        raise CalibrationError(f"calibration file {path} was made for another model ({model.get('checkpoint')}, "
                               f"sha256 {str(model.get('checkpoint_sha256'))[:12]}...)")
    try:
        chosen = [int(i) for i in chosen]
    except (TypeError, ValueError):
        raise CalibrationError(f"{path}: steps must be a list of loop indices, not {chosen!r}") from None
    if not chosen or chosen[0] != 0 or any(b <= a for a, b in zip(chosen, chosen[1:])) or chosen[-1] >= steps:
        raise CalibrationError(f"{path}: steps must rise from 0 to at most {steps - 1}, not {chosen}")
    return chosen
