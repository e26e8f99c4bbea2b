"""The search space: the YAML ``tune.search_space`` checked (every problem named by its key), turned into
Ray Tune's domains, and a trial's sampled values applied to a config."""
from __future__ import annotations

from typing import Any

from trainrig import config as config_mod
from trainrig.config import Config
from trainrig.errors import ConfigError

DISTRIBUTIONS = ("choice", "uniform", "loguniform", "randint", "pow2", "grid")

def _set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
    node[parts[-1]] = value


def apply_params(cfg: Config, params: dict[str, Any]) -> Config:
    """The fit config with the trial's dotted-key values set (converted and validated by config.load)."""
    raw = config_mod.to_dict(cfg)
    for key, value in params.items():
        _set_dotted(raw, key, value)
    return config_mod.load(raw=raw)


def _bounds(dist: str, args: Any, key: str) -> list[float]:
    """A range distribution's [lo, hi] as checked floats (YAML 1.1 reads 1e-4 as a string)."""
    try:
        if not isinstance(args, list) or len(args) != 2 or any(isinstance(a, bool) for a in args):
            raise ValueError
        lo, hi = (float(a) for a in args)
    except (TypeError, ValueError):
        raise ConfigError(f"tune.search_space.{key}: {dist} needs [lo, hi] numbers, got {args!r}") from None
    if lo >= hi:
        raise ConfigError(f"tune.search_space.{key}: {dist} needs lo < hi, got [{lo}, {hi}]")
    if dist == "loguniform" and lo <= 0:
        raise ConfigError(f"tune.search_space.{key}: loguniform needs lo > 0, got {lo}")
    if dist in ("randint", "pow2") and not (lo.is_integer() and hi.is_integer()):
        raise ConfigError(f"tune.search_space.{key}: {dist} needs integer bounds, got [{lo}, {hi}]")
    return [lo, hi]


def _candidates(dist: str, args: list, key: str) -> list[Any]:
    """Values that stand for the distribution when checking them against the fit config's type."""
    if dist in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"tune.search_space.{key}: {dist} needs a non-empty list, got {args!r}")
        return args
    lo, hi = args
    if dist == "pow2":
        return [2 ** int(lo), 2 ** int(hi)]
    return [int(lo), int(hi)] if dist == "randint" else [lo, hi]


def validate_space(cfg: Config) -> dict[str, tuple[str, Any]]:
    """Check every search-space entry; return key -> (distribution, arguments). Errors name the key."""
    space = cfg.tune.search_space
    if not space:
        raise ConfigError("tune.search_space: empty; give at least one key, e.g. optim.lr: {loguniform: [1e-4, 1e-2]}")
    parsed: dict[str, tuple[str, Any]] = {}
    for key, spec in space.items():
        key = str(key)
        if not (isinstance(spec, dict) and len(spec) == 1):
            raise ConfigError(f"tune.search_space.{key}: expected one distribution like {{choice: [...]}}, got {spec!r}")
        (dist, args), = spec.items()
        if dist not in DISTRIBUTIONS:
            raise ConfigError(f"tune.search_space.{key}: unknown distribution '{dist}' "
                              f"(choose from {', '.join(DISTRIBUTIONS)})")
        if key.split(".")[0] in ("tune", "callbacks"):
            raise ConfigError(f"tune.search_space.{key}: not a fit-config key")
        if dist == "grid" and cfg.tune.searcher in ("hyperopt", "optuna"):  # a model picks every value
            raise ConfigError(f"tune.search_space.{key}: grid cannot be used with searcher: {cfg.tune.searcher} "
                              f"(use choice, or searcher: grid / random)")
        if dist not in ("choice", "grid"):
            args = _bounds(dist, args, key)
        for value in _candidates(dist, args, key):
            try:
                apply_params(cfg, {key: value})
            except ConfigError as exc:
                raise ConfigError(f"tune.search_space.{key}: {exc}") from None
        parsed[key] = (dist, args)
    if cfg.tune.searcher == "grid" and any(d not in ("grid", "choice") for d, _ in parsed.values()):
        bad = [k for k, (d, _) in parsed.items() if d not in ("grid", "choice")]
        raise ConfigError(f"tune.search_space.{bad[0]}: searcher: grid needs grid or choice entries")
    return parsed


def ray_space(parsed: dict[str, tuple[str, Any]], searcher: str) -> dict[str, Any]:
    """Ray Tune domains for the parsed space (flat dotted keys)."""
    from ray import tune

    def domain(dist: str, args: Any) -> Any:
        if dist == "choice":
            return tune.grid_search(args) if searcher == "grid" else tune.choice(args)
        if dist == "grid":
            return tune.grid_search(args)
        if dist == "uniform":
            return tune.uniform(*args)
        if dist == "loguniform":
            return tune.loguniform(*args)
        if dist == "randint":
            return tune.randint(int(args[0]), int(args[1]) + 1)  # Ray's upper bound is exclusive
        return tune.choice([2 ** k for k in range(int(args[0]), int(args[1]) + 1)])  # pow2, HyperOpt-friendly
    return {key: domain(dist, args) for key, (dist, args) in parsed.items()}
