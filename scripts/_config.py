"""Compose the project's Hydra config from script arguments (key=value overrides)."""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from moemesh.config.schema import RunConfig, register_schema, to_run_config  # noqa: E402
from moemesh.errors import ConfigError  # noqa: E402


def compose_run(overrides: list[str]) -> RunConfig:
    from hydra import compose, initialize_config_dir

    register_schema()
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        try:
            cfg = compose(config_name="config", overrides=overrides)
        except Exception as err:  # Hydra's override/schema errors: one line, exit 2
            print(f"moemesh: config error: {str(err).splitlines()[0]}", file=sys.stderr)
            raise SystemExit(2) from None
    return to_run_config(cfg)


def fail(err: ConfigError) -> None:
    print(f"moemesh: config error: {err}", file=sys.stderr)
    raise SystemExit(2)
