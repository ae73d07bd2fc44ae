"""How every process reads its environment variables (pydantic-settings), validated once at
start-up.

Every process has one settings class derived from `EnvSettings`: each field
names its variable (`validation_alias`), its default and what it means
(`description`, from which the --help epilogs are written). An empty
variable counts as unset. `Cls.load()` reads os.environ and, on a bad value,
prints "configuration error: ..." naming the variable and exits with code 2;
`Cls.parse(env)` does the same validation on a given mapping and raises
ConfigError.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any, Self, TypeVar

from pydantic import Field, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

T = TypeVar("T")


class ConfigError(ValueError):
    """A setting has a value the process cannot start with."""


# The environment `EnvSettings.parse` reads instead of os.environ (None: os.environ).
_GIVEN_ENVIRONMENT: ContextVar[Mapping[str, str] | None] = ContextVar("given_environment", default=None)


class _Variables(EnvSettingsSource):
    """os.environ (or the mapping given to `parse`), read the way our variables are written:
    each one under its documented name only (not also under the Python field name) and as
    the plain string it is; the field's own validator parses its format (no JSON decoding of
    lists or maps)."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        given = _GIVEN_ENVIRONMENT.get()
        return super()._load_env_vars() if given is None else {name: value for name, value in given.items() if value}

    def prepare_field_value(self, field_name: str, field: FieldInfo, value: Any, value_is_complex: bool) -> Any:
        return value

    def __call__(self) -> dict[str, Any]:
        names = set(_variable_names(self.settings_cls))
        return {name: value for name, value in super().__call__().items() if name in names}


class EnvSettings(BaseSettings):
    """Base of every process's settings; fields are also settable by name in code (tests)."""

    model_config = SettingsConfigDict(
        frozen=True, case_sensitive=True, env_ignore_empty=True, extra="ignore", populate_by_name=True
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _Variables(settings_cls))

    @classmethod
    def parse(cls, env: Mapping[str, str]) -> Self:
        """The settings in `env` alone (os.environ is not read); ConfigError names the variable."""
        token = _GIVEN_ENVIRONMENT.set(env)
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc)) from None
        finally:
            _GIVEN_ENVIRONMENT.reset(token)

    @classmethod
    def from_environment(cls) -> Self:
        """The settings in os.environ; ConfigError names the variable."""
        try:
            return cls()
        except ValidationError as exc:
            raise ConfigError(_describe(cls, exc)) from None

    @classmethod
    def load(cls) -> Self:
        """The settings in os.environ, or exit 2 with a message naming the variable."""
        return exit_on_error(cls.from_environment)

    @classmethod
    def variables(cls) -> list[tuple[str, str, str]]:
        """(variable, default as written in the environment, meaning) for every field."""
        out = []
        for field in cls.model_fields.values():
            default = field.get_default(call_default_factory=True)
            if isinstance(default, tuple):
                shown = ",".join(map(str, default)) or "none"
            else:
                shown = "none" if default is None else shown_value(default)
            out.append((str(field.validation_alias), shown, field.description or ""))
        return out


def _variable_names(cls: type[BaseSettings]) -> list[str]:
    return [str(field.validation_alias) for field in cls.model_fields.values()]


def shown_value(value: object) -> str:
    """A value as messages and --help show it (a float without trailing zeros)."""
    return f"{value:g}" if isinstance(value, float) else str(value)


# pydantic's error types -> what the value must be, in our own words.
_MUST_BE: dict[str, Callable[[dict[str, Any]], str]] = {
    "int_parsing": lambda _: "an integer",
    "int_type": lambda _: "an integer",
    "int_from_float": lambda _: "an integer",
    "float_parsing": lambda _: "a number",
    "float_type": lambda _: "a number",
    "finite_number": lambda _: "a finite number",
    "greater_than_equal": lambda ctx: f">= {shown_value(ctx['ge'])}",
    "greater_than": lambda ctx: f"> {shown_value(ctx['gt'])}",
    "less_than_equal": lambda ctx: f"<= {shown_value(ctx['le'])}",
    "less_than": lambda ctx: f"< {shown_value(ctx['lt'])}",
}


def _describe(cls: type[BaseSettings], exc: ValidationError) -> str:
    """Every problem, each naming its variable, "; "-separated. Our own validators write their
    message in full (and decide whether the value may be shown: keys are never echoed)."""
    aliases = {name: str(field.validation_alias) for name, field in cls.model_fields.items()}
    problems = []
    for error in exc.errors():
        ctx = error.get("ctx") or {}
        if isinstance(ctx.get("error"), Exception):
            problems.append(str(ctx["error"]))
            continue
        loc = error["loc"]
        name = aliases.get(str(loc[0]), str(loc[0])) if loc else cls.__name__
        must = _MUST_BE.get(error["type"])
        what = f"must be {must(ctx)}" if must else error["msg"].lower()
        problems.append(f"{name} {what}, got {error['input']!r}")
    return "; ".join(problems)


def exit_on_error(parse: Callable[[], T]) -> T:
    """parse(), or exit 2 with "configuration error: ..." on stderr (no traceback)."""
    try:
        return parse()
    except ConfigError as exc:
        print(f"configuration error: {exc}", file=sys.stderr)
        raise SystemExit(2) from None


def epilog(*models: type[EnvSettings], unused: tuple[str, ...] = ()) -> str:
    """The --help text for the variables of `models` (but not those `unused` by the process)."""
    rows = [
        f"{name} ({default}): {what}"
        for model in models
        for name, default, what in model.variables()
        if name not in unused
    ]
    return "Environment: " + "; ".join(rows) + "."


def one_of(name: str, value: str, choices: tuple[str, ...]) -> str:
    """A case-insensitive choice, returned in lower case."""
    level = value.lower()
    if level not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, got {level!r}")
    return level


def nice_field(alias: str, description: str) -> Any:
    """A process's CPU priority for process.give_way: 0-19, 10 unless set, 0 = as started."""
    return Field(default=10, ge=0, le=19, validation_alias=alias, description=description)
