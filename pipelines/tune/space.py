"""Search spaces over STEP's inference-time knobs, loaded from YAML and validated.

A space says which arguments of ``StepSegmenter.set_inference`` the search varies and over
which values: exit thresholds (one per exit head, or one shared by all), merge thresholds
per superpatch level (or one shared) *or* a token budget, the top-k tokens of each class
kept active, and the exit policy. Everything is an inference-time setting, so one trained
checkpoint serves every trial.

Design choices:

* **One flat parameter per dimension** (``exit_threshold_1``, ``merge_threshold_4``,
  ``top_k`` ...). Ray Tune, Optuna, the Pareto CSV and MLflow params all see the same
  names; :meth:`SearchSpace.to_inference` is the only place that maps them back to
  ``set_inference`` keyword arguments.
* **A ``step`` on a continuous dimension discretises it** for every searcher (Optuna gets a
  stepped distribution, random search ``quniform``, grid search the full list). That makes
  "Optuna against an exhaustive grid over the same space" a fair comparison, and keeps
  trial values readable (0.86, not 0.8600000001).
* **Validation on load names the file and the field**: thresholds must lie in [0, 1],
  ``low < high``, a grid needs finite values, ``merge_thresholds`` and ``budget`` exclude
  each other (the policy runs in one mode), and a space must vary at least one knob.
  The number of exit thresholds is checked against the model when a trial is built
  (:meth:`SearchSpace.check_model`), since a space file does not know the checkpoint.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, field_validator, model_validator

from pipelines.common.settings import ConfigError, StrictModel, load_config

LEVELS = (2, 4, 8, 16)
EXIT_POLICIES = ("confidence", "random", "uniform")


class Uniform(StrictModel):
    """A float in [low, high]; ``step`` makes it discrete (and grid-searchable)."""

    type: Literal["uniform"] = "uniform"
    low: float
    high: float
    step: float | None = Field(default=None, gt=0)
    log: bool = False

    @model_validator(mode="after")
    def _check(self) -> Uniform:
        if not self.low < self.high:
            raise ValueError(f"low ({self.low}) must be < high ({self.high})")
        if self.log and self.low <= 0:
            raise ValueError("log=true needs low > 0")
        if self.step is not None:
            if self.log:
                raise ValueError("step and log=true cannot be combined")
            n = (self.high - self.low) / self.step
            if abs(n - round(n)) > 1e-6:
                raise ValueError(
                    f"(high - low) = {self.high - self.low:g} is not a multiple of step {self.step:g}"
                )
        return self

    def grid(self) -> list[float] | None:
        if self.step is None:
            return None
        n = round((self.high - self.low) / self.step)
        return [_round_to(self.low + i * self.step, self.step) for i in range(n + 1)]

    def bounds(self) -> tuple[float, float]:
        return self.low, self.high


class Choice(StrictModel):
    """One of a list of values (numbers or strings)."""

    type: Literal["choice"] = "choice"
    values: list[float | int | str] = Field(min_length=1)

    def grid(self) -> list[Any]:
        return list(self.values)

    def bounds(self) -> tuple[Any, Any] | None:
        nums = [v for v in self.values if isinstance(v, (int, float))]
        return (min(nums), max(nums)) if len(nums) == len(self.values) else None


class Fixed(StrictModel):
    """A constant: part of the inference settings, not searched."""

    type: Literal["fixed"] = "fixed"
    value: float | int | str

    def grid(self) -> list[Any]:
        return [self.value]

    def bounds(self) -> tuple[Any, Any] | None:
        return (self.value, self.value) if isinstance(self.value, (int, float)) else None


Dim = Annotated[Uniform | Choice | Fixed, Field(discriminator="type")]


class SearchSpace(StrictModel):
    """What ``step tune`` searches over. See ``tune_spaces/*.yaml`` for annotated examples."""

    name: str
    description: str = ""
    # One dim shared by every exit head, or a list with one dim per head (model order).
    exit_thresholds: Dim | list[Dim] | None = None
    # One dim shared by every level, or a mapping level -> dim (levels 2, 4, 8, 16).
    merge_thresholds: Dim | dict[Literal[2, 4, 8, 16], Dim] | None = None
    budget: Dim | None = None
    top_k: Dim | None = None
    exit_policy: Dim | None = None

    @field_validator("merge_thresholds", mode="before")
    @classmethod
    def _int_levels(cls, value: Any) -> Any:
        """Level keys as ints, also when they arrive as strings: JSON (``model_dump(mode=
        "json")``, Ray, MLflow's ``search_space.json``) and ``--set`` overrides turn the
        YAML's ``2:`` into ``"2"``. Anything that is not a level is left for the
        validation error."""
        if not isinstance(value, dict):
            return value
        out: dict[Any, Any] = {}
        for key, dim in value.items():
            if isinstance(key, str) and key.strip().isdigit():
                key = int(key.strip())
            out[key] = dim
        return out

    @model_validator(mode="after")
    def _check(self) -> SearchSpace:
        if self.merge_thresholds is not None and self.budget is not None:
            raise ValueError(
                "merge_thresholds and budget exclude each other (threshold vs budget policy mode)"
            )
        for name, dim in self._named_dims():
            _check_range(name, dim)
        if not any(not isinstance(d, Fixed) for _, d in self._named_dims()):
            raise ValueError("the space varies nothing: every dimension is missing or fixed")
        return self

    # ---- flat parameters -------------------------------------------------------------

    def _named_dims(self) -> list[tuple[str, Uniform | Choice | Fixed]]:
        out: list[tuple[str, Any]] = []
        if isinstance(self.exit_thresholds, list):
            out += [(f"exit_threshold_{i + 1}", d) for i, d in enumerate(self.exit_thresholds)]
        elif self.exit_thresholds is not None:
            out.append(("exit_threshold", self.exit_thresholds))
        if isinstance(self.merge_thresholds, dict):
            out += [(f"merge_threshold_{s}", d) for s, d in sorted(self.merge_thresholds.items())]
        elif self.merge_thresholds is not None:
            out.append(("merge_threshold", self.merge_thresholds))
        for name in ("budget", "top_k", "exit_policy"):
            dim = getattr(self, name)
            if dim is not None:
                out.append((name, dim))
        return out

    @property
    def dims(self) -> dict[str, Uniform | Choice | Fixed]:
        """Flat parameter name -> dimension, in a stable order."""
        return dict(self._named_dims())

    @property
    def searched(self) -> list[str]:
        """Names of the dimensions that vary (not fixed)."""
        return [n for n, d in self._named_dims() if not isinstance(d, Fixed)]

    def grid_size(self) -> int | None:
        """Number of points of the exhaustive grid, or None if a dimension is continuous."""
        size = 1
        for dim in self.dims.values():
            values = dim.grid()
            if values is None:
                return None
            size *= len(values)
        return size

    def check_model(self, num_exits: int) -> None:
        """Raise if the space's exit thresholds do not fit a model with ``num_exits`` heads."""
        if isinstance(self.exit_thresholds, list) and len(self.exit_thresholds) != num_exits:
            raise ConfigError(
                f"search space {self.name!r}: exit_thresholds lists {len(self.exit_thresholds)} "
                f"thresholds but the model has {num_exits} exit heads"
            )
        if self.exit_thresholds is not None and num_exits == 0:
            raise ConfigError(
                f"search space {self.name!r} varies exit_thresholds but the model has no exits"
            )

    # ---- Ray Tune ----------------------------------------------------------------

    def tune_param_space(self, search: str = "optuna") -> dict[str, Any]:
        """The ``param_space`` for ``ray.tune.Tuner``.

        ``grid`` enumerates every dimension with ``tune.grid_search`` (one sample covers
        the whole product); ``optuna`` / ``random`` sample from distributions.
        """
        from ray import tune

        space: dict[str, Any] = {}
        for name, dim in self.dims.items():
            if search == "grid":
                values = dim.grid()
                if values is None:
                    raise ConfigError(
                        f"search space {self.name!r}: grid search needs a finite dimension, "
                        f"but {name} is continuous (give it a `step`)"
                    )
                space[name] = tune.grid_search(values) if len(values) > 1 else values[0]
            elif isinstance(dim, Fixed):
                space[name] = dim.value
            elif isinstance(dim, Choice):
                space[name] = tune.choice(dim.values)
            elif dim.step is not None:
                space[name] = tune.quniform(dim.low, dim.high, dim.step)
            elif dim.log:
                space[name] = tune.loguniform(dim.low, dim.high)
            else:
                space[name] = tune.uniform(dim.low, dim.high)
        return space

    # ---- back to the model ---------------------------------------------------------

    def normalise(self, params: dict[str, Any]) -> dict[str, Any]:
        """Round stepped values onto their grid; cast budget/top_k to int where integral."""
        out: dict[str, Any] = {}
        for name, dim in self.dims.items():
            if name not in params:
                raise ConfigError(f"search space {self.name!r}: trial parameters lack {name!r}")
            value = params[name]
            if isinstance(dim, Uniform) and dim.step is not None:
                value = _round_to(float(value), dim.step)
            if name == "top_k":
                value = int(value)
            out[name] = value
        return out

    def to_inference(self, params: dict[str, Any], num_exits: int | None = None) -> dict[str, Any]:
        """``set_inference`` keyword arguments for one trial's flat ``params``."""
        if num_exits is not None:
            self.check_model(num_exits)
        p = self.normalise(params)
        kwargs: dict[str, Any] = {}
        if isinstance(self.exit_thresholds, list):
            kwargs["exit_thresholds"] = [
                float(p[f"exit_threshold_{i + 1}"]) for i in range(len(self.exit_thresholds))
            ]
        elif self.exit_thresholds is not None:
            if num_exits is None:
                raise ConfigError("a shared exit threshold needs the model's number of exits")
            kwargs["exit_thresholds"] = [float(p["exit_threshold"])] * num_exits
        if isinstance(self.merge_thresholds, dict):
            kwargs["merge_thresholds"] = {
                s: float(p[f"merge_threshold_{s}"]) for s in sorted(self.merge_thresholds)
            }
        elif self.merge_thresholds is not None:
            kwargs["merge_thresholds"] = {s: float(p["merge_threshold"]) for s in LEVELS}
        for name in ("budget", "top_k", "exit_policy"):
            if name in p:
                kwargs[name] = p[name]
        return kwargs


def _round_to(value: float, step: float) -> float:
    decimals = max(0, -math.floor(math.log10(step)) + 2)
    return round(round(value / step) * step, decimals)


def _check_range(name: str, dim: Uniform | Choice | Fixed) -> None:
    values = dim.grid() or []
    lo_hi = dim.bounds()
    if name.startswith(("exit_threshold", "merge_threshold")):
        if lo_hi is None or not (lo_hi[0] >= 0.0 and lo_hi[1] <= 1.0):
            raise ValueError(f"{name}: thresholds must be numbers in [0, 1], got {_show(dim)}")
    elif name == "top_k":
        if any(not isinstance(v, (int, float)) or v < 0 or float(v) != int(v) for v in values) \
                or isinstance(dim, Uniform) and dim.step is None:
            raise ValueError(f"top_k: must be integers >= 0 (choice, fixed, or a stepped "
                             f"uniform with integer step), got {_show(dim)}")
    elif name == "budget":
        if lo_hi is None or lo_hi[0] <= 0 or lo_hi[1] > 1:
            raise ValueError(f"budget: the fraction of tokens kept, in (0, 1], got {_show(dim)}")
    elif name == "exit_policy":
        bad = [v for v in values if v not in EXIT_POLICIES]
        if bad or isinstance(dim, Uniform):
            raise ValueError(f"exit_policy: values must be among {list(EXIT_POLICIES)}, got {_show(dim)}")


def _show(dim: Uniform | Choice | Fixed) -> str:
    return str(dim.model_dump(exclude_none=True))


def resolve_space_path(name_or_path: str | Path) -> Path:
    """A file path, or the name of a space shipped in ``tune_spaces/`` (``joint``)."""
    import tune_spaces

    path = Path(name_or_path)
    if path.is_file():
        return path
    shipped = tune_spaces.space_path(str(name_or_path))
    if shipped is not None:
        return shipped
    raise ConfigError(
        f"search space {str(name_or_path)!r} is neither a file nor a shipped space "
        f"(shipped: {', '.join(tune_spaces.names())})"
    )


def load_space(name_or_path: str | Path, overrides: list[str] | None = None) -> SearchSpace:
    """Load and validate a search space; errors name the file and the field."""
    return load_config(SearchSpace, resolve_space_path(name_or_path), overrides)
