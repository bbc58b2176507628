"""Search spaces over STEP's inference settings, loaded from YAML and validated.

A space says which fields of ``step_model.config.InferenceConfig`` the search varies and
over which values: exit thresholds (one per exit head, or one shared by all), merge
thresholds per superpatch level (or one shared) *or* a token budget, and any other field
by its own name (``top_k``, ``exit_policy``, ...: the space's fields are generated from
the config, so a new inference setting is searchable as it is). Everything is an
inference-time setting, so one trained checkpoint serves every trial.

Design choices:

* **One flat parameter per dimension** (``exit_threshold_1``, ``merge_threshold_4``,
  ``top_k`` ...). Ray Tune, Optuna, the Pareto CSV and MLflow params all see the same
  names; :meth:`SearchSpace.to_inference` is the only place that maps them back to
  ``set_inference`` keyword arguments.
* **A ``step`` on a continuous dimension discretises it** for every searcher (Optuna gets a
  stepped distribution, random search ``quniform``, grid search the full list). That makes
  "Optuna against an exhaustive grid over the same space" a fair comparison, and keeps
  trial values readable (0.86, not 0.8600000001).
* **Validation on load names the file and the field**: every value a dimension can take
  (its grid, or the ends of a continuous range) must be a valid value of its
  InferenceConfig field (thresholds in [0, 1], a budget in (0, 1], an integer top_k, a
  known exit policy or exit score: the config's own rules), a continuous range needs a
  field that takes fractions, ``low < high``, a grid needs finite values,
  ``merge_thresholds`` and ``budget`` exclude each other (the policy runs in one mode),
  and a space must vary at least one setting.
  The number of exit thresholds is checked against the model when a trial is built
  (:meth:`SearchSpace.check_model`), since a space file does not know the checkpoint.
"""

from __future__ import annotations

import math
import typing
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError, create_model, field_validator, model_validator

from pipelines.common.settings import ConfigError, StrictModel, load_config
from step_model.config import LEVELS, InferenceConfig, InferenceOverrides

# Settings searched per exit head / per level (one dimension each, or one shared); every
# other InferenceConfig field is one dimension under its own name.
STRUCTURED = ("exit_thresholds", "merge_thresholds")
SCALARS = tuple(n for n in InferenceConfig.model_fields if n not in STRUCTURED)


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
    values: list[bool | int | float | str] = Field(min_length=1)

    def grid(self) -> list[Any]:
        return list(self.values)

    def bounds(self) -> tuple[Any, Any] | None:
        nums = [v for v in self.values if isinstance(v, int | float) and not isinstance(v, bool)]
        return (min(nums), max(nums)) if len(nums) == len(self.values) else None


class Fixed(StrictModel):
    """A constant: part of the inference settings, not searched."""

    type: Literal["fixed"] = "fixed"
    value: bool | int | float | str

    def grid(self) -> list[Any]:
        return [self.value]

    def bounds(self) -> tuple[Any, Any] | None:
        return (self.value, self.value) if isinstance(self.value, (int, float)) else None


Dim = Annotated[Uniform | Choice | Fixed, Field(discriminator="type")]


class _SpaceBase(StrictModel):
    """What ``step tune`` searches over. See ``tune_spaces/*.yaml`` for annotated examples.
    Besides the two threshold sets below, one optional dimension per other InferenceConfig
    field (``budget``, ``top_k``, ``exit_policy``, ...), generated in :data:`SearchSpace`."""

    name: str
    description: str = ""
    # One dim shared by every exit head, or a list with one dim per head (model order).
    exit_thresholds: Dim | list[Dim] | None = None
    # One dim shared by every level, or a mapping level -> dim (levels 2, 4, 8, 16).
    merge_thresholds: Dim | dict[Literal[LEVELS], Dim] | None = None

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
    def _check(self) -> _SpaceBase:
        if self.merge_thresholds is not None and getattr(self, "budget", None) is not None:
            raise ValueError(
                "merge_thresholds and budget exclude each other (threshold vs budget policy mode)"
            )
        for name, dim in self._named_dims():
            _check_values(name, dim)
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
        for name in SCALARS:
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
        """Round stepped values onto their grid; give every other setting its field's
        type (``top_k`` 5.0 -> 5)."""
        out: dict[str, Any] = {}
        for name, dim in self.dims.items():
            if name not in params:
                raise ConfigError(f"search space {self.name!r}: trial parameters lack {name!r}")
            value = params[name]
            if isinstance(dim, Uniform) and dim.step is not None:
                value = _round_to(float(value), dim.step)
            if name in SCALARS:
                value = InferenceOverrides.model_validate({name: value}).given()[name]
            out[name] = value
        return out

    def to_inference(self, params: dict[str, Any], num_exits: int | None = None
                     ) -> InferenceOverrides:
        """The inference settings of one trial's flat ``params`` (changes to the
        settings the search starts from); ``num_exits`` checks the exit thresholds."""
        if num_exits is not None:
            self.check_model(num_exits)
        p = self.normalise(params)
        out: dict[str, Any] = {}
        if isinstance(self.exit_thresholds, list):
            out["exit_thresholds"] = [
                float(p[f"exit_threshold_{i + 1}"]) for i in range(len(self.exit_thresholds))
            ]
        elif self.exit_thresholds is not None:
            out["exit_thresholds"] = [float(p["exit_threshold"])]  # every exit
        if isinstance(self.merge_thresholds, dict):
            out["merge_thresholds"] = {
                s: float(p[f"merge_threshold_{s}"]) for s in sorted(self.merge_thresholds)
            }
        elif self.merge_thresholds is not None:
            out["merge_thresholds"] = float(p["merge_threshold"])  # every level
        out.update({name: p[name] for name in SCALARS if name in p})
        return InferenceOverrides.model_validate(out)


SearchSpace = create_model(
    "SearchSpace", __base__=_SpaceBase, __doc__=_SpaceBase.__doc__,
    **{name: (Dim | None, None) for name in SCALARS})


def _round_to(value: float, step: float) -> float:
    decimals = max(0, -math.floor(math.log10(step)) + 2)
    return round(round(value / step) * step, decimals)


def _field_of(name: str) -> str:
    """The InferenceConfig field a flat dimension sets (``exit_threshold_2`` -> exits)."""
    if name.startswith("exit_threshold"):
        return "exit_thresholds"
    if name.startswith("merge_threshold"):
        return "merge_thresholds"
    return name


def _takes_fractions(field: str) -> bool:
    """Whether the field's values include floats (a continuous range can sample it)."""
    def walk(tp: Any) -> bool:
        return tp is float or any(walk(a) for a in typing.get_args(tp))

    return walk(InferenceConfig.model_fields[field].annotation)


def _check_values(name: str, dim: Uniform | Choice | Fixed) -> None:
    """Every value ``dim`` can take must be valid for its InferenceConfig field: the
    grid's values, or the ends of a continuous range (whose field must take fractions)."""
    field = _field_of(name)
    values = dim.grid()
    if values is None:
        if not _takes_fractions(field):
            raise ValueError(f"{name}: takes no fractions; give the range an integer `step`, "
                             f"or use a choice, got {_show(dim)}")
        values = list(dim.bounds())
    for value in values:
        try:  # one value stands for every exit / level: the threshold syntax takes it
            InferenceOverrides.model_validate({field: value})
        except ValidationError as err:
            why = "; ".join(e["msg"].removeprefix("Value error, ") for e in err.errors())
            raise ValueError(f"{name}: {value!r} is not a valid {field} ({why}), "
                             f"got {_show(dim)}") from None


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
