"""Plugin configurations as dicts: overlay one on another, or say what one changes."""
import copy


def merge(base, overrides):
    """Deep-merge dicts (overrides win); other values are replaced."""
    out = copy.deepcopy(base)
    for key, value in overrides.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def deep_diff(base, variant):
    """What variant sets differently from base, as an overlay for merge()."""
    out = {}
    for key, value in variant.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            nested = deep_diff(base[key], value)
            if nested:
                out[key] = nested
        elif base.get(key, object()) != value:
            out[key] = copy.deepcopy(value)
    return out
