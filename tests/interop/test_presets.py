"""The planner's presets of released models (conf/model/<name>.yaml) are what model=hf reads
from their published config.json (tests/interop/published/, copied from the hub), and they hold
exactly the parameters transformers builds for that config (counted on the meta device)."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from moemesh.config.cli import compose_run
from moemesh.interop.hf.families import model_fields, read_config
from moemesh.moe.param_count import count_params
from scripts import plan

PUBLISHED = Path(__file__).parent / "published"
PRESETS = {"mixtral_8x7b": 46_702_792_704, "olmoe_1b_7b": 6_919_161_856, "qwen3_30b_a3b": 30_532_122_624}


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_is_what_model_hf_reads_from_the_published_config(tmp_path, name):
    shutil.copy(PUBLISHED / f"{name}.json", tmp_path / "config.json")
    raw, hf = read_config(tmp_path)
    arch, chosen = model_fields(tmp_path, raw, hf, {})
    model = compose_run([f"model={name}"]).model
    for key, value in {**arch, **chosen}.items():
        got = getattr(model, key)
        if key == "name":
            continue
        assert got == pytest.approx(value, rel=1e-8) if isinstance(value, float) else got == value, key


@pytest.mark.parametrize("name", PRESETS)
def test_a_preset_holds_the_parameters_transformers_builds(name):
    from transformers import AutoConfig, AutoModelForCausalLM

    raw = json.loads((PUBLISHED / f"{name}.json").read_text())
    with torch.device("meta"):
        hf = AutoModelForCausalLM.from_config(AutoConfig.for_model(raw.pop("model_type"), **raw))
    total = sum(p.numel() for p in hf.parameters())
    assert total == PRESETS[name] == count_params(compose_run([f"model={name}"]).model).total


def test_the_planner_plans_mixtral_on_16_gpus(capsys):
    assert plan.main(["model=mixtral_8x7b", "cluster.gpus=16"]) in (0, None)
    out = capsys.readouterr().out
    assert "model=mixtral_8x7b (46.70B params, 8 experts top-2), 16 GPUs" in out and "| yes |" in out


def test_a_model_in_the_hubs_cache_is_named_by_its_repository(tmp_path):
    snapshot = (
        tmp_path
        / "hub"
        / "models--mistralai--Mixtral-8x7B-v0.1"
        / "snapshots"
        / "41bd4c9e7e4fb318ca40e721131d4933966c2cc1"
    )
    snapshot.mkdir(parents=True)
    shutil.copy(PUBLISHED / "mixtral_8x7b.json", snapshot / "config.json")
    raw, hf = read_config(snapshot)
    assert model_fields(snapshot, raw, hf, {})[1]["name"] == "mistralai/Mixtral-8x7B-v0.1"
    (tmp_path / "mine").symlink_to(snapshot)  # a link to the snapshot: still the repository's name
    assert model_fields(tmp_path / "mine", raw, hf, {})[1]["name"] == "mistralai/Mixtral-8x7B-v0.1"
    plain = tmp_path / "Mixtral-local"
    shutil.copytree(snapshot, plain)
    assert model_fields(plain, raw, hf, {})[1]["name"] == "Mixtral-local"
    # Only a snapshot is named by its repository: another directory inside the cache keeps its own name.
    beside = snapshot.parent.parent / "exported" / "step-100"
    shutil.copytree(snapshot, beside)
    assert model_fields(beside, raw, hf, {})[1]["name"] == "step-100"
