"""recipes/configs/joint: the configs of the study where the two halves meet parse with the recipe on their first line
and state the budget they share."""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
CONFIGS = sorted((REPO / "recipes" / "configs" / "joint").glob("*.yaml"))


def recipe(name: str):
    spec = importlib.util.spec_from_file_location(f"{name}_recipe_joint", REPO / "recipes" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_config_parses_with_the_recipe_of_its_first_line(config, capsys, monkeypatch):
    first = config.read_text().splitlines()[0]
    match = re.match(r"# python recipes/(fewshot|multitask)\.py (fit|test) --config (\S+)", first)
    assert match and match.group(3) == f"recipes/configs/joint/{config.name}", first
    monkeypatch.setattr(sys, "argv", [match.group(1)])
    with pytest.raises(SystemExit) as exit_info:
        recipe(match.group(1)).main([match.group(2), "--config", str(config), "--print_config"])
    assert exit_info.value.code in (0, None)
    assert f"dirpath: runs/joint/{config.stem}/checkpoints" in capsys.readouterr().out


def test_the_lake_runs_share_one_budget():
    """Equal budgets: the same images per step and the same steps for the three Lake pre-training routes."""
    def budget(name: str) -> tuple[int, int]:
        cfg = yaml.safe_load((REPO / "recipes" / "configs" / "joint" / f"{name}.yaml").read_text())
        args = cfg["data"]["init_args"]
        episodes = args.get("episodes", {})
        if "batch_size" in args:  # one batch per background alphabet (30 tasks)
            images = 30 * args["batch_size"]
        elif episodes.get("train_mode") == "classes":
            images = episodes["train_batch_size"]
        else:
            images = episodes["train_ways"] * (episodes["train_shots"] + episodes["train_queries"])
        return images, cfg["trainer"]["max_steps"]

    assert budget("lake_protonet_5w1s") == budget("lake_embedding_baseline_5w1s") == budget(
        "lake_multitask_pretrain") == (120, 3000)
